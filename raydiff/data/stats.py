"""Run-wide data-quality counters: skipped rows, upscaled images, null captions.

Preprocessing runs in Ray Data actors, not in the training workers, so the counts live in one small named actor:
preprocessors add to it (at most once per batch, and only when there is something to count; they wait for the
add so a count is in before its batch is handed on), training workers read it when they report metrics.
The counts are cumulative over the run: with per-epoch re-preprocessing a bad row is counted once per pass.
"""

from __future__ import annotations

import logging
import uuid

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

logger = logging.getLogger(__name__)

NAMESPACE = "raydiff"
COUNTERS = ("data_skipped", "data_upscaled", "data_null_captions")
MAX_EXAMPLES = 5  # first skipped rows kept (and logged) with their reason


@ray.remote(num_cpus=0)
class DataStats:
    def __init__(self) -> None:
        self.counts = dict.fromkeys(COUNTERS, 0)
        self.examples: list[str] = []

    def add(self, counts: dict[str, int], examples: list[str]) -> None:
        for k, v in counts.items():
            self.counts[k] = self.counts.get(k, 0) + int(v)
        for e in examples[: MAX_EXAMPLES - len(self.examples)]:
            self.examples.append(e)
            print(f"[raydiff] data: skipped {e}", flush=True)  # reaches the driver log

    def snapshot(self) -> dict:
        return {**self.counts, "examples": list(self.examples)}


_HANDLES: dict = {}  # per process; in the creating process this also keeps the actor alive (Ray kills an
# actor, named or not, once no handle to it is left)


def create() -> str:
    """Start a fresh counter actor for one run and return its name (it lives as long as the driver).

    It is pinned to the driver's node: placed anywhere else, the loss of that node would leave a restarted run with
    a dead counter that every preprocessor and worker calls; if the driver's node goes, the run goes with it anyway."""
    name = f"data-stats-{uuid.uuid4().hex[:12]}"
    on_driver_node = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    _HANDLES[name] = DataStats.options(name=name, namespace=NAMESPACE, scheduling_strategy=on_driver_node).remote()
    return name


def _actor(name: str):
    if name not in _HANDLES:
        _HANDLES[name] = ray.get_actor(name, namespace=NAMESPACE)
    return _HANDLES[name]


def record(name: str | None, counts: dict[str, int], examples: list[str]) -> None:
    if name and (any(counts.values()) or examples):
        ray.get(_actor(name).add.remote(counts, examples))


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
