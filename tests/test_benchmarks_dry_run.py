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
    import contextlib, glob, importlib.util, io, json, sys
    import torch
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
    ip, ip_out = load("ip_effect"), f"{out_dir}/ip_effect.json"
    ip_args = ["--dry-run", "--out", ip_out, "--work-dir", f"{out_dir}/ip_partial"]
    ip.main(ip_args)
    with open(ip_out) as f:  # resume after losing the last run: only that run trains again
        first = json.load(f)
    with open(ip_out, "w") as f:
        json.dump({**first, "runs": first["runs"][:-1]}, f)
    current[0], real_point = "ip_effect_resume", ip.curve_point

    def killed_at_step_2(step, *rest):  # and that run dies once mid-way, then continues from its saved state
        if step == 2:
            ip.curve_point = real_point
            raise KeyboardInterrupt
        return real_point(step, *rest)

    ip.curve_point = killed_at_step_2
    try:
        ip.main(ip_args)
    except KeyboardInterrupt:
        pass
    (saved,) = glob.glob(f"{out_dir}/ip_partial/*.pt")  # as if the killed process had trained for 1,000 s
    state = torch.load(saved, weights_only=False)
    killed_train_s = state["timing"]["train_s"]
    torch.save({**state, "timing": {**state["timing"], "train_s": 1000.0}}, saved)
    ip.main(ip_args)
    with open(ip_out) as f:
        resumed = json.load(f)
    ip.main(["--report", "--out", ip_out, "--png", f"{out_dir}/ip_effect.png"])
    with open(ip_out, "w") as f:
        json.dump(first, f)
    with open(f"{out_dir}/ip_effect_resume.json", "w") as f:
        json.dump({**resumed, "png_bytes": len(open(f"{out_dir}/ip_effect.png", "rb").read()),
                   "killed_train_s": killed_train_s}, f)
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
    names = ("train_throughput", "data_throughput", "ip_effect", "ip_effect_resume")
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
    dry = bench.DRY_RUN
    plan = [(d, s, 0) for d in bench.DATASETS for s in bench.SETTINGS]
    assert [(r["dataset"], r["setting"], r["seed"]) for r in result["runs"]] == plan
    assert all(result["args"][k] == v for k, v in dry.items() if k in bench.RUN_KEYS)
    assert {c["engine"] for c in calls} == {"PlainEngine"} and all(c["precomputed"] for c in calls)
    assert len(calls) == sum(r["steps"] for r in result["runs"])
    offset = 0
    for run in result["runs"]:
        # Every run of a dataset trains the step count its reference run's plateau rule chose.
        ref = next(r for r in result["runs"] if (r["dataset"], r["setting"]) == (run["dataset"], bench.REFERENCE))
        steps = run["steps"]
        assert steps == ref["steps"] and dry["min_steps"] <= steps <= dry["max_steps"]
        assert [p["step"] for p in run["curve"]] == list(range(steps + 1))
        assert _finite([p[k] for p in run["curve"] for k in ("val_loss", "exposure_bias")])
        # The curve's last point is the EMA model the final metrics measure.
        assert run["curve"][-1]["val_loss"] == pytest.approx(run["val_loss"])
        _check_final_metrics(bench, run, dry)
        # Each setting's objective section reaches the step: its gamma at each of the run's steps.
        gamma, schedule = bench.SETTINGS[run["setting"]]
        used = calls[offset:offset + steps]
        offset += steps
        assert [c["step"] for c in used] == list(range(steps)) and _finite([c["loss"] for c in used])
        gammas = [c["gamma"] for c in used]
        if schedule == "constant":
            assert gammas == [gamma] * steps
        elif schedule == "linear_decay":
            assert gammas == pytest.approx([gamma * (1 - s / steps) for s in range(steps)])
        else:
            assert all(0 <= g <= gamma for g in gammas) and len(set(gammas)) == steps


def _check_final_metrics(bench, run: dict, dry: dict) -> None:
    families = ["exposure_bias", "fd_pixel"] + (["fd_clf", "clf_acc"] if run["dataset"] == "digits" else [])
    for n in dry["sampler_steps"]:
        for lam in bench.EPS_SCALES:
            key = f"n{n}_lam{lam:g}"
            assert _finite([run[f"{f}_{key}"] for f in families] + run[f"deltas_{key}"] + [run["val_loss"]])
            assert len(run[f"deltas_{key}"]) == n and run[f"fd_pixel_{key}"] > 0
    if run["dataset"] == "digits":
        assert 0 <= run[f"clf_acc_n{n}_lam1"] <= 1 and 0 < run["classifier_held_out_accuracy"] <= 1
    else:
        assert "fd_clf_n2_lam1" not in run


def test_ip_effect_resumes_a_results_file_and_reports_it(dry_runs):
    results, calls = dry_runs
    first, resumed = results["ip_effect"], results["ip_effect_resume"]
    # The rerun found every run but the removed last one finished: it trained that one alone, as before, and when
    # killed after step 1 it continued from the state saved at step 1 (weights, optimizer, EMA, generator).
    lost = first["runs"][-1]
    steps = [c["step"] for c in calls["ip_effect_resume"]]
    assert steps == [0, 1] + list(range(1, lost["steps"])) and resumed["runs"][:-1] == first["runs"][:-1]
    again = resumed["runs"][-1]
    assert (again["dataset"], again["setting"], again["seed"], again["steps"]) == \
        (lost["dataset"], lost["setting"], lost["seed"], lost["steps"])
    points = [[p[k] for p in run["curve"] for k in ("step", "val_loss", "exposure_bias")] for run in (again, lost)]
    assert points[0] == pytest.approx(points[1]) and again["val_loss"] == pytest.approx(lost["val_loss"])
    # Its time is both processes' training (the killed one's, saved at step 1 and set to 1,000 s, plus the rerun's),
    # and says where it resumed; a run trained in one go resumed nowhere.
    assert again["resumed_at"] == [1] and all(r["resumed_at"] == [] for r in resumed["runs"][:-1])
    assert resumed["killed_train_s"] > 0 and 1000 < again["train_s"] < 1000 + lost["train_s"] + 60
    assert resumed["png_bytes"] > 1000  # --report drew the curves


def test_ip_effect_plateau_rule():
    flattened = _load("ip_effect").flattened
    falling = [(s, 1.0 / (1 + s)) for s in range(0, 11)]
    level = [(s, 1.0 if s < 5 else 0.999) for s in range(0, 11)]
    assert not flattened(falling, min_steps=4, window=3, tol=0.005)  # still improving by > 0.5 %
    assert flattened(level, min_steps=4, window=3, tol=0.005)  # 0.1 % better in the last 3 steps
    assert not flattened(level[:4], min_steps=4, window=3, tol=0.005)  # before min_steps: never
    assert flattened([(s, 1.0 + s / 100) for s in range(0, 11)], min_steps=4, window=3, tol=0.005)  # overfitting


def test_ip_effect_table_marks_only_differences_beyond_the_seed_spread():
    ip = _load("ip_effect")

    def run(setting, seed, value):
        metrics = {f"{f}_n10_lam{lam:g}": value for f in ("exposure_bias", "fd_pixel") for lam in ip.EPS_SCALES}
        return {"dataset": "shapes", "setting": setting, "seed": seed, "steps": 100, "val_loss": value, **metrics}

    one_seed = ip.table([run("gamma=0", 0, 1.0), run("gamma=0.1", 0, 2.0)], "shapes")
    assert "nan" not in one_seed and "*" not in one_seed  # one seed: no spread, so no claim
    rows = ip.table([run("gamma=0", 0, 1.0), run("gamma=0", 1, 1.2),  # 1.1 ± 0.14
                     run("gamma=0.05", 0, 1.15), run("gamma=0.05", 1, 1.35),  # 1.25 ± 0.14: intervals overlap
                     run("gamma=0.1", 0, 2.0), run("gamma=0.1", 1, 2.2)], "shapes").splitlines()  # 2.1 ± 0.14
    cells = {line.split(" | ")[0][2:] + " " + line.split(" | ")[1]: line.split(" | ")[4:] for line in rows[2:]}
    assert all(c.startswith("1.1 ± 0.14") and "*" not in c for c in cells["gamma=0 1"][:3])
    assert all("*" not in c for c in cells["gamma=0.05 1"][:3])
    assert all(c.startswith("2.1 ± 0.14") and c.rstrip(" |").endswith("*") for c in cells["gamma=0.1 1"][:3])
    assert cells["gamma=0.1 1.005"][0] == ""  # val_loss is unperturbed: one row per setting, not per lambda


def test_ip_effect_paired_table_compares_each_seed_with_gamma_0_of_that_seed():
    ip = _load("ip_effect")

    def run(setting, seed, value, acc):
        metrics = {f"{f}_n10_lam{lam:g}": value for f in ("exposure_bias", "fd_pixel") for lam in ip.EPS_SCALES}
        return {"dataset": "digits", "setting": setting, "seed": seed, "steps": 100, "val_loss": value,
                **metrics, "clf_acc_n10_lam1": acc, "clf_acc_n10_lam1.005": acc}

    # Seed 1's reference is twice seed 0's: only pairing by seed sees gamma=0.1 worse on seed 0, better on seed 1.
    runs = [run("gamma=0", 0, 1.0, 0.9), run("gamma=0", 1, 2.0, 0.8),
            run("gamma=0.1", 1, 1.8, 0.88), run("gamma=0.1", 0, 1.1, 0.9)]
    rows = ip.paired_table(runs, "digits").splitlines()
    assert rows[0].split(" | ")[2:] == ["val_loss", "exposure_bias n=10", "fd_pixel n=10", "clf_acc n=10", "worse |"]
    assert len(rows) == 3 and rows[2].startswith("| gamma=0.1 | 0, 1 |")  # gamma=0 is not compared with itself
    cells = rows[2].split(" | ")[2:]
    assert cells[:3] == ["+10.0, -10.0 %"] * 3 and cells[3] == "+0.0, +10.0 %"  # accuracy: higher is better
    assert cells[4] == "3/8 |"  # seed 0 worse on the three lower-is-better metrics; a tie is not worse
    assert "no digits reference" in ip.paired_table(runs[2:], "digits")
    runs[0]["clf_acc_n10_lam1"] = 0.0  # a zero reference has no relative change: shown as nan, not counted
    assert ip.paired_table(runs, "digits").splitlines()[2].split(" | ")[5:7] == ["+nan, +10.0 %", "3/8 |"]


def _finite(values) -> bool:
    return all(math.isfinite(v) for v in values)
