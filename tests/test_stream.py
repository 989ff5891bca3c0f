"""The seeded training stream (raydiff.data.stream): exactly-once epochs across workers, a fresh seeded order per
epoch, each unit read by one worker (two where a span boundary cuts it), resume positions, world-size changes, and
the batching bookkeeping (buckets included). No Ray needed here."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from raydiff.data.loader import Prefetched
from raydiff.data.stream import (
    ORDER_COLUMN,
    StreamPosition,
    Units,
    epoch_share,
    first_row_at_or_after,
    rebatch,
    stream_position,
    unit_order,
)

# 12 units of 1..6 training rows (75 rows): uneven, like row groups with held-out rows removed.
UNITS = Units(np.array([6, 5, 6, 1, 6, 6, 6, 6, 6, 6, 6, 15], dtype=np.int64))
N = UNITS.total
UNIT_OF = np.repeat(np.arange(len(UNITS.rows)), UNITS.rows)  # training row t -> its unit


def rank_rows(pos: StreamPosition, rank: int, epoch: int, window: int = 8) -> list[tuple[int, int]]:
    """(local row j, training row t) of one rank's share of an epoch, in stream order."""
    share = epoch_share(UNITS, 7, pos, rank, epoch, window)
    assert share.chunks.sum() == len(share.rows)
    return list(zip(range(share.first, share.end), share.rows.tolist()))


@pytest.mark.parametrize("world, batch", [(2, 4), (3, 5), (1, 8)])
def test_each_epoch_visits_every_sample_exactly_once_across_workers(world, batch):
    pos = StreamPosition(0, world, batch, [0] * world)
    orders = []
    for epoch in range(3):
        seen = [t for r in range(world) for _, t in rank_rows(pos, r, epoch)]
        assert sorted(seen) == list(range(N))  # every sample once, none twice, none dropped
        orders.append(seen)
    assert orders[0] != orders[1] != orders[2]  # a fresh order each epoch...
    assert orders[0] == [t for r in range(world) for _, t in rank_rows(pos, r, 0)]  # ...fixed by the seed
    other_seed = epoch_share(UNITS, 8, pos, 0, 0)
    assert other_seed.rows.tolist() != [t for _, t in rank_rows(pos, 0, 0)]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_each_unit_is_read_by_one_worker_or_two_at_a_span_boundary(world):
    pos = StreamPosition(0, world, 4, [0] * world)
    for epoch in range(3):
        readers = {}
        for r in range(world):
            for u in {int(UNIT_OF[t]) for _, t in rank_rows(pos, r, epoch)}:
                readers.setdefault(u, set()).add(r)
        assert sum(len(v) for v in readers.values()) <= len(UNITS.rows) + world - 1


def test_order_is_shuffled_across_units_and_within_windows():
    pos = StreamPosition(0, 1, 4, [0])
    rows = np.array([t for _, t in rank_rows(pos, 0, 0, window=8)])
    assert abs(np.corrcoef(rows, np.arange(N))[0, 1]) < 0.5  # not the listing order
    assert (np.diff(rows) != 1).mean() > 0.5  # rows inside a window are mixed, not left in file order
    orders = [unit_order(len(UNITS.rows), 7, e).tolist() for e in range(4)]
    assert len({tuple(o) for o in orders}) == 4


def test_local_rows_are_contiguous_across_epochs_and_match_stream_positions():
    pos = StreamPosition(0, 2, 4, [0, 0])
    for rank in range(2):
        rows = [j for epoch in range(3) for j, _ in rank_rows(pos, rank, epoch)]
        assert rows == list(range(len(rows)))  # an epoch boundary may cut a batch; no row is skipped
        positions = stream_position(0, 2, 4, rank, np.array(rows))
        assert all(((p % 8) // 4) == rank for p in positions)  # rank r holds slots r*B..r*B+B-1 of each micro-step


def test_first_row_at_or_after_inverts_stream_position():
    for world, batch, rank, start in [(2, 4, 1, 0), (3, 5, 2, 17), (1, 3, 0, 5)]:
        for x in range(start, start + 60):
            j = first_row_at_or_after(start, world, batch, rank, x)
            assert stream_position(start, world, batch, rank, j) >= x
            assert j == 0 or stream_position(start, world, batch, rank, j - 1) < x


def test_resuming_a_rank_continues_its_unbroken_stream():
    pos = StreamPosition(0, 2, 4, [0, 0])
    unbroken = [r for e in range(3) for r in rank_rows(pos, 1, e)]
    resumed_at = 30  # local rows already consumed by rank 1 when the run stopped
    pos2 = StreamPosition(0, 2, 4, [0, resumed_at]).continue_with(2, 4)
    resumed = []
    for e in range(3):
        share = epoch_share(UNITS, 7, pos2, 1, e, 8).from_row(pos2.consumed[1])
        assert share.chunks.sum() == len(share.rows)
        resumed += list(zip(range(share.first, share.end), share.rows.tolist()))
    assert resumed == unbroken[resumed_at:]


def test_continue_with_a_new_layout_starts_after_the_furthest_micro_step():
    saved = StreamPosition(start=10, world=2, batch=4, consumed=[12, 12])
    assert saved.continue_with(2, 4) == StreamPosition(10, 2, 4, [12, 12])
    assert saved.samples_consumed() == 10 + 3 * 8
    shrunk = saved.continue_with(1, 4)
    assert (shrunk.start, shrunk.world, shrunk.consumed, shrunk.history) == (34, 1, [0], [[10, 2, 4]])
    # One rank ran ahead by replacing skipped rows: the new segment starts after it, so nothing is repeated.
    assert StreamPosition(0, 2, 4, [12, 14]).continue_with(1, 8).start == 4 * 8
    # Rows a bucket handed out beyond the resume row count as reached.
    assert StreamPosition(0, 2, 4, [4, 4], [[9], []]).continue_with(1, 4).start == 3 * 8
    assert StreamPosition().continue_with(2, 4) == StreamPosition(0, 2, 4, [0, 0])


@pytest.mark.parametrize("layouts", [[(2, 4, 8), (1, 4, 0)], [(3, 5, 10), (2, 3, 9), (4, 2, 0)]])
def test_a_world_size_change_sees_the_rest_of_the_epoch_exactly_once(layouts):
    """Each segment trains ``consumed`` rows per rank of epoch 0, then the run relaunches on the next layout; the
    last segment reads the rest. Together they read epoch 0 exactly once, and epoch 1 is whole again."""
    (world, batch, _), trained = layouts[0], []
    pos = StreamPosition(0, world, batch, [0] * world)
    for i, (world, batch, consumed) in enumerate(layouts):
        if i:
            pos = pos.continue_with(world, batch)
        shares = [rank_rows(pos, r, 0) for r in range(world)]
        if i == len(layouts) - 1:
            trained += [t for rows in shares for _, t in rows]
        else:
            trained += [t for rows in shares for j, t in rows if j < consumed]
            pos = StreamPosition(pos.start, world, batch, [consumed] * world, history=pos.history)
    assert sorted(trained) == list(range(N))
    assert sorted(t for r in range(pos.world) for _, t in rank_rows(pos, r, 1)) == list(range(N))


def test_rebatch_reports_the_resume_row_and_skips_rows_already_trained():
    blocks = [{ORDER_COLUMN: np.array([0, 1, 2]), "x": np.array([10, 11, 12])},
              {ORDER_COLUMN: np.array([4, 5, 6, 7]), "x": np.array([14, 15, 16, 17])}]  # row 3 was skipped
    out = list(rebatch(blocks, 3))
    assert [b["x"].tolist() for b, _, _ in out] == [[10, 11, 12], [14, 15, 16]]
    assert [(resume, emitted) for _, resume, emitted in out] == [(3, []), (7, [])]
    assert ORDER_COLUMN not in out[0][0]
    with pytest.raises(RuntimeError, match="out of order"):
        list(rebatch([{ORDER_COLUMN: np.array([2, 1]), "x": np.array([0, 0])}], 1))


def test_rebatch_keeps_rows_waiting_in_a_bucket_for_a_restart():
    order = np.arange(12)
    bucket = np.array([0, 1, 0, 1, 1, 0, 0, 0, 1, 1, 0, 0])

    def stream(first: int, skip=()):
        block = {ORDER_COLUMN: order[first:], "bucket": bucket[first:], "x": order[first:]}
        return [(b["x"].tolist(), resume, emitted) for b, resume, emitted in rebatch([block], 2, "bucket", skip)]

    unbroken = stream(0)
    assert [x for x, _, _ in unbroken] == [[0, 2], [1, 3], [5, 6], [4, 8], [7, 10]]
    # After [5, 6], row 4 still waits in bucket 1: the resume row is 4, and 5 and 6 are listed as trained.
    assert [(resume, emitted) for _, resume, emitted in unbroken[:3]] == [(1, [2]), (4, []), (4, [5, 6])]
    # A restart from that cursor trains on exactly what the unbroken stream trained on next, row 4 included.
    _, resume, emitted = unbroken[2]
    assert stream(resume, emitted) == unbroken[3:]


def test_prefetched_keeps_order_raises_where_the_source_failed_and_closes_it():
    closed = threading.Event()

    def source(fail_at=None):
        try:
            for i in range(6):
                if i == fail_at:
                    raise ValueError(f"bad item {i}")
                yield i
        finally:
            closed.set()

    assert list(Prefetched(source())) == list(range(6)) and closed.is_set()
    closed.clear()
    got = []
    with pytest.raises(ValueError, match="bad item 3"):
        for item in Prefetched(source(fail_at=3)):
            got.append(item)
    assert got == [0, 1, 2] and closed.is_set()
    # A consumer that stops early (the last step before the stream's end) closes the source in its own thread.
    closed.clear()
    ahead = Prefetched(source(), depth=1)
    assert next(iter(ahead)) == 0
    ahead.close()
    assert closed.wait(5) and not ahead._thread.is_alive()
