"""Exact resume on a real local Ray cluster: a run that loses a worker (SIGKILL, before any checkpoint) and then a
node, whose driver is SIGKILLed and relaunched, whose latest checkpoint is torn, or that resumes on fewer workers ends
with the weights of a run that never broke. One unbroken run per ZeRO stage serves as every reference."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from raydiff import config as C
from raydiff.train.driver import RunOutputs, run_training
from raydiff.train.metrics_log import read_metrics

from exports import assert_export_matches_checkpoint, assert_generates, checkpoint_fp32_weights

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent
STEPS = 4


def overrides(storage, name: str, zero: int, *extra: str) -> list[str]:
    # 30 demo images, at most 2 held out: the 4 steps of 2 workers x 4 rows cross an epoch boundary. ZeRO-3 runs read
    # a latent cache (data.precompute), built once by the first of them: its unbroken run is also the suite's check
    # that ZeRO-3 from a cache trains and exports (test_zero3_reference_run_...). ZeRO-2 runs train on aspect-ratio
    # buckets, so their kills and relaunches also prove that rows waiting in a bucket at a checkpoint are not lost.
    latents = ["data.precompute=latents", f"data.cache_dir={os.path.join(os.environ['RAYDIFF_CACHE'], 'latents')}"]
    buckets = ["data.buckets=[64x64,80x48,48x80]"]
    return [f"run.storage_path={storage}", f"run.name={name}", f"train.max_steps={STEPS}",
            f"deepspeed.zero_stage={zero}",
            "checkpoint.every_n_steps=2", "checkpoint.keep=2", "validation.every_n_steps=2",
            "validation.exposure_bias_denoising_steps=0", "validation.prompts=[]", "logging.sample_prompts=[]",
            "data.demo_num_images=30", "data.val_max_samples=2", "run.max_failures=1",
            *(latents if zero == 3 else buckets), *extra]


def final_unet(run_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(run_dir, "final", "unet", "diffusion_pytorch_model.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, f"weights differ from the unbroken run by up to {worst}"


def losses(run_dir) -> dict[int, float]:
    """step -> training loss; asserts each step is logged once (a resumed run never double-counts a step)."""
    rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    steps = [r["step"] for r in rows]
    assert steps == list(range(0, STEPS + 1)), steps
    return {r["step"]: r["loss"] for r in rows if r["step"] > 0}


@dataclass
class Reference:
    out: RunOutputs
    cfg: C.Config
    unet: dict[str, torch.Tensor]  # the final export's weights
    losses: dict[int, float]


@pytest.fixture(scope="module")
def unbroken(ray_local, tmp_path_factory):
    """Runs that never broke, per ZeRO stage, run once for the module."""
    runs = {}

    def get(zero: int) -> Reference:
        if zero not in runs:
            cfg = C.load_config("tiny_cpu", overrides(tmp_path_factory.mktemp("unbroken"), "u", zero))
            out = run_training(cfg)
            runs[zero] = Reference(out, cfg, final_unet(out.run_dir), losses(out.run_dir))
        return runs[zero]

    return get


def wait_for_step(run_dir: str, step: int, timeout: float = 900) -> None:
    path = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path) and any(r["step"] >= step for r in read_metrics(path)):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{path} did not reach step {step}")


def test_zero3_reference_run_trains_from_a_latent_cache_and_exports_its_checkpoint(unbroken):
    """The ZeRO-3 reference (2 workers, shards of weights and optimizer) reads its rows from a latent cache built once
    (raydiff.data.precompute), must still make val_loss fall, and exports what its last checkpoint holds."""
    ref = unbroken(3)
    assert len(glob.glob(os.path.join(ref.cfg.data.cache_dir, "*", "cache.json"))) == 1  # one complete cache
    rows = read_metrics(ref.out.metrics_path)
    vals = [r["val_loss"] for r in rows if r.get("val_loss") is not None]
    assert len(vals) == 3 and vals[-1] < vals[0], vals  # steps 0, 2 and 4
    assert all(r["gamma"] == 0.1 for r in rows)
    assert {"loss", "lr", "samples_per_s"} <= set(rows[-1])
    assert C.load_config(os.path.join(ref.out.run_dir, "config.yaml")) == ref.cfg
    assert_export_matches_checkpoint(ref.out.model_dir, ref.out.checkpoint_path)
    assert_generates(ref.out.model_dir)


def driver_command(storage, name: str) -> list[str]:
    sets = [arg for o in overrides(storage, name, 2, "run.max_failures=0") for arg in ("--set", o)]
    return [sys.executable, "-m", "raydiff.train", "--config", "tiny_cpu", *sets]


@pytest.mark.timeout(2400)
def test_driver_kill_relaunch_then_torn_checkpoint_on_a_shrunk_world(unbroken, ray_local, tmp_path, capfd):
    base_unet, base_losses = unbroken(2).unet, unbroken(2).losses
    run_dir = str(tmp_path / "d")
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}

    # 1. The driver is SIGKILLed mid-run; the same command again resumes the same run and ends where an unbroken
    #    run ends.
    driver = subprocess.Popen(driver_command(tmp_path, "d"), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait_for_step(run_dir, 3)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=60)
    finally:
        driver.kill()
    assert not os.path.exists(os.path.join(run_dir, "final")), "the driver was killed after the run finished"
    relaunch = subprocess.run(driver_command(tmp_path, "d"), cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=1200)
    assert relaunch.returncode == 0, relaunch.stdout[-3000:] + relaunch.stderr[-3000:]
    assert "resumed from" in relaunch.stdout + relaunch.stderr
    assert_same_weights(final_unet(run_dir), base_unet)
    assert losses(run_dir) == base_losses

    # 2. The newest checkpoint is torn (a shard cut short) and the run goes on with 1 worker instead of 2 for two
    #    more steps: the previous complete checkpoint is used, with a warning, re-sharded once (DeepSpeed universal
    #    format) with every weight exact, and training goes on from it. (Part 1 showed that resuming from that
    #    checkpoint on the same layout ends exactly like the unbroken run.)
    checkpoints = sorted(p for p in glob.glob(os.path.join(run_dir, "checkpoint_*")) if os.path.isdir(p))
    assert len(checkpoints) == 2  # checkpoint.keep
    shard = sorted(glob.glob(os.path.join(checkpoints[-1], "deepspeed", "*optim_states.pt")))[-1]
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    longer = C.load_config("tiny_cpu", overrides(tmp_path, "d", 2, "scaling.num_workers=1", "checkpoint.keep=4",
                                                 f"train.max_steps={STEPS + 2}"))
    run_training(longer)  # keep=4: the step-2 checkpoint and its conversion stay for the checks below
    out = capfd.readouterr().out
    assert f"checkpoint {checkpoints[-1]} is incomplete" in out and os.path.basename(shard) in out
    assert f"resumed from {checkpoints[0]} at step 2" in out
    assert "resuming on 1: converting it" in out
    (universal,) = glob.glob(os.path.join(run_dir, "checkpoint_*", "universal", "deepspeed", "zero"))
    assert universal.startswith(checkpoints[0])
    step2 = checkpoint_fp32_weights(checkpoints[0])  # DeepSpeed's own consolidation of the same shards
    assert_same_weights({k: torch.load(os.path.join(universal, k, "fp32.pt"), weights_only=False)["param"]
                         for k in step2}, step2)
    rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(STEPS + 3))  # cut back to step 2, then 3..6 once
    assert [r["world_size"] for r in rows if r["step"] > 2] == [1, 1, 1, 1]
    assert any((final_unet(run_dir)[k] != base_unet[k]).any() for k in base_unet)  # it trained past the checkpoint


@pytest.mark.timeout(1800)
def test_killed_worker_then_lost_node_end_like_the_unbroken_run(unbroken, tmp_path):
    """ZeRO-3 (every rank holds a shard of weights and optimizer) on a head and three worker nodes
    (ray.cluster_utils.Cluster, in its own process): a training worker is SIGKILLed after step 1, before the first
    checkpoint (the group restarts from scratch), then the node hosting a training worker is removed after step 3
    (the two nodes left restore the step-2 checkpoint). The run ends with the weights and losses of the unbroken one.
    The ZeRO-2 restores are the driver-kill test's."""
    base = unbroken(3)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "node_loss_run.py"), str(tmp_path), "1", "3",
                           *overrides(tmp_path, "n", 3, "run.max_failures=2")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[node-loss] killed worker" in proc.stdout and "[node-loss] removed node" in proc.stdout
    assert_same_weights(final_unet(tmp_path / "n"), base.unet)
    assert losses(tmp_path / "n") == base.losses
