"""`data.record_rows`: the source rows (with their epochs) each rank trained on at each step, written under
``<run>/rows/<attempt>/`` at every checkpoint. An audit trail: with it a run shows that each epoch read every row
once across restarts and resizes (``read_lineage``), and which rows a given step saw. ~20 bytes per row per epoch.

A restart retrains the steps after its checkpoint; its records replace the earlier attempt's for those steps, so
the attempt id (rank 0's start time, shared by the group) orders attempts."""

from __future__ import annotations

import json
import time
from collections import defaultdict

import numpy as np
import pyarrow.fs as pafs
import torch.distributed as dist

from raydiff import storage
from raydiff.data.stream import EPOCH_COLUMN, ROW_COLUMN

TRACE_DIR = "rows"


def group_attempt_id() -> str:
    """Rank 0's start time in ns, the same on every rank of this worker group (a collective)."""
    ids = [f"{time.time_ns():020d}"]
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(ids, src=0)
    return ids[0]


class RowTrace:
    """One rank's records since the last flush: a JSON line per micro-step."""

    def __init__(self, run_dir: str, rank: int, attempt: str):
        self.dir, self.rank, self.lines = storage.join(run_dir, TRACE_DIR, attempt), rank, []

    def add(self, step: int, batch: dict) -> None:
        """The rows of a micro-step of optimizer step `step` (1-based: the step it trains towards)."""
        self.lines.append(json.dumps({"step": step, "rows": np.asarray(batch[ROW_COLUMN]).tolist(),
                                      "epochs": np.asarray(batch[EPOCH_COLUMN]).tolist()}))

    def flush(self, step: int) -> None:
        """At a checkpoint of `step`: one file per rank and checkpoint (object stores cannot append)."""
        if self.lines:
            storage.write_text(storage.join(self.dir, f"rank{self.rank:05d}_to_step{step:08d}.jsonl"),
                               "\n".join(self.lines) + "\n")
            self.lines = []


def read_lineage(run_dir: str) -> dict[int, list[tuple[int, int]]]:
    """step -> [(row, epoch), ...] over all ranks, from the last attempt that trained the step: what the run's
    final weights were trained on."""
    fs, root = storage.filesystem(storage.join(run_dir, TRACE_DIR))
    by_step: dict[int, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
        if info.type != pafs.FileType.File or not info.base_name.endswith(".jsonl"):
            continue
        attempt = info.path.rsplit("/", 2)[-2]
        with fs.open_input_stream(info.path) as f:
            for line in f.read().decode().splitlines():
                rec = json.loads(line)
                by_step[rec["step"]][attempt].extend(zip(rec["rows"], rec["epochs"]))
    return {step: attempts[max(attempts)] for step, attempts in sorted(by_step.items())}
