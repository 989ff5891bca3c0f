"""The seeded training stream (raydiff.data.stream): exactly-once epochs across workers, a fresh seeded order per
epoch, resume positions, world-size changes, and the row bookkeeping of the Ray Data stage. No Ray needed here."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from raydiff.data.stream import (
    ORDER_COLUMN,
    StreamPosition,
    assign_rows,
    epoch_share,
    first_row_at_or_after,
    rebatch,
    sample_uid,
    stream_position,
)

UIDS = np.sort(np.random.default_rng(0).integers(0, 2**62, size=37))


def rank_rows(pos: StreamPosition, rank: int, epoch: int, from_row: int = 0) -> list[tuple[int, int]]:
    """(local row j, uid) of one rank's share of an epoch, in stream order."""
    share = epoch_share(UIDS, 7, pos, rank, epoch, from_row)
    return sorted(zip(share.orders.tolist(), share.uids.tolist()))


@pytest.mark.parametrize("world, batch", [(2, 4), (3, 5), (1, 8)])
def test_each_epoch_visits_every_sample_exactly_once_across_workers(world, batch):
    pos = StreamPosition(0, world, batch, [0] * world)
    orders = []
    for epoch in range(3):
        seen = [uid for r in range(world) for _, uid in rank_rows(pos, r, epoch)]
        assert sorted(seen) == UIDS.tolist()  # every sample once, none twice, none dropped
        orders.append([uid for r in range(world) for _, uid in rank_rows(pos, r, epoch)])
    assert orders[0] != orders[1] != orders[2]  # a fresh order each epoch...
    assert orders[0] == [uid for r in range(world) for _, uid in rank_rows(pos, r, 0)]  # ...fixed by the seed
    other_seed = epoch_share(UIDS, 8, pos, 0, 0, 0)
    assert [u for _, u in sorted(zip(other_seed.orders, other_seed.uids))] != [u for _, u in rank_rows(pos, 0, 0)]


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
    pos2 = StreamPosition(0, 2, 4, [0, 0]).continue_with(2, 4)
    resumed = [r for e in range(3) for r in rank_rows(pos2, 1, e, from_row=resumed_at)]
    assert resumed == unbroken[resumed_at:]


def test_continue_with_a_new_layout_starts_after_the_furthest_micro_step():
    saved = StreamPosition(start=10, world=2, batch=4, consumed=[12, 12])
    assert saved.continue_with(2, 4) == StreamPosition(10, 2, 4, [12, 12])
    assert saved.samples_consumed() == 10 + 3 * 8
    shrunk = saved.continue_with(1, 4)
    assert shrunk == StreamPosition(34, 1, 4, [0])
    # One rank ran ahead by replacing skipped rows: the new segment starts after it, so nothing is repeated.
    assert StreamPosition(0, 2, 4, [12, 14]).continue_with(1, 8).start == 4 * 8
    assert StreamPosition().continue_with(2, 4) == StreamPosition(0, 2, 4, [0, 0])


def test_a_shrunk_world_sees_the_rest_of_the_epoch_exactly_once():
    n = len(UIDS)
    before = StreamPosition(0, 2, 4, [0, 0])
    consumed = 8  # each of 2 ranks trained 8 rows = 16 samples of epoch 0
    trained = {uid for r in range(2) for j, uid in rank_rows(before, r, 0) if j < consumed}
    after = StreamPosition(0, 2, 4, [consumed, consumed]).continue_with(1, 4)
    rest = [uid for _, uid in rank_rows(after, 0, 0)]
    assert len(trained) == 16 and len(rest) == n - 16
    assert sorted(trained | set(rest)) == UIDS.tolist() and not trained & set(rest)


def _table(images: list[bytes], captions: list[str]) -> pa.Table:
    image = pa.array([{"bytes": b, "path": None} for b in images],
                     type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    return pa.table({"image": image, "text": captions, "_file": ["f.parquet"] * len(images)})


def test_assign_rows_keeps_the_share_once_per_place_including_duplicate_rows():
    table = _table([b"a", b"b", b"c", b"a"], ["x", "y", "z", "x"])  # rows 0 and 3 are the same sample
    uid = {name: sample_uid(name, None, cap) for name, cap in [(b"a", "x"), (b"b", "y"), (b"c", "z")]}
    assert uid[b"a"] != sample_uid(b"a", None, "other caption")
    share = sorted([(uid[b"a"], 5), (uid[b"a"], 2), (uid[b"c"], 0)])
    out = assign_rows(table, image_column="image", caption_column="text",
                      uids=np.array([u for u, _ in share], dtype=np.int64),
                      orders=np.array([o for _, o in share], dtype=np.int64))
    got = sorted(zip(out[ORDER_COLUMN].to_pylist(), out["text"].to_pylist()))
    # Both copies of "a" arrive and each emits both of its places; "b" is not in this share.
    assert got == [(0, "z"), (2, "x"), (2, "x"), (5, "x"), (5, "x")]


def test_rebatch_drops_duplicate_places_and_reports_rows_consumed():
    blocks = [{ORDER_COLUMN: np.array([0, 1, 1, 2]), "x": np.array([10, 11, 11, 12])},
              {ORDER_COLUMN: np.array([4, 5, 5, 6, 7]), "x": np.array([14, 15, 15, 16, 17])}]  # row 3 was skipped
    out = list(rebatch(blocks, 3))
    assert [b["x"].tolist() for b, _ in out] == [[10, 11, 12], [14, 15, 16]]
    assert [consumed for _, consumed in out] == [3, 7]
    assert ORDER_COLUMN not in out[0][0]


def test_rebatch_groups_by_bucket():
    blocks = [{ORDER_COLUMN: np.arange(6), "bucket": np.array([0, 1, 0, 1, 1, 0]), "x": np.arange(6)}]
    out = list(rebatch(blocks, 2, "bucket"))
    assert [b["x"].tolist() for b, _ in out] == [[0, 2], [1, 3]]
    assert all(len(set(b["bucket"].tolist())) == 1 for b, _ in out)
