"""Driver for tests/test_elastic.py and benchmarks/elastic.py, run as its own process (it needs its own multi-node
cluster): an elastic run (`scaling.num_workers: [1, 2]`) on a head without CPUs and one worker node that holds one
training worker (ray.cluster_utils.Cluster, one shared storage dir). Once a checkpoint at step GROW_AT or later is
complete, a second node joins (the group grows to 2 workers); DRAIN_AFTER steps after the group trains at 2, that
node's spot watcher (raydiff.spot_watcher, polling a loopback stand-in of AWS's instance metadata) sees a reclaim
scheduled DEADLINE_S seconds ahead and drains the node with a preemption reason (`ray drain-node`, as the autoscaler
does before a spot reclaim); once the checkpoint raydiff announces for the notice is complete, the node is removed
(the reclaim). The group restarts on the first node and finishes.

Prints one line `[elastic] {json}` with what happened and when (the test asserts on the steps, the benchmark reports
the times), then the run directory.

Usage: python tests/elastic_run.py STORAGE GROW_AT DRAIN_AFTER DEADLINE_S [key=value ...]
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import threading
import time

import pyarrow.fs as pafs
import ray
from ray.cluster_utils import Cluster

from raydiff import config as C
from raydiff.train.checkpoint import STATE_FILE, IncompleteCheckpoint, check_complete
from raydiff.train.driver import run_training
from raydiff.train.metrics_log import read_metrics

from fake_metadata import Metadata, iso, serving

NODE_CPUS = 3  # one worker of scaling.cpus_per_worker=2, and a CPU for its data tasks
JIT_LINE = re.compile(r"preemption notice: .* saving a checkpoint at step (\d+)")


class Watched:
    """This process's stdout, where Ray prints every worker's lines: passed through, and watched for raydiff's line
    announcing the just-in-time checkpoint."""

    def __init__(self, stream):
        self.stream, self.jit_step = stream, None

    def write(self, text: str) -> int:
        found = JIT_LINE.search(text)
        if found:
            self.jit_step = int(found[1])
        return self.stream.write(text)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def rows(metrics: str) -> list[dict]:
    return read_metrics(metrics) if os.path.exists(metrics) else []


def wait_for(condition, what: str, trainer: threading.Thread, timeout: float = 600.0):
    deadline = time.time() + timeout
    while time.time() < deadline and trainer.is_alive():
        found = condition()
        if found:
            return found
        time.sleep(0.1)
    raise RuntimeError(f"the run ended or {timeout:.0f} s passed before {what}")


def complete_checkpoints(run_dir: str) -> dict[str, int]:
    """{checkpoint dir: its step} of the complete checkpoints in the run directory."""
    found, fs = {}, pafs.LocalFileSystem()
    for path in glob.glob(os.path.join(run_dir, "checkpoint_*")):
        try:
            check_complete(fs, path)
            with open(os.path.join(path, STATE_FILE)) as f:
                found[path] = json.load(f)["step"]
        except (IncompleteCheckpoint, OSError, ValueError, KeyError):
            continue
    return found


def refresh_ray_view() -> None:
    """Ray Train's elastic policy sees the nodes through Ray Data's autoscaling coordinator, which looks at them every
    20 s: nudge it now, so that the group resizes within a second or two of a node joining or going, not up to 20 s
    later (on a real cluster a node takes minutes to boot; here a step takes a fraction of a second, and the run must
    not end before the grow). A Ray internal, used by this test driver only: without it, resizes just come later."""
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator)

        coordinator = get_or_create_autoscaling_coordinator()
        ray.get(coordinator.get_reserved_resources.remote("raydiff-elastic-test", recompute=True), timeout=30)
    except Exception as err:  # a nicety: the resize then waits for the coordinator's own tick
        print(f"[elastic] could not refresh the autoscaling coordinator ({err!r}); resizes come with its 20 s tick")


def registered(run_dir: str, checkpoint: str) -> bool:
    """Whether the Train controller has recorded the checkpoint (its snapshot on the storage names it)."""
    snapshot = os.path.join(run_dir, "checkpoint_manager_snapshot.json")
    try:
        with open(snapshot) as f:
            return os.path.basename(checkpoint) in f.read()
    except OSError:
        return False


def start_watcher(address: str, node_id: str, metadata_url: str) -> subprocess.Popen:
    """The spot watcher a GPU node runs (raydiff.spot_watcher, AWS mode), here against a loopback metadata server:
    on the reclaim notice it drains its node with `ray drain-node`, as the autoscaler does before a spot reclaim."""
    return subprocess.Popen([sys.executable, "-m", "raydiff.spot_watcher", "--cloud", "aws", "--node-id", node_id,
                             "--address", address, "--metadata-url", metadata_url, "--poll-s", "0.2",
                             "--margin-s", "0"])


def events(cluster: Cluster, cfg: C.Config, grow_at: int, drain_after: int, deadline_s: int, out: dict,
           trainer: threading.Thread, metadata: Metadata) -> None:
    run_dir = C.run_dir(cfg)
    metrics = os.path.join(run_dir, "metrics.jsonl")
    # After a checkpoint at 1 worker: the grown group re-shards it (and steps at 1 worker stay in the run).
    wait_for(lambda: any(s >= grow_at for s in complete_checkpoints(run_dir).values()), f"checkpoint {grow_at}",
             trainer)
    out["grow_at_step"], out["added_at"] = max(r["step"] for r in rows(metrics)), time.time()
    node = cluster.add_node(num_cpus=NODE_CPUS)
    watcher = start_watcher(cluster.address, node.node_id, metadata.url)
    refresh_ray_view()

    def at_2() -> list[dict]:
        seen = rows(metrics)
        out["steps_before_grow"] = max([out.get("steps_before_grow", 0)] +
                                       [r["step"] for r in seen if r.get("world_size") == 1])
        return [r for r in seen if r.get("world_size") == 2 and r["step"] > 0]

    grown = wait_for(at_2, "a step at 2 workers", trainer)
    out["first_step_at_2"], out["first_step_at_2_time"] = grown[0]["step"], grown[0]["time"]
    wait_for(lambda: any(r.get("world_size") == 2 and r["step"] >= grown[0]["step"] + drain_after
                         for r in rows(metrics)), f"{drain_after} steps at 2 workers", trainer)
    before = complete_checkpoints(run_dir)
    out["drain_at_step"], out["drained_at"] = max(r["step"] for r in rows(metrics)), time.time()
    # The cloud schedules the reclaim (the instance-action AWS shows ~2 minutes ahead); the watcher drains the node.
    metadata.set(action={"action": "terminate", "time": iso(time.time() + deadline_s + 1)})
    out["watcher_exit"] = watcher.wait(timeout=60)
    out["jit_step"] = jit = wait_for(lambda: sys.stdout.jit_step, "the preemption notice", trainer)
    (out["jit_checkpoint"],) = wait_for(lambda: [p for p, s in complete_checkpoints(run_dir).items()
                                                 if s == jit and p not in before], f"the checkpoint at {jit}", trainer)
    out["jit_durable_at"] = time.time()
    # The node goes at the deadline; here it is removed as soon as Ray Train's controller has registered the
    # checkpoint (what a restart restores from), or at the deadline if it never does: removing it when the files
    # are complete but not yet registered would restart from the previous checkpoint (seen under load).
    ends = out["drained_at"] + deadline_s
    wait_for(lambda: registered(run_dir, out["jit_checkpoint"]) or time.time() >= ends, "the deadline", trainer)
    out["jit_registered"] = registered(run_dir, out["jit_checkpoint"])
    # Killed, as the autoscaler's termination of a drained node: Ray records the death as a preemption (the drain's
    # reason). A node whose processes get SIGTERM is recorded as shut down on purpose, and the restart is then counted
    # against run.max_failures (docs/reliability.md).
    cluster.remove_node(node, allow_graceful=False)
    out["steps_at_removal"] = max(r["step"] for r in rows(metrics))  # none trained past the checkpoint: 0 lost
    wait_for(lambda: not any(n["NodeID"] == node.node_id and n["Alive"] for n in ray.nodes()), "the node's death",
             trainer)
    # Ray marks a killed node dead after missed health checks (~16 s): a group
    # start at the deadline before that still counts its CPUs and waits RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S; the
    # next start sees one node.
    refresh_ray_view()


def main() -> None:
    storage, grow_at, drain_after, deadline_s = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    cfg = C.load_config("tiny_cpu", [f"run.storage_path={storage}", "scaling.num_workers=[1,2]",
                                     "scaling.cpus_per_worker=2", *sys.argv[5:]])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    cluster.add_node(num_cpus=NODE_CPUS)
    sys.stdout = Watched(sys.stdout)
    ray.init(address=cluster.address)
    out: dict = {}

    def train() -> None:
        start = time.time()
        try:
            out["run_dir"] = run_training(cfg).run_dir
        except BaseException as err:  # reported by main
            out["error"] = repr(err)
        out["wall_s"] = time.time() - start

    # The run in a thread: Cluster.add_node must be called from the main thread.
    trainer = threading.Thread(target=train, daemon=True)
    trainer.start()
    try:
        with serving() as metadata:  # the cloud's instance metadata, which the grown node's spot watcher polls
            events(cluster, cfg, grow_at, drain_after, deadline_s, out, trainer, metadata)
        trainer.join()
        print(f"[elastic] {json.dumps(out)}", flush=True)
        if "error" in out:
            raise SystemExit(f"[elastic] the run failed: {out['error']}")
    finally:  # a failed run must not leave its nodes behind for the next ray.init on this machine to join
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
