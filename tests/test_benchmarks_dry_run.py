"""The CPU benchmarks measure raydiff's own step: `--dry-run` of train_throughput.py, data_throughput.py and
ip_effect.py, each at toy size, must run every one of its micro-steps through `raydiff.train.step.TrainStep` and
report what that step returned. A benchmark that drifts to its own copy of the step fails here."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"

# One process for the three dry runs (one import of torch and diffusers; train_throughput starts a gloo group).
# Every TrainStep call is recorded and passed through unchanged: which benchmark, which engine, the step number,
# the batch's kind, and the loss and gamma the step returned.
SCRIPT = textwrap.dedent("""
    import contextlib, importlib.util, io, json, sys
    import raydiff.train.step as step_module
    from raydiff.data.columns import LATENT_COLUMN

    bench_dir, out_dir = sys.argv[1], sys.argv[2]
    calls, current, real_call = [], [None], step_module.TrainStep.__call__

    def recording_call(self, batch, step, generator):
        loss, gamma = real_call(self, batch, step, generator)
        calls.append({"bench": current[0], "engine": type(self.engine).__name__, "step": step,
                      "precomputed": LATENT_COLUMN in batch, "loss": float(loss), "gamma": float(gamma)})
        return loss, gamma

    step_module.TrainStep.__call__ = recording_call

    def load(name):
        spec = importlib.util.spec_from_file_location(name, f"{bench_dir}/{name}.py")
        module = sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        current[0] = name
        return module

    tt = load("train_throughput")
    tt.main(tt.parse_args(["--dry-run", "--json", f"{out_dir}/train_throughput.json"]))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        load("data_throughput").main(["--dry-run"])
    text = printed.getvalue()
    with open(f"{out_dir}/data_throughput.json", "w") as f:
        f.write(text[text.index('{\\n  "machine"'):])
    load("ip_effect").main(["--dry-run", "--out", f"{out_dir}/ip_effect.json"])
    with open(f"{out_dir}/calls.json", "w") as f:
        json.dump(calls, f)
""")


@pytest.fixture(scope="module")
def dry_runs(tiny_sdxl, tmp_path_factory):
    """({benchmark: its JSON output}, {benchmark: its TrainStep calls}); the tiny model from the session's cache."""
    out = tmp_path_factory.mktemp("benchmarks")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"):  # the benchmark's own group
        env.pop(key, None)
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(BENCHMARKS), str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    names = ("train_throughput", "data_throughput", "ip_effect")
    results = {name: json.loads((out / f"{name}.json").read_text()) for name in names}
    calls = json.loads((out / "calls.json").read_text())
    return results, {name: [c for c in calls if c["bench"] == name] for name in names}


def _load(name: str):
    """The benchmark as a module (its constants); nothing runs at import."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_throughput_runs_train_step_plain_and_under_deepspeed(dry_runs):
    results, calls = dry_runs
    result, calls = results["train_throughput"], calls["train_throughput"]
    args = result["args"]
    n = args["warmup"] + args["steps"]
    sides = [k for k, v in result.items() if isinstance(v, dict) and "samples_per_s" in v]
    assert args["dry_run"] and sides == ["plain", "deepspeed_zero2", "plain_again"]
    # Every micro-step of every side is one TrainStep call: around a PlainEngine, then a DeepSpeed engine, then the
    # PlainEngine again, each with the step numbers the worker would pass and the config's gamma.
    assert [c["engine"] for c in calls] == ["PlainEngine"] * n + ["DeepSpeedEngine"] * n + ["PlainEngine"] * n
    assert [c["step"] for c in calls] == list(range(n)) * 3
    assert not any(c["precomputed"] for c in calls) and {c["gamma"] for c in calls} == {_load("train_throughput").GAMMA}
    plain, deepspeed, again = ([c["loss"] for c in calls[i * n:(i + 1) * n]] for i in range(3))
    assert _finite(plain) and again == pytest.approx(plain, rel=1e-6)
    # The same weights, batches and generators under DeepSpeed: the same step, so the same losses.
    assert deepspeed == pytest.approx(plain, rel=1e-4)
    # What each side reports is what TrainStep returned.
    for side, losses in zip(sides, (plain, deepspeed, again)):
        assert result[side]["samples_per_s"] > 0
        assert result[side]["final_mean_loss"] == pytest.approx(sum(losses) / n, abs=1e-4)


def test_data_throughput_runs_train_step_online_and_precomputed(dry_runs):
    results, calls = dry_runs
    result, calls = results["data_throughput"]["results"]["step_alone_s"], calls["data_throughput"]
    dry = _load("data_throughput").DRY_RUN
    assert result["train_step"] == "raydiff.train.step.TrainStep"
    assert result["online"] > 0 and result["precomputed"] > 0 and result["speedup"] > 0
    n = dry["warmup"] + dry["steps"]
    assert len(calls) == 2 * n * dry["rounds"] and {c["engine"] for c in calls} == {"PlainEngine"}
    online, precomputed = calls[:n], calls[n:2 * n]
    # Online batches carry pixels and token ids, precomputed ones a latent cache's moments and embeddings.
    assert [c["precomputed"] for c in online + precomputed] == [False] * n + [True] * n
    assert [c["step"] for c in online] == [c["step"] for c in precomputed] == list(range(n))
    # The same weights, rows and generators: precomputing the encoders changes where they run, not the step.
    losses = [c["loss"] for c in online]
    assert _finite(losses) and [c["loss"] for c in precomputed] == pytest.approx(losses, rel=1e-5)


def test_ip_effect_trains_with_train_step_under_each_objective_setting(dry_runs):
    results, calls = dry_runs
    result, calls = results["ip_effect"], calls["ip_effect"]
    bench = _load("ip_effect")
    steps = bench.DRY_RUN["steps"]
    assert result["args"]["steps"] == steps and [r["config"] for r in result["runs"]] == list(bench.CONFIGS)
    for run in result["runs"]:
        metrics = [run["val_loss"], run["exposure_bias"], run["fid_latent"]]
        assert _finite(metrics) and all(k in run for k in ("val_loss_t0_249", "val_loss_t750_999"))
    assert len(calls) == steps * len(bench.CONFIGS)
    assert {c["engine"] for c in calls} == {"PlainEngine"} and all(c["precomputed"] for c in calls)
    # Each setting's objective section reaches the step: its gamma at each step.
    for i, (gamma, schedule) in enumerate(bench.CONFIGS.values()):
        run = calls[i * steps:(i + 1) * steps]
        assert [c["step"] for c in run] == list(range(steps)) and _finite([c["loss"] for c in run])
        used = [c["gamma"] for c in run]
        if schedule == "constant":
            assert used == [gamma] * steps
        elif schedule == "linear_decay":
            assert used == pytest.approx([gamma * (1 - s / steps) for s in range(steps)])
        else:
            assert all(0 <= g <= gamma for g in used) and len(set(used)) == steps


def _finite(values) -> bool:
    return all(math.isfinite(v) for v in values)
