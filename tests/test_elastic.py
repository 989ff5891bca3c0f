"""Elastic, spot-aware training (docs/reliability.md): the `scaling.num_workers: [min, max]` config, the global batch
policy (per-worker batch kept, LR scaled), the ranks' collective decision on a preemption notice (real gloo
processes), and one run on a real multi-node Ray cluster that grows, gets a preemption notice, checkpoints at the next
step and resumes from exactly that step on the node left."""

from __future__ import annotations

import collections
import itertools
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from raydiff import config as C
from raydiff.train import elastic
from raydiff.train.deepspeed_setup import build_lr_scheduler
from raydiff.train.row_trace import read_lineage

from exports import assert_export_matches_checkpoint, assert_generates

REPO = Path(__file__).resolve().parent.parent


def cfg_with(*overrides: str) -> C.Config:
    cfg = C.Config()
    for text in overrides:
        C.set_value(cfg, *C.parse_override(text))
    return C.validate(cfg)


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("text, workers", [("3", 3), ("[1, 4]", [1, 4]), ("1,4", [1, 4]), ("[2,2]", [2, 2])])
def test_num_workers_is_a_count_or_a_min_max_pair(text, workers):
    s = cfg_with(f"scaling.num_workers={text}").scaling
    assert s.num_workers == workers and s.elastic == isinstance(workers, list)
    assert (s.min_workers, s.max_workers) == ((workers, workers) if isinstance(workers, int) else tuple(workers))
    assert C.from_dict(cfg_with(f"scaling.num_workers={text}").to_dict()).scaling.num_workers == workers


@pytest.mark.parametrize("text, message", [("[4, 1]", "min <= max, got [4, 1]"), ("[1, 2, 3]", "got [1, 2, 3]"),
                                           ("[0, 2]", "must be > 0, got [0, 2]"), ("0", "must be > 0, got 0"),
                                           ("many", "must be an integer")])
def test_bad_num_workers_names_the_key(text, message):
    with pytest.raises(C.ConfigError, match=r"'scaling.num_workers'.*" + message.replace("[", r"\[")):
        cfg_with(f"scaling.num_workers={text}")


def test_elastic_scaling_config_reaches_ray_train():
    from raydiff.train.driver import run_cpus, scaling_config

    cfg = cfg_with("scaling.num_workers=[2,8]", "scaling.resize_interval_s=5")
    sc = scaling_config(cfg.scaling)
    assert sc.elasticity_enabled and (sc.min_workers, sc.max_workers) == (2, 8)
    assert sc.elastic_resize_monitor_interval_s == 5
    assert run_cpus(cfg) == run_cpus(cfg_with("scaling.num_workers=8"))  # a local Ray is sized for max
    assert not scaling_config(cfg_with("scaling.num_workers=3").scaling).elasticity_enabled


# ---------------------------------------------------------------- the global batch policy


def test_global_batch_follows_the_workers_and_the_lr_its_rule():
    cfg = cfg_with("scaling.num_workers=[1,4]", "train.batch_size=3", "train.grad_accum=2")
    assert [elastic.global_batch(cfg, w) for w in (1, 2, 4)] == [6, 12, 24]
    assert [elastic.lr_factor(cfg, w) for w in (1, 4)] == [0.5, 1.0]  # sqrt(1/4), sqrt(4/4)
    assert elastic.lr_factor(cfg_with("scaling.num_workers=[1,4]", "scaling.lr_scaling=linear"), 1) == 0.25
    assert elastic.lr_factor(cfg_with("scaling.num_workers=[1,4]", "scaling.lr_scaling=none"), 1) == 1.0
    assert elastic.lr_factor(cfg_with("scaling.num_workers=4"), 1) == 1.0  # a fixed run keeps its rate


def _scheduler(cfg: C.Config):
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([param], lr=cfg.optim.lr)
    return build_lr_scheduler(optimizer, cfg), optimizer, param


def test_a_restored_schedule_takes_the_peak_lr_of_the_new_world_size():
    """A checkpoint written at 4 workers, restored at 1: the warm-up continues where it was, at the new peak; and at
    an unchanged peak the rate is the very float the scheduler set (an unchanged world resumes bit for bit)."""
    cfg = cfg_with("scaling.num_workers=[1,4]", "optim.lr=0.01", "optim.warmup_steps=10")
    sched, opt, param = _scheduler(cfg)
    for _ in range(3):
        param.grad = torch.ones(2)
        opt.step()
        sched.step()
    saved_lr = opt.param_groups[0]["lr"]
    state = {"opt": opt.state_dict(), "sched": sched.state_dict()}

    restored, opt2, _ = _scheduler(cfg)
    opt2.load_state_dict(state["opt"])
    restored.load_state_dict(state["sched"])
    elastic.set_peak_lr(restored, 0.01 * elastic.lr_factor(cfg, 4))
    assert opt2.param_groups[0]["lr"] == saved_lr  # bit for bit
    elastic.set_peak_lr(restored, 0.01 * elastic.lr_factor(cfg, 1))
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.005 * 4 / 10)  # peak 0.01 x sqrt(1/4), warm-up step 3 of 10
    restored.step()
    assert restored.get_last_lr()[0] == pytest.approx(0.005 * 5 / 10)  # the schedule goes on from the new peak


# ---------------------------------------------------------------- the collective decision on a notice

# Each rank reads its own notice at each step boundary (arriving at different steps, as Ray's watcher hands them out)
# and every rank must take the same decisions, once per newly drained node.
DECIDE = textwrap.dedent("""
    import json, sys, time
    import torch.distributed as dist
    from ray.train import PreemptionInfo
    from raydiff.train.preemption import PreemptionWatch

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    now_ms = int(sys.argv[1])  # one clock for both ranks' deadlines
    one = {"node-a": [2]}
    two = {"node-a": [2], "node-b": [1]}
    # step -> this rank's notice (None: not arrived yet); rank 1 hears of node-a a step before rank 0 and with an
    # earlier deadline, node-b is drained at step 5 and rank 0 hears first; step 7 sees a short deadline on node-c.
    notices = {
        0: {3: (one, 600_000), 4: (one, 600_000), 5: (two, 600_000), 6: (two, 600_000)},
        1: {2: (one, 300_000), 3: (one, 300_000), 4: (one, 300_000), 6: (two, 300_000)},
    }[rank]
    notices.update({7: ({**two, "node-c": [0]}, 1_000)})
    step = 0
    def read():
        got = notices.get(step)
        return PreemptionInfo(deadline_ms=now_ms + got[1], preempted_node_to_ranks=got[0]) if got else None
    watch = PreemptionWatch(rank, read_notice=read)
    decisions = {}
    for step in range(1, 9):
        notice = watch.check(save_s=2.0 + rank)  # rank 1's last checkpoint took 3 s
        if notice is not None:
            decisions[step] = [notice.nodes, notice.deadline_ms - now_ms, notice.need_s, notice.fits,
                               notice.left_s]
    print("DECISIONS", json.dumps(decisions))
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ranks_agree_on_the_step_once_per_drained_node_and_on_whether_it_fits():
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "PYTHONPATH": str(REPO)}
    now_ms = str(int(time.time() * 1000))
    procs = [subprocess.Popen([sys.executable, "-c", DECIDE, now_ms], env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    decisions = [json.loads(next(x for x in out.splitlines() if x.startswith("DECISIONS")).split(" ", 1)[1])
                 for out, _ in outputs]
    assert decisions[0] == decisions[1]  # the same steps and numbers on every rank (the time left: rank 0's clock)
    # node-a at step 2 (rank 1 heard first), once; node-b at step 5 (rank 0 heard first, and only rank 0 has a
    # notice then); node-c at step 7 with under 1 s left: the slowest rank's 3 s checkpoint does not fit.
    assert {step: d[:4] for step, d in decisions[0].items()} == {
        "2": [1, 300_000, 3.0, True], "5": [2, 600_000, 3.0, True], "7": [3, 1_000, 3.0, False]}
    assert decisions[0]["2"][4] < 300 and decisions[0]["7"][4] < 1


# ---------------------------------------------------------------- the run


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_elastic_run_grows_checkpoints_on_a_preemption_notice_and_resumes_from_that_step(tmp_path):
    """An elastic run ([1, 2] workers, run.max_failures 0) on a head and one worker node (tests/elastic_run.py, in its
    own process): once the step-5 checkpoint is written a second node joins and the group grows to 2 workers (the
    checkpoint re-sharded); after 2 steps at 2 workers the cloud schedules that node's reclaim and its spot watcher
    (raydiff.spot_watcher) drains it with a preemption reason (`ray drain-node`):
    every rank checkpoints at the step boundary where the notice reaches them and trains no further; the node is
    removed (killed, as the autoscaler does), and the group resumes on 1 worker from exactly that step, without using
    up run.max_failures. Every step is in metrics.jsonl once, with
    its world size and global batch; the samples counted are those global batches; the export is the last checkpoint
    and generates."""
    steps = 60
    # Ray Train polls for drained nodes every second; a group start that waits on CPUs Ray no longer has gives up
    # after 10 s and tries the size it then sees.
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1",
           "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "elastic_run.py"), str(tmp_path), "5", "2", "12",
                           "run.name=e", f"train.max_steps={steps}", "checkpoint.every_n_steps=5",
                           "validation.every_n_steps=1000", "validation.exposure_bias_denoising_steps=0",
                           "validation.prompts=[]", "logging.sample_prompts=[]", "data.demo_num_images=30",
                           "data.val_max_samples=2", "scaling.resize_interval_s=1", "data.record_rows=true"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=850)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("[elastic] {"))[len("[elastic] "):])
    rows = [json.loads(x) for x in (tmp_path / "e" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(steps + 1))  # every step once: none lost, none repeated
    assert out["watcher_exit"] == 0  # the node's spot watcher drained it once, with the notice's deadline:
    assert 8 <= int(re.search(r"being drained, deadline in (\d+) s", proc.stdout)[1]) <= 12
    jit = out["jit_step"]
    assert out["drain_at_step"] < jit < steps  # at a step boundary after the notice
    assert out["jit_registered"]  # Ray Train recorded it before the deadline
    assert out["steps_at_removal"] == jit  # no step trained past it: none lost at the restart
    assert f"resumed from {out['jit_checkpoint']} at step {jit}" in proc.stdout
    worlds = [r["world_size"] for r in rows]
    assert [w for w, _ in itertools.groupby(worlds)] == [1, 2, 1] and worlds[jit] == 2 and worlds[jit + 1] == 1
    assert all(r["global_batch"] == 4 * r["world_size"] for r in rows)  # train.batch_size 4 per worker
    assert_each_epoch_read_every_row_once(read_lineage(str(tmp_path / "e")), rows)
    final = sorted(p for p in (tmp_path / "e").glob("checkpoint_*") if p.is_dir())[-1]
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["step"] == steps and state["samples_seen"] == sum(r["global_batch"] for r in rows[1:])
    assert_export_matches_checkpoint(str(tmp_path / "e" / "final"), str(final))
    assert_generates(str(tmp_path / "e" / "final"))


def assert_each_epoch_read_every_row_once(lineage: dict, rows: list[dict]) -> None:
    """The rows the final weights were trained on (data.record_rows), across the grow and the shrink: each step's
    global batch, and every complete epoch reads each training row exactly once (the last, partial one: none
    twice)."""
    assert sorted(lineage) == [r["step"] for r in rows[1:]]
    assert all(len(lineage[r["step"]]) == r["global_batch"] for r in rows[1:])
    by_epoch = collections.defaultdict(list)
    for seen in lineage.values():
        for row, epoch in seen:
            by_epoch[epoch].append(row)
    epochs = sorted(by_epoch)
    assert len(epochs) >= 3, epochs
    train_rows = sorted(by_epoch[epochs[0]])
    assert len(set(train_rows)) == len(train_rows) > 20  # 30 demo images, at most 2 held out
    for epoch in epochs[1:-1]:
        assert sorted(by_epoch[epoch]) == train_rows, f"epoch {epoch}"
    last = by_epoch[epochs[-1]]
    assert len(set(last)) == len(last) and set(last) <= set(train_rows)

