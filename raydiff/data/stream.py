"""The training sample stream: which sample each worker trains on at each micro-step, as a pure function of the
seed, the source's units and a resume position — so a resumed run reads exactly the samples an unbroken run would
have read, and each epoch reads every unit of the source once in total across workers.

Positions. Epochs follow one another into one stream of positions ``s = e·N + i`` (N training rows). A *segment*
(one launch of a run, or a restart on another layout) starts at stream position ``start`` with W workers of B rows
per micro-step: micro-step m covers ``[start + m·W·B, start + (m+1)·W·B)`` and rank r takes the B positions
``start + m·W·B + r·B + b``; its local row j is micro-step ``j // B``, slot ``j % B``. So every epoch is exactly-once
across workers (no row dropped, none repeated) and a batch may straddle two epochs.

Which row a position holds (the shuffle, after MosaicML streaming's shard-then-window shuffles). Epoch e orders the
source's read units (parquet row groups, tar shards, listing groups) by a seeded permutation; their training rows,
unit after unit, form the epoch's sequence. Rank r's positions in the epoch take one contiguous span of that
sequence — so a unit is read by one worker, or two when a span boundary cuts it — and the span is shuffled in
windows of whole units holding at least ``window`` rows. Order is thus random at the unit level across the epoch
and at the row level within a window; every epoch draws both afresh.

A restart on another layout mid-epoch hands the rest of that epoch (the rows the earlier segment's ranks had not
reached, in their order) to the new ranks in contiguous spans; later epochs are planned for the new layout. A
worker computes only the old ranks' spans its own share overlaps, so it holds O(its share) rows either way.

A row that fails preprocessing (skipped, counted) is replaced by the worker's next row of the stream, so batches
stay full; the worker records how many local rows it has consumed, and a restart continues from there.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

ORDER_COLUMN = "_order"  # the row's local index j in its worker's stream
ROW_COLUMN = "_row"  # the row's global index in the source (raydiff.data.manifest): its identity
EPOCH_COLUMN = "_epoch"  # the epoch the row is read for: seeds its crop, flip and caption dropout
SHUFFLE_WINDOW = 2048  # rows shuffled together within a worker's span (whole units, at least this many rows)


# ---------------------------------------------------------------- positions (pure)


@dataclass
class StreamPosition:
    """Where a run is in the stream: its segment's start, layout (W, B), and rows consumed by each rank.

    ``emitted``: per rank, rows at or after ``consumed`` already trained on (aspect-ratio buckets hand rows out
    out of order; a restart re-reads from ``consumed`` and skips these). ``history``: the earlier segments
    ``[start, world, batch]``, which decide what the first epoch of this one still holds."""

    start: int = 0
    world: int = 0  # 0: no segment yet
    batch: int = 0
    consumed: list[int] = dataclasses.field(default_factory=list)
    emitted: list[list[int]] = dataclasses.field(default_factory=list)
    history: list[list[int]] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.emitted:
            self.emitted = [[] for _ in self.consumed]

    def continue_with(self, world: int, batch: int) -> StreamPosition:
        """The segment a relaunch on (world, batch) continues with. The same layout resumes every rank at its own
        row; a new one starts a fresh segment after the furthest micro-step any rank reached (positions a rank
        skipped past because of bad rows can be left out of that epoch, never repeated)."""
        if self.world == 0:
            return StreamPosition(0, world, batch, [0] * world)
        if (world, batch) == (self.world, self.batch):
            return dataclasses.replace(self, consumed=list(self.consumed), emitted=[list(e) for e in self.emitted])
        return StreamPosition(self.start + self._micro_steps() * self.world * self.batch, world, batch, [0] * world,
                              history=[*self.history, [self.start, self.world, self.batch]])

    def _micro_steps(self) -> int:
        reached = [max([c, *(e + 1 for e in em)]) for c, em in zip(self.consumed, self.emitted)]
        return max(math.ceil(r / self.batch) for r in reached)

    def samples_consumed(self) -> int:
        """Stream positions behind this segment's furthest rank (= samples trained, without bad rows)."""
        if not self.consumed:
            return self.start
        return self.start + self._micro_steps() * self.world * self.batch

    def segments(self) -> list[tuple[int, int, int]]:
        return [tuple(h) for h in self.history] + [(self.start, self.world, self.batch)]


def stream_position(start: int, world: int, batch: int, rank: int, j: np.ndarray | int) -> np.ndarray | int:
    """Stream position of rank ``rank``'s local row(s) j."""
    return start + (j // batch) * world * batch + rank * batch + j % batch


def first_row_at_or_after(start: int, world: int, batch: int, rank: int, position: int) -> int:
    """The smallest local row j of ``rank`` whose stream position is >= ``position``."""
    offset = max(position - start, 0)
    micro, rem = divmod(offset, world * batch)
    lo = rank * batch
    if rem <= lo:
        return micro * batch
    if rem < lo + batch:
        return micro * batch + rem - lo
    return (micro + 1) * batch


def epoch_of(num_rows: int, pos: StreamPosition, rank: int, j: int) -> int:
    return int(stream_position(pos.start, pos.world, pos.batch, rank, j)) // num_rows


# ---------------------------------------------------------------- the shuffle (pure)


def unit_order(num_units: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which epoch ``epoch`` visits the units: fresh per epoch, fixed by the seed."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), 0x57AE])).permutation(num_units)


@dataclass(frozen=True)
class Units:
    """Training rows per unit, in listing order (``Manifest.unit_train_rows``): all the shuffle needs to know."""

    rows: np.ndarray

    @property
    def start(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.rows)]).astype(np.int64)

    @property
    def total(self) -> int:
        return int(self.rows.sum())


def sequence_span(units: Units, seed: int, epoch: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Training rows t at places [lo, hi) of epoch ``epoch``'s unit-ordered sequence, and the size of each unit's
    piece of the span (so windows can be cut at unit boundaries)."""
    order = unit_order(len(units.rows), seed, epoch)
    counts = units.rows[order]
    cum = np.concatenate([[0], np.cumsum(counts)])
    k0, k1 = np.searchsorted(cum, lo, "right") - 1, np.searchsorted(cum, hi, "left")
    if hi <= lo:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    ks = np.arange(k0, k1)
    a = np.maximum(lo, cum[ks]) - cum[ks]  # piece of each unit, as offsets into its training rows
    b = np.minimum(hi, cum[ks + 1]) - cum[ks]
    sizes = (b - a).astype(np.int64)
    firsts = units.start[order[ks]] + a
    t = np.repeat(firsts - np.concatenate([[0], np.cumsum(sizes)[:-1]]), sizes) + np.arange(sizes.sum())
    return t.astype(np.int64), sizes


def windows(piece_sizes: np.ndarray, window: int) -> np.ndarray:
    """Sizes of consecutive groups of whole pieces, each of at least ``window`` rows (but the last)."""
    out, acc = [], 0
    for n in piece_sizes:
        acc += int(n)
        if acc >= window:
            out.append(acc)
            acc = 0
    if acc:
        out.append(acc)
    return np.asarray(out, dtype=np.int64)


def shuffled_span(units: Units, seed: int, epoch: int, lo: int, hi: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """A rank's span of the epoch's sequence, each window of whole units shuffled: (training rows, window sizes)."""
    t, pieces = sequence_span(units, seed, epoch, lo, hi)
    sizes = windows(pieces, window)
    out = t.copy()
    begin = 0
    for w, n in enumerate(sizes):
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), int(lo), w, 0x5EED]))
        out[begin:begin + n] = t[begin:begin + n][rng.permutation(n)]
        begin += n
    return out, sizes


@dataclass(frozen=True)
class EpochShare:
    """Rank ``rank``'s rows of one epoch: training rows in local-row order from local row ``first``, cut into read
    chunks of ``chunks`` rows (whole units where the plan allows)."""

    epoch: int
    first: int
    rows: np.ndarray  # training rows t, for local rows first, first + 1, ...
    chunks: np.ndarray  # sizes, summing to len(rows)

    @property
    def end(self) -> int:
        return self.first + len(self.rows)

    def from_row(self, j: int) -> EpochShare:
        skip = min(max(j - self.first, 0), len(self.rows))
        if skip == 0:
            return self
        bounds = np.concatenate([[0], np.cumsum(self.chunks)])
        kept = np.diff(np.clip(bounds, skip, None)) if len(self.chunks) else self.chunks
        return EpochShare(self.epoch, self.first + skip, self.rows[skip:], kept[kept > 0])


def epoch_share(units: Units, seed: int, pos: StreamPosition, rank: int, epoch: int,
                window: int = SHUFFLE_WINDOW) -> EpochShare:
    """The rows rank ``rank`` of the current segment trains on in ``epoch`` (every segment of the history that
    covered part of this epoch decides which rows are left for this one)."""
    n = units.total
    lo_pos, hi_pos = epoch * n, (epoch + 1) * n
    segments = pos.segments()
    remainder = None  # (lo, hi) -> rows lo..hi of what earlier segments left of the epoch; None: all of it
    for i, (start, world, batch) in enumerate(segments):
        end = segments[i + 1][0] if i + 1 < len(segments) else None
        if start >= hi_pos or (end is not None and end <= lo_pos):
            continue
        a = max(start, lo_pos)
        rows_at = [first_row_at_or_after(start, world, batch, r, a) for r in range(world)]
        counts = [first_row_at_or_after(start, world, batch, r, hi_pos) - rows_at[r] for r in range(world)]
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

        def span(r: int, remainder=remainder, offsets=offsets) -> tuple[np.ndarray, np.ndarray]:
            if remainder is None:
                return shuffled_span(units, seed, epoch, int(offsets[r]), int(offsets[r + 1]), window)
            part = remainder(int(offsets[r]), int(offsets[r + 1]))
            return part, windows(np.full(len(part), 1, np.int64), window)

        if i == len(segments) - 1:
            rows, chunks = span(rank)
            return EpochShare(epoch, rows_at[rank], rows, chunks)
        stop = min(end, hi_pos)
        done = [first_row_at_or_after(start, world, batch, r, stop) - rows_at[r] for r in range(world)]
        tails = np.concatenate([[0], np.cumsum(np.subtract(counts, done))]).astype(np.int64)

        def rest(lo: int, hi: int, span=span, done=done, tails=tails) -> np.ndarray:
            """The old ranks' unread tails, concatenated, rows lo..hi: only the ranks that overlap are computed,
            so a new rank's share costs O(its share + an old rank's span), not the whole epoch."""
            parts = [span(r)[0][done[r] + max(lo, tails[r]) - tails[r]:done[r] + min(hi, tails[r + 1]) - tails[r]]
                     for r in range(len(done)) if max(lo, tails[r]) < min(hi, tails[r + 1])]
            return np.concatenate(parts) if parts else np.zeros(0, np.int64)

        remainder = rest
    return EpochShare(epoch, 0, np.zeros(0, np.int64), np.zeros(0, np.int64))


# ---------------------------------------------------------------- batching on the training worker


def rebatch(batches: Iterable[dict[str, np.ndarray]], batch_size: int, group_column: str | None = None,
            skip: Iterable[int] = ()) -> Iterator[tuple[dict[str, np.ndarray], int, list[int]]]:
    """Rows (ordered by ``_order``) → (batch of ``batch_size`` rows, resume row, rows emitted at or after it).

    With ``group_column`` (aspect-ratio buckets) each batch holds one group; rows wait in a per-group buffer. The
    resume row is the first row not yet trained on (a row still waiting in a bucket, or one past the last row
    handed out), so a restart re-reads the waiting rows and skips the ones listed as emitted. ``skip``: rows a
    restarted stream has already trained on.
    """
    pending: dict[int, list[dict[str, np.ndarray]]] = {}
    done = set(int(s) for s in skip)
    last_order = -1
    for batch in batches:
        for i, order in enumerate(batch[ORDER_COLUMN]):
            if order <= last_order:
                raise RuntimeError(f"training stream out of order: row {order} after row {last_order}")
            last_order = int(order)
            if last_order in done:
                continue
            row = {c: batch[c][i] for c in batch}
            group = int(row[group_column]) if group_column else 0
            rows = pending.setdefault(group, [])
            rows.append(row)
            if len(rows) == batch_size:
                del pending[group]
                done.update(int(r[ORDER_COLUMN]) for r in rows)
                waiting = [int(r[ORDER_COLUMN]) for rs in pending.values() for r in rs]
                resume = min(waiting) if waiting else max(done) + 1
                done = {d for d in done if d >= resume}
                yield ({c: np.stack([r[c] for r in rows]) for c in rows[0] if c != ORDER_COLUMN}, resume,
                       sorted(done))
