"""data.record_rows (raydiff.train.row_trace): records written per rank and checkpoint, and the lineage a run's
weights were trained on when a later attempt retrains steps an earlier one had recorded."""

from __future__ import annotations

import numpy as np

from raydiff.data.stream import EPOCH_COLUMN, ROW_COLUMN
from raydiff.train.row_trace import RowTrace, group_attempt_id, read_lineage


def batch(rows: list[int], epoch: int) -> dict:
    return {ROW_COLUMN: np.array(rows), EPOCH_COLUMN: np.full(len(rows), epoch), "pixels": np.zeros((len(rows), 3))}


def test_a_later_attempt_replaces_the_steps_it_retrained(tmp_path):
    run = str(tmp_path)
    first = group_attempt_id()  # no process group: this process's own id
    # Attempt 1, two ranks: steps 1-2 checkpointed, step 3 recorded at the next checkpoint, then the run broke.
    for rank, rows in ((0, [[0, 1], [4, 5], [8, 9]]), (1, [[2, 3], [6, 7], [10, 11]])):
        trace = RowTrace(run, rank, first)
        trace.add(1, batch(rows[0], 0))
        trace.add(2, batch(rows[1], 0))
        trace.flush(2)
        trace.add(3, batch(rows[2], 1))
        trace.flush(3)
        trace.flush(3)  # nothing pending: no file
    # Attempt 2 on one worker resumed from step 2 and retrained step 3 on other rows, then step 4.
    second = group_attempt_id()
    assert second > first
    trace = RowTrace(run, 0, second)
    trace.add(3, batch([8, 9], 1))
    trace.add(3, batch([12, 13], 1))  # two micro-steps of one optimizer step (grad_accum 2)
    trace.add(4, batch([0, 1], 2))
    trace.flush(4)

    lineage = read_lineage(run)
    assert sorted(lineage) == [1, 2, 3, 4]
    assert sorted(lineage[1]) == [(0, 0), (1, 0), (2, 0), (3, 0)]  # both ranks of attempt 1
    assert sorted(lineage[2]) == [(4, 0), (5, 0), (6, 0), (7, 0)]
    assert lineage[3] == [(8, 1), (9, 1), (12, 1), (13, 1)]  # attempt 2's, not attempt 1's two ranks'
    assert lineage[4] == [(0, 2), (1, 2)]
    assert len(list((tmp_path / "rows" / first).iterdir())) == 4  # one file per rank and checkpoint with records


def test_no_records_no_lineage(tmp_path):
    assert read_lineage(str(tmp_path)) == {}
