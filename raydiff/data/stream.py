"""The training sample stream: which sample each worker trains on at each micro-step, as a pure function of the
seed, the data and a resume position — so a resumed run reads exactly the samples an unbroken run would have read.

Epoch ``e`` is a seeded permutation of the N training samples; epochs follow one another into one stream of
positions ``s = e·N + i``. A *segment* (one launch of a run, or a restart after a failure) starts at stream position
``start`` with W workers of B rows per micro-step: micro-step m covers ``[start + m·W·B, start + (m+1)·W·B)`` and
rank r takes the B positions ``start + m·W·B + r·B + b``; its local row j is micro-step ``j // B``, slot ``j % B``.
So every epoch is exactly-once across workers (no row dropped, none repeated) and a batch may straddle two epochs.

A sample is identified by a 63-bit digest of its image (bytes, or path for image folders) and caption, not of where
it is stored. Identical rows (same image and caption) are interchangeable: each keeps its own place in the stream.

A row that fails preprocessing (skipped, counted) is replaced by the worker's next row of the stream, so batches
stay full; the worker records how many local rows it has consumed, and a restart continues from there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa

ORDER_COLUMN = "_order"  # the row's local index j in its worker's stream
UID_COLUMN = "_uid"


# ---------------------------------------------------------------- identity and order (pure)


def sample_uid(image: bytes | None, path: str | None, caption: Any) -> int:
    """A 63-bit identity of a row from its content only, so the order survives moving the data elsewhere."""
    h = hashlib.blake2b(digest_size=8)
    h.update(image if image else (path or "").encode("utf-8"))
    h.update(b"\0" + repr(caption).encode("utf-8"))
    return int.from_bytes(h.digest(), "little") >> 1


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which epoch ``epoch`` visits the N samples: fresh per epoch, fixed by the seed."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), 0x57AE])).permutation(n)


@dataclass
class StreamPosition:
    """Where a run is in the stream: its segment's start, layout (W, B), and rows consumed by each rank."""

    start: int = 0
    world: int = 0  # 0: no segment yet
    batch: int = 0
    consumed: list[int] = dataclasses.field(default_factory=list)

    def continue_with(self, world: int, batch: int) -> StreamPosition:
        """The segment a relaunch on (world, batch) continues with. The same layout resumes every rank at its own
        row; a new one starts a fresh segment after the furthest micro-step any rank reached (positions a rank
        skipped past because of bad rows can be left out of that epoch, never repeated)."""
        if self.world == 0:
            return StreamPosition(0, world, batch, [0] * world)
        if (world, batch) == (self.world, self.batch):
            return StreamPosition(self.start, world, batch, list(self.consumed))
        micro_steps = max(math.ceil(c / self.batch) for c in self.consumed)
        return StreamPosition(self.start + micro_steps * self.world * self.batch, world, batch, [0] * world)

    def samples_consumed(self) -> int:
        """Stream positions behind this segment's furthest rank (= samples trained, without bad rows)."""
        if not self.consumed:
            return self.start
        return self.start + max(math.ceil(c / self.batch) for c in self.consumed) * self.world * self.batch


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


@dataclass(frozen=True)
class EpochShare:
    """Rank ``rank``'s rows of one epoch: uids (sorted) and the local row j each goes to."""

    epoch: int
    uids: np.ndarray  # uint64-in-int64, sorted
    orders: np.ndarray  # int64, aligned with uids
    first: int  # smallest j in this share
    end: int  # one past the largest j


def epoch_share(uids_sorted: np.ndarray, seed: int, pos: StreamPosition, rank: int, epoch: int,
                from_row: int) -> EpochShare:
    """The rows rank ``rank`` reads in ``epoch``, from its local row ``from_row`` on."""
    n = len(uids_sorted)
    first = max(from_row, first_row_at_or_after(pos.start, pos.world, pos.batch, rank, epoch * n))
    end = first_row_at_or_after(pos.start, pos.world, pos.batch, rank, (epoch + 1) * n)
    j = np.arange(first, max(end, first), dtype=np.int64)
    index = stream_position(pos.start, pos.world, pos.batch, rank, j) - epoch * n
    uids = uids_sorted[epoch_permutation(n, seed, epoch)[index]]
    by_uid = np.argsort(uids, kind="stable")
    return EpochShare(epoch, uids[by_uid], j[by_uid], first, max(end, first))


def epoch_of(uids_count: int, pos: StreamPosition, rank: int, j: int) -> int:
    return int(stream_position(pos.start, pos.world, pos.batch, rank, j)) // uids_count


# ---------------------------------------------------------------- Ray Data stage and batching


def assign_rows(batch: pa.Table, *, image_column: str, caption_column: str, uids: np.ndarray,
                orders: np.ndarray) -> pa.Table:
    """Keep the rows of this worker's epoch share, one copy per place it has in the stream, with its ``_order``.

    An identical row that occurs k times in the data arrives k times and matches k places: each arrival emits all k,
    and the worker keeps one row per ``_order`` (identical rows, so which copy does not matter).
    """
    from raydiff.data.pipeline import image_parts

    if UID_COLUMN in batch.column_names:  # precompute cache rows carry their identity
        row_uids = batch[UID_COLUMN].to_numpy()
    else:
        data, paths = image_parts(batch[image_column])
        captions = batch[caption_column].to_pylist()
        row_uids = np.array([sample_uid(d, p, c) for d, p, c in zip(data, paths, captions)], dtype=np.int64)
    lo, hi = np.searchsorted(uids, row_uids, "left"), np.searchsorted(uids, row_uids, "right")
    take = np.repeat(np.arange(len(row_uids)), hi - lo)
    order = np.concatenate([orders[a:b] for a, b in zip(lo, hi)]) if len(take) else np.zeros(0, np.int64)
    return batch.take(pa.array(take, type=pa.int64())).append_column(ORDER_COLUMN, pa.array(order, type=pa.int64()))


def rebatch(batches: Iterable[dict[str, np.ndarray]], batch_size: int,
            group_column: str | None = None) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """Rows (ordered by ``_order``, possibly repeated) → (batch of ``batch_size`` rows, rows consumed so far).

    With ``group_column`` (aspect-ratio buckets) each batch holds one group; rows wait in a per-group buffer.
    "Consumed" is one past the largest ``_order`` handed out, so a restart resumes after it.
    """
    pending: dict[int, list[dict[str, np.ndarray]]] = {}
    last_order = -1
    consumed = 0
    for batch in batches:
        for i, order in enumerate(batch[ORDER_COLUMN]):
            if order == last_order:  # a second copy of an identical row (they arrive next to each other)
                continue
            if order < last_order:
                raise RuntimeError(f"training stream out of order: row {order} after row {last_order}")
            last_order = int(order)
            row = {c: batch[c][i] for c in batch}
            group = int(row[group_column]) if group_column else 0
            rows = pending.setdefault(group, [])
            rows.append(row)
            if len(rows) == batch_size:
                del pending[group]
                consumed = max(consumed, max(int(r[ORDER_COLUMN]) for r in rows) + 1)
                yield {c: np.stack([r[c] for r in rows]) for c in rows[0] if c != ORDER_COLUMN}, consumed
