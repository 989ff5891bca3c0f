"""Run-wide data-quality counters: skipped rows, upscaled images, null captions.

Preprocessing runs in Ray Data tasks, not in the training workers, so the counts live in one small named actor:
preprocessors add to it (at most once per batch, and only when there is something to count; they wait for the
add so a count is in before its batch is handed on), training workers read it when they report metrics.

A counter counts **distinct rows** (their global row in the source, raydiff.data.manifest): a bad row met again in
a later epoch counts once. Each skipped row is written once, with its reason, to ``<run>/data_skipped.jsonl``.
"""

from __future__ import annotations

import json
import logging
import uuid

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

logger = logging.getLogger(__name__)

NAMESPACE = "raydiff"
COUNTERS = ("data_skipped", "data_upscaled", "data_null_captions")
MAX_EXAMPLES = 5  # first skipped rows kept (and printed) with their reason
SKIPPED_LOG = "data_skipped.jsonl"


@ray.remote(num_cpus=0)
class DataStats:
    def __init__(self, skipped_log: str | None = None) -> None:
        self.rows: dict[str, set[int]] = {k: set() for k in COUNTERS}
        self.unplaced = dict.fromkeys(COUNTERS, 0)  # counts without a row (a cache build's, read from its manifest)
        self.examples: list[str] = []
        self.skipped_log, self.skipped, self.unsaved = skipped_log, [], False

    def add(self, counts: dict[str, list[int] | int], skipped: list[dict]) -> None:
        """``counts``: the rows counted per counter (row -1: place unknown, counted as new), or a plain number."""
        for k, v in counts.items():
            if isinstance(v, int):
                self.unplaced[k] = self.unplaced.get(k, 0) + v
                continue
            placed = [int(r) for r in v if r >= 0]
            self.unplaced[k] = self.unplaced.get(k, 0) + len(v) - len(placed)
            self.rows.setdefault(k, set()).update(placed)
        logged = {r["row"] for r in self.skipped if r["row"] >= 0}
        for record in skipped:
            if record["row"] >= 0 and record["row"] in logged:
                continue
            logged.add(record["row"])
            self.skipped.append(record)
            self.unsaved = True
            if len(self.examples) < MAX_EXAMPLES:
                self.examples.append(f"{record['what']}: {record['reason']}")
                print(f"[raydiff] data: skipped {self.examples[-1]}", flush=True)  # reaches the driver log

    def snapshot(self) -> dict:
        if self.unsaved and self.skipped_log:
            from raydiff import storage

            storage.write_text(self.skipped_log, "".join(json.dumps(r) + "\n" for r in self.skipped))
            self.unsaved = False
        counts = {k: len(self.rows.get(k, ())) + self.unplaced.get(k, 0) for k in COUNTERS}
        return {**counts, "examples": list(self.examples)}


_HANDLES: dict = {}  # per process; in the creating process this also keeps the actor alive (Ray kills an
# actor, named or not, once no handle to it is left)


def create(run_dir: str | None = None) -> str:
    """Start a fresh counter actor for one run and return its name (it lives as long as the driver). With
    ``run_dir`` it writes the skipped rows to ``<run_dir>/data_skipped.jsonl``.

    It is pinned to the driver's node: placed anywhere else, the loss of that node would leave a restarted run with
    a dead counter that every preprocessor and worker calls; if the driver's node goes, the run goes with it anyway."""
    name = f"data-stats-{uuid.uuid4().hex[:12]}"
    on_driver_node = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    log = f"{run_dir.rstrip('/')}/{SKIPPED_LOG}" if run_dir else None
    _HANDLES[name] = DataStats.options(name=name, namespace=NAMESPACE,
                                       scheduling_strategy=on_driver_node).remote(log)
    return name


def _actor(name: str):
    if name not in _HANDLES:
        _HANDLES[name] = ray.get_actor(name, namespace=NAMESPACE)
    return _HANDLES[name]


def record(name: str | None, counts: dict[str, list[int] | int], skipped: list[dict]) -> None:
    """Add counted rows (or plain counts) and skipped-row records ({row, file, what, reason})."""
    if name and (any(counts.values()) or skipped):
        ray.get(_actor(name).add.remote(counts, skipped))


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
