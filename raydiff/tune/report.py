"""The morning-after view of a sweep: `results.csv` / `results.md` (one row per trial, best first), `sweep.png`
(val_loss against gamma per lr, and every trial's learning curve), and the best trial's exported model.

Numbers come from each trial's own `metrics.jsonl`; Tune only supplies the trials, their parameters and status.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass

from raydiff import storage
from raydiff.config import Config
from raydiff.train.metrics_log import read_metrics

GAMMA, LR = "objective.gamma", "optim.lr"
# Tune's trial status -> what a reader of the table needs to know.
_STATUS = {"TERMINATED": "completed", "ERROR": "error"}


@dataclass
class TrialRow:
    trial_id: str
    params: dict
    best_val_loss: float | None  # over trained steps: step 0 is the same untrained model in every trial
    steps: int
    status: str  # completed | early-stopped | error | unfinished
    model: str  # the exported pipeline, "" when the trial did not finish
    curve: list[tuple[int, float]]  # (step, val_loss), including the step-0 baseline


@dataclass
class SweepSummary:
    rows: list[TrialRow]  # best first; trials without a val_loss last
    best: TrialRow | None
    best_exported: TrialRow | None  # the best trial that has a model: ASHA may stop the trial with the lowest val_loss
    finished: bool  # every expected trial exists and completed or was early-stopped
    text: str


def trial_row(trial, cfg: Config, runs_dir: str) -> TrialRow:
    run = storage.join(runs_dir, trial.trial_id)
    metrics_path = storage.join(run, "metrics.jsonl")
    records = read_metrics(metrics_path) if storage.exists(metrics_path) else []
    curve = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    trained = [v for s, v in curve if s > 0]
    steps = max((r["step"] for r in records), default=0)
    max_steps = trial.config.get("train.max_steps", cfg.train.max_steps)
    status = _STATUS.get(trial.status, "unfinished")
    if status == "completed" and steps < max_steps:
        status = "early-stopped"  # Tune ended it before max_steps: the scheduler stopped it
    final = storage.join(run, "final")
    model = final if status == "completed" and storage.exists(storage.join(final, "model_index.json")) else ""
    params = {key: trial.config.get(key) for key in cfg.tune.search_space}
    return TrialRow(trial.trial_id, params, min(trained) if trained else None, steps, status, model, curve)


def rank(rows: list[TrialRow]) -> list[TrialRow]:
    return sorted(rows, key=lambda r: (r.best_val_loss is None, r.best_val_loss or 0.0, r.trial_id))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def table(rows: list[TrialRow], keys: list[str]) -> tuple[list[str], list[list[str]]]:
    header = ["rank", "trial_id", *keys, "best_val_loss", "steps", "status", "model"]
    body = [[str(i + 1), r.trial_id, *(_fmt(r.params[k]) for k in keys),
             "" if r.best_val_loss is None else f"{r.best_val_loss:.6g}", str(r.steps), r.status, r.model]
            for i, r in enumerate(rows)]
    return header, body


def to_csv(header: list[str], body: list[list[str]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(body)
    return out.getvalue()


def to_markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"


def plot(rows: list[TrialRow], cfg: Config, path: str) -> None:
    """Left: best val_loss against gamma, one line per lr. Right: val_loss learning curves of every trial."""
    import matplotlib  # here: seconds to import, for one plot at the end of a sweep

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    scored = [r for r in rows if r.best_val_loss is not None]
    lrs = {r.params.get(LR, cfg.optim.lr) for r in scored}
    # A sampled lr differs in every trial: one line per decade then, else one per lr value.
    lr_key = (lambda lr: 10.0 ** round(math.log10(lr))) if len(lrs) > 6 else (lambda lr: lr)
    by_lr: dict[float, list[tuple[float, float]]] = {}
    for r in scored:
        gamma, lr = r.params.get(GAMMA, cfg.objective.gamma), r.params.get(LR, cfg.optim.lr)
        by_lr.setdefault(lr_key(lr), []).append((gamma, r.best_val_loss))
    for lr, points in sorted(by_lr.items()):
        xs, ys = zip(*sorted(points))
        left.plot(xs, ys, marker="o", label=f"lr {'~' if len(lrs) > 6 else ''}{lr:.2g}")
    left.set(xlabel="gamma", ylabel="best val_loss", title="val_loss against gamma")
    for r in rows:
        if r.curve:
            label = f"{r.trial_id} " + " ".join(f"{k.split('.')[-1]}={_fmt(v)}" for k, v in r.params.items())
            right.plot(*zip(*r.curve), marker=".", label=label + (" (stopped)" if r.status == "early-stopped" else ""))
    right.set(xlabel="step", ylabel="val_loss", title="learning curves")
    for ax in (left, right):
        if 0 < len(ax.get_legend_handles_labels()[0]) <= 12:  # beyond that a legend hides the curves
            ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    storage.write_bytes(path, buf.getvalue())


def best_model_lines(best: TrialRow | None, exported: TrialRow | None) -> list[str]:
    """Where the model to use is. A scheduler judges trials at its milestones, so the trial with the lowest val_loss
    over all its steps can be one it stopped (no export); then the best exported trial is named too."""
    if best is None:
        return []
    if exported is best:
        return [f"  best model:  {best.model}"]
    lines = [f"  trial {best.trial_id} was {best.status} at step {best.steps} (no export; its checkpoints are in "
             f"its run directory)"]
    if exported is not None:
        lines.append(f"  best model:  {exported.model} (trial {exported.trial_id}, "
                     f"val_loss {exported.best_val_loss:.6g})")
    else:
        lines.append("  best model:  (none: no trial finished with an export)")
    return lines


def write_sweep_outputs(cfg: Config, sweep_dir: str, runs_dir: str, expected_trials: int) -> SweepSummary:
    from ray.tune import ExperimentAnalysis  # here: the report's pure helpers stay importable without Ray Tune

    trials = ExperimentAnalysis(sweep_dir).trials
    rows = rank([trial_row(t, cfg, runs_dir) for t in trials])
    header, body = table(rows, list(cfg.tune.search_space))
    storage.write_text(storage.join(sweep_dir, "results.csv"), to_csv(header, body))
    markdown = to_markdown(header, body)
    storage.write_text(storage.join(sweep_dir, "results.md"), markdown)
    plot(rows, cfg, storage.join(sweep_dir, "sweep.png"))
    best = rows[0] if rows and rows[0].best_val_loss is not None else None
    best_exported = next((r for r in rows if r.model and r.best_val_loss is not None), None)
    done = sum(r.status in ("completed", "early-stopped") for r in rows)
    lines = [f"\n[raydiff] sweep {sweep_dir}: {done} of {max(expected_trials, len(rows))} trials done", markdown]
    if any(r.status == "error" for r in rows):
        lines.append("  failed trials: see the Tune trial directories' error files")
    elif done < expected_trials:
        lines.append("  the sweep was interrupted: run the same command again to resume it")
    if best is not None:
        lines.append(f"  best trial:  {best.trial_id} (val_loss {best.best_val_loss:.6g}, {best.params})")
    lines += best_model_lines(best, best_exported)
    lines.append(f"  results:     {storage.join(sweep_dir, 'results.md')}, results.csv, sweep.png")
    return SweepSummary(rows, best, best_exported, done >= expected_trials and done == len(rows), "\n".join(lines))
