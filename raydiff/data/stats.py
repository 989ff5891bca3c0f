"""Run-wide data-quality counters: skipped rows, upscaled images, null captions.

Preprocessing runs in Ray Data tasks, not in the training workers, so the counts live in one small named actor:
preprocessors add to it (at most once per batch, and only when there is something to count; they wait for the
add so a count is in before its batch is handed on), training workers read it when they report metrics.

A counter counts **distinct rows** (their global row in the source, raydiff.data.manifest): a bad row met again in
a later epoch, or after a relaunch, counts once. Each skipped row is written once, with its reason, to
``<run>/data_skipped.jsonl``.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import uuid

import numpy as np
import pyarrow.fs as pafs
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from raydiff import storage

logger = logging.getLogger(__name__)

NAMESPACE = "raydiff"
COUNTERS = ("data_skipped", "data_upscaled", "data_null_captions")
MAX_EXAMPLES = 5  # first skipped rows kept (and printed) with their reason
SKIPPED_LOG = "data_skipped.jsonl"  # in the run directory: one line per skipped row, with its reason
STATE_FILE = "data_stats.npz"  # in the run directory: the counted rows, for a relaunch


@ray.remote(num_cpus=0)
class DataStats:
    """Counted rows as one bit per source row (1.25 MB per counter at 10 M rows), saved to the run directory when
    they change, so a relaunched run goes on counting distinct rows instead of starting over."""

    def __init__(self, num_rows: int = 0, run_dir: tuple | None = None) -> None:
        """``run_dir``: (pyarrow filesystem, path), resolved by the driver: its endpoint and credentials travel
        pickled (this actor's process may never have seen the AWS_* variables)."""
        self.bits = {k: np.zeros((num_rows + 7) // 8, np.uint8) for k in COUNTERS}
        self.unplaced = dict.fromkeys(COUNTERS, 0)  # counts without a row (a cache build's, from its manifest)
        self.examples: list[str] = []
        self.skipped: list[dict] = []
        self.run_dir, self.unsaved, self.saver = run_dir, False, None
        if run_dir:
            self._load()

    def add(self, counts: dict[str, list[int] | int], skipped: list[dict]) -> None:
        """``counts``: the rows counted per counter (row -1: place unknown, counted as new), or a plain number."""
        for k, v in counts.items():
            if isinstance(v, int):
                self.unplaced[k] = self.unplaced.get(k, 0) + v
                continue
            rows = np.asarray(v, dtype=np.int64)
            placed = rows[(rows >= 0) & (rows < len(self.bits[k]) * 8)]
            self.unplaced[k] += len(rows) - len(placed)
            np.bitwise_or.at(self.bits[k], placed >> 3, (1 << (placed & 7)).astype(np.uint8))
            self.unsaved = True
        logged = {r["row"] for r in self.skipped}
        for record in skipped:
            if record["row"] >= 0 and record["row"] in logged:
                continue
            logged.add(record["row"])
            self.skipped.append(record)
            if len(self.examples) < MAX_EXAMPLES:
                self.examples.append(f"{record['what']}: {record['reason']}")
                logger.info("data: skipped %s", self.examples[-1])  # reaches the driver log

    def known_skipped(self, rows: np.ndarray) -> np.ndarray:
        """Those of ``rows`` already found unusable: read tasks drop them before decoding (the stream is the same
        either way). O(len(rows)): a bit lookup, not the whole list."""
        bits = self.bits["data_skipped"]
        rows = np.asarray(rows, dtype=np.int64)
        rows = rows[(rows >= 0) & (rows < len(bits) * 8)]
        return rows[(bits[rows >> 3] >> (rows & 7)) & 1 == 1]

    def snapshot(self) -> dict:
        """The counts. Called by rank 0 at report steps, so the counted rows are saved off the caller's path: a
        thread writes a copy (compressed: a few KB for a few bad rows, ≤ 3.75 MB at 10 M rows)."""
        if self.unsaved and self.run_dir and not (self.saver and self.saver.is_alive()):
            state = ({k: v.copy() for k, v in self.bits.items()}, dict(self.unplaced), list(self.skipped))
            self.saver = threading.Thread(target=self._save, args=state, daemon=True)
            self.saver.start()
            self.unsaved = False
        counts = {k: int(np.unpackbits(self.bits[k]).sum()) + self.unplaced[k] for k in COUNTERS}
        return {**counts, "examples": list(self.examples)}

    def _save(self, bits: dict, unplaced: dict, skipped: list[dict]) -> None:
        fs, root = self.run_dir
        buf = io.BytesIO()
        np.savez_compressed(buf, **bits, unplaced=np.array([unplaced[k] for k in COUNTERS]))
        with fs.open_output_stream(f"{root}/{STATE_FILE}") as f:
            f.write(buf.getvalue())
        with fs.open_output_stream(f"{root}/{SKIPPED_LOG}") as f:
            f.write("".join(json.dumps(r) + "\n" for r in skipped).encode())

    def flush(self) -> None:
        """Wait for the latest save (the end of a run, tests)."""
        if self.saver:
            self.saver.join()
        if self.unsaved and self.run_dir:
            self.snapshot()
            self.saver.join()

    def _load(self) -> None:
        fs, root = self.run_dir
        if fs.get_file_info(f"{root}/{STATE_FILE}").type == pafs.FileType.NotFound:
            return
        with fs.open_input_file(f"{root}/{STATE_FILE}") as f, np.load(io.BytesIO(f.read())) as z:
            if all(z[k].shape == self.bits[k].shape for k in COUNTERS):
                self.bits = {k: z[k].copy() for k in COUNTERS}
                self.unplaced = dict(zip(COUNTERS, z["unplaced"].tolist()))
        if fs.get_file_info(f"{root}/{SKIPPED_LOG}").type != pafs.FileType.NotFound:
            with fs.open_input_stream(f"{root}/{SKIPPED_LOG}") as f:
                self.skipped = [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]
            self.examples = [f"{r['what']}: {r['reason']}" for r in self.skipped[:MAX_EXAMPLES]]


_HANDLES: dict = {}  # per process; in the creating process this also keeps the actor alive (Ray kills an
# actor, named or not, once no handle to it is left)


def create(num_rows: int = 0, run_dir: str | None = None) -> str:
    """Start a counter actor for one run of a source of ``num_rows`` rows and return its name (it lives as long as
    the driver). With ``run_dir`` it keeps its counts there (a relaunch continues them) and writes the skipped
    rows to ``<run_dir>/data_skipped.jsonl``.

    It is pinned to the driver's node: placed anywhere else, the loss of that node would leave a restarted run with
    a dead counter that every preprocessor and worker calls; if the driver's node goes, the run goes with it anyway."""
    name = f"data-stats-{uuid.uuid4().hex[:12]}"
    where = None
    if run_dir:
        where = storage.filesystem(run_dir)
    on_driver_node = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    _HANDLES[name] = DataStats.options(name=name, namespace=NAMESPACE,
                                       scheduling_strategy=on_driver_node).remote(num_rows, where)
    return name


def _actor(name: str):
    if name not in _HANDLES:
        _HANDLES[name] = ray.get_actor(name, namespace=NAMESPACE)
    return _HANDLES[name]


def record(name: str | None, counts: dict[str, list[int] | int], skipped: list[dict]) -> None:
    """Add counted rows (or plain counts) and skipped-row records ({row, file, what, reason})."""
    if name and (any(counts.values()) or skipped):
        ray.get(_actor(name).add.remote(counts, skipped))


def known_skipped(name: str | None, rows: np.ndarray) -> np.ndarray:
    """Those of ``rows`` this run already skipped (empty without an actor)."""
    if not name:
        return np.zeros(0, np.int64)
    return ray.get(_actor(name).known_skipped.remote(np.asarray(rows, dtype=np.int64)))


def flush_all() -> None:
    """Wait until the counter actors this process created have saved their rows (end of a run, stopped or not)."""
    for name, actor in list(_HANDLES.items()):
        try:
            ray.get(actor.flush.remote())
        except ray.exceptions.RayError:  # a run that failed may have lost its actor with its node
            logger.warning("data counters %s could not be saved", name)


def snapshot(name: str | None) -> dict:
    """Counts so far (all zero when no actor is configured)."""
    if not name:
        return {**dict.fromkeys(COUNTERS, 0), "examples": []}
    return ray.get(_actor(name).snapshot.remote())


def metrics(name: str | None) -> dict[str, int]:
    """The counters as training metrics."""
    snap = snapshot(name)
    return {k: snap[k] for k in COUNTERS}


def no_data_error(name: str | None, split: str) -> RuntimeError:
    """The error for a split that produced no samples at all, with what the data path skipped and why."""
    snap = snapshot(name)
    why = "; ".join(snap["examples"]) or "no rows were skipped: the source or the split is empty"
    return RuntimeError(f"the {split} split produced no samples ({snap['data_skipped']} rows skipped; first: {why}); "
                        "check data.source, data.on_error and data.max_aspect_ratio")
