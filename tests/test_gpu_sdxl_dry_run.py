"""benchmarks/gpu_sdxl.py on a machine without a GPU: the full SDXL components build (on the meta device, no
memory) with the released models' parameter counts and SDPA attention, GPU mode refuses clearly, and `--dry-run`
times raydiff's own TrainStep through a real one-process DeepSpeed engine (bf16, ZeRO-2) at toy size."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_sdxl.py"


@pytest.fixture(scope="module")
def gpu_sdxl():
    spec = importlib.util.spec_from_file_location("gpu_sdxl", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_sdxl"] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_sdxl"]


def test_dry_run_builds_the_full_sdxl_components(gpu_sdxl):
    # The FLOP count (--dry-run prints 20.2 TFLOP per image per UNet step, 25.2 with the encoders) is left out: it
    # doubles the test's time.
    result = gpu_sdxl.meta_check(batch=1, flops=False)
    # Exactly SDXL base 1.0's UNet, VAE and text encoders: a wrong block, head, width or projection changes a count.
    assert result["params"] == gpu_sdxl.SDXL_PARAMS == {
        "unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840}
    assert result["attention_processors"] == ["AttnProcessor2_0"]


def test_gpu_mode_fails_clearly_without_cuda(gpu_sdxl, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        gpu_sdxl.main([])


# Runs the dry run in its own process (it starts a process group) and records every TrainStep call, passing each
# through unchanged: which engine ran it and the loss it returned.
DRY_RUN_SCRIPT = textwrap.dedent("""
    import importlib.util, json, sys
    import raydiff.train.step as step_module

    calls, real_call = [], step_module.TrainStep.__call__

    def recording_call(self, batch, step, generator):
        loss, gamma = real_call(self, batch, step, generator)
        calls.append({"engine": type(self.engine).__name__, "loss": None if loss.is_meta else float(loss)})
        return loss, gamma

    step_module.TrainStep.__call__ = recording_call
    spec = importlib.util.spec_from_file_location("gpu_sdxl", sys.argv[1])
    bench = sys.modules["gpu_sdxl"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--dry-run", "--no-flops", "--json", sys.argv[2], "--profile", sys.argv[4]])
    with open(sys.argv[3], "w") as f:
        json.dump(calls, f)
    # The GPU machine it is meant for may have no Ray: the step, engine and models must not need it.
    assert "ray" not in sys.modules, "benchmarks/gpu_sdxl.py imported Ray"
""")


@pytest.fixture(scope="module")
def dry_run(tiny_sdxl, tmp_path_factory):
    """(result, TrainStep calls) of `gpu_sdxl.py --dry-run`; the tiny model comes from the session's cache."""
    out = tmp_path_factory.mktemp("gpu_sdxl")
    result_file, calls_file, profiles = out / "result.json", out / "calls.json", out / "profiles"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"):  # the benchmark's own group
        env.pop(key, None)
    done = subprocess.run([sys.executable, "-c", DRY_RUN_SCRIPT, str(SCRIPT), str(result_file), str(calls_file),
                           str(profiles)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(result_file.read_text()), json.loads(calls_file.read_text()), profiles


def test_dry_run_times_raydiffs_train_step_on_a_deepspeed_engine(gpu_sdxl, dry_run):
    result, calls, profiles = dry_run
    toy = result["toy"]
    assert (toy["precision"], toy["zero_stage"], toy["device"]) == ("bf16", 2, "cpu")
    rows = {(r["variant"], r["inputs"]): r for r in toy["variants"]}
    assert set(rows) == {(v, i) for v in ("gc", "eager") for i in ("precomputed", "online")}
    steps, warmup = gpu_sdxl.DRY_RUN["steps"], gpu_sdxl.DRY_RUN["warmup"]
    for (variant, _), row in rows.items():
        assert "error" not in row, row
        assert row["train_step"] == "raydiff.train.step.TrainStep"
        # The engine that ran is bf16 ZeRO-2, checkpointing exactly in the gc variant, and its optimizer stepped
        # once per micro-step (grad_accum 1): TrainStep's engine.step() ran.
        assert (row["bf16"], row["zero_stage"], row["gradient_checkpointing"]) == (True, 2, variant == "gc")
        assert row["optimizer_steps"] == steps + warmup
        assert len(row["losses"]) == steps and all(math.isfinite(x) for x in row["losses"])
        assert row["images_per_s_per_gpu"] > 0 and row["mfu"] > 0
    # The encoders' forward counts only where they run; the UNet's forward + backward in both.
    online, precomputed = toy["model_tflop_per_step"]["online"], toy["model_tflop_per_step"]["precomputed"]
    assert precomputed["vae"] == precomputed["text_encoders"] == 0 < precomputed["unet"] == precomputed["total"]
    assert online["vae"] > 0 and online["text_encoders"] > 0 and online["unet"] == precomputed["unet"]

    # Every timed and warm-up micro-step went through TrainStep on a DeepSpeed engine, and the reported losses are
    # the ones TrainStep returned, in order.
    engine_calls = [c for c in calls if c["engine"] == "DeepSpeedEngine"]
    assert len(engine_calls) == len(rows) * (steps + warmup)
    reported = [x for r in toy["variants"] for x in r["losses"]]
    returned = [c["loss"] for i, c in enumerate(engine_calls) if i % (steps + warmup) >= warmup]
    assert reported == pytest.approx(returned, abs=1e-6)
    # --profile: each cell's op table, where the micro-steps' time went (the UNet's convolutions among them)
    tables = {p.name: p.read_text() for p in profiles.iterdir()}
    assert sorted(tables) == sorted(f"{v}_{i}_b{toy['batch_size']}.txt" for v, i in rows)
    # By self time the top rows vary with the machine (at this toy size the convolution kernels may rank below 40
    # other ops); by time with callees the UNet's convolution layers always rank among them.
    for name, text in tables.items():
        by_self, by_total = text.split("# sorted by cpu_time_total\n")
        assert by_self.startswith("# sorted by self_cpu_time_total\n") and "aten::" in by_self, name
        assert re.search(r"^\s*aten::convolution\s", by_total, re.MULTILINE), name
    # The same init, data and noise with and without checkpointing: the same losses (recompute changes no maths).
    for kind in ("precomputed", "online"):
        assert rows[("gc", kind)]["losses"] == pytest.approx(rows[("eager", kind)]["losses"], rel=1e-3)
