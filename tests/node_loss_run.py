"""Driver for tests/test_resume.py's worker- and node-loss test, run as its own process (it needs its own multi-node
cluster): a head without CPUs and three worker nodes sharing one storage dir. Once the run has passed KILL_AT, one
training worker is SIGKILLed (before any checkpoint: the group restarts from scratch); once the restarted group has
passed REMOVE_AT, the node hosting a training worker is removed (the group restores the last checkpoint on the nodes
left). Prints what it did and the run directory on success.

Usage: python tests/node_loss_run.py STORAGE KILL_AT REMOVE_AT [key=value ...]
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import psutil
import ray
from ray.cluster_utils import Cluster

from raydiff import config as C
from raydiff.train.driver import run_training
from raydiff.train.metrics_log import read_metrics


def node_with_a_training_worker(nodes):
    for node in nodes:
        raylet = node.all_processes["raylet"][0].process.pid
        for child in psutil.Process(raylet).children(recursive=True):
            try:
                if any("RayTrainWorker" in part for part in child.cmdline()):
                    return node
            except psutil.Error:
                continue
    raise RuntimeError("no node hosts a training worker")


def training_workers(nodes) -> list[psutil.Process]:
    found = []
    for node in nodes:
        raylet = node.all_processes["raylet"][0].process.pid
        for child in psutil.Process(raylet).children(recursive=True):
            try:
                if any("RayTrainWorker" in part for part in child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE:
                    found.append(child)
            except psutil.Error:
                continue
    return found


def passed(metrics: str, step: int) -> bool:
    return os.path.exists(metrics) and any(r["step"] >= step for r in read_metrics(metrics))


def main() -> None:
    storage, kill_at, remove_at, overrides = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
    cfg = C.load_config("tiny_cpu", [f"run.storage_path={storage}", *overrides])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=3) for _ in range(3)]  # 2 are enough for the run: C.run_cpus of 2 workers
    ray.init(address=cluster.address)
    metrics = os.path.join(C.run_dir(cfg), "metrics.jsonl")

    def kill_a_worker_then_remove_a_node() -> None:
        while not passed(metrics, kill_at):
            time.sleep(0.2)
        killed = training_workers(nodes)[-1]
        killed.send_signal(signal.SIGKILL)
        print(f"[node-loss] killed worker {killed.pid} at step >= {kill_at}", flush=True)
        # The restarted group rewrites metrics.jsonl from its restored step: wait for its new workers first.
        while len([p for p in training_workers(nodes) if p.pid != killed.pid]) < 2:
            time.sleep(0.2)
        while not passed(metrics, remove_at):
            time.sleep(0.2)
        node = node_with_a_training_worker(nodes)
        cluster.remove_node(node, allow_graceful=False)
        print(f"[node-loss] removed node {node.node_id} at step >= {remove_at}", flush=True)

    threading.Thread(target=kill_a_worker_then_remove_a_node, daemon=True).start()
    try:
        out = run_training(cfg)
        print(f"[node-loss] finished {out.run_dir}", flush=True)
    finally:  # a failed run must not leave its nodes behind for the next ray.init on this machine to join
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
