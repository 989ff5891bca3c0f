"""End of a run: the loss-curve PNG, a sample grid from the exported model, and the summary printed by the driver."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import ray

from raydiff import console, storage
from raydiff.config import Config, is_uri

LOSS_CURVE = "loss_curve.png"
SAMPLES = "samples.png"


@dataclass
class Summary:
    steps: int
    wall_s: float  # this invocation of the driver
    samples_per_s: float  # mean over the logged windows of the whole run (resumed segments included)
    best_val_loss: float | None
    best_val_step: int | None

    @classmethod
    def from_rows(cls, rows: list[dict], wall_s: float) -> "Summary":
        steps = max((r.get("step", 0) for r in rows), default=0)
        rates = [r["samples_per_s"] for r in rows if r.get("samples_per_s") is not None]
        vals = [(r["val_loss"], r["step"]) for r in rows if r.get("val_loss") is not None]
        best = min(vals) if vals else (None, None)
        return cls(steps, wall_s, sum(rates) / len(rates) if rates else 0.0, *best)


def plot_loss_curve(rows: list[dict], path: str) -> str:
    """Training loss (perturbed, per γ) and the fair val_loss against step, written to the local `path`."""
    import matplotlib  # here: seconds to import, for one plot at the end of a run

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    if train:
        ax.plot(*zip(*train), label="train loss (perturbed input)", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="val_loss (γ = 0, fixed t and noise)")
    ax.set_xlabel("step")
    ax.set_ylabel("MSE")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def _render_grid(model_dir: str, prompts: list[str], steps: int, seed: int, size: int, cloud_env: dict[str, str],
                 verbose: bool):
    if not verbose:
        console.quiet_process()
        console.disable_hf_progress_bars()
    os.environ.update(cloud_env)  # the model may sit on an object store this worker has no credentials for
    from raydiff.generate import generate  # diffusers: here, not in every driver's start-up
    from raydiff.validation import image_grid

    with tempfile.TemporaryDirectory() as tmp:
        local = storage.download_dir(model_dir, os.path.join(tmp, "model")) if is_uri(model_dir) else model_dir
        return image_grid(generate(local, prompts, steps=steps, seed=seed, height=size, width=size))


_sample_grid_task = ray.remote(num_cpus=1)(_render_grid)


def sample_grid(cfg: Config, model_dir: str):
    """The end-of-run grid: a GPU run renders where a GPU is (not on a CPU-only head node); a CPU run renders here,
    without starting (and importing diffusers into) another Ray worker process."""
    # At the training resolution: what the run learned, not the model's native size (1024 px for a tiny model too).
    args = (model_dir, cfg.logging.sample_prompts, cfg.logging.sample_denoising_steps, cfg.train.seed,
            cfg.data.resolution, storage.cloud_env(), console.is_verbose())
    if not cfg.scaling.use_gpu:
        return _render_grid(*args)
    # DEFAULT scheduling: inside a Tune trial the task must not be captured by the trial's tiny placement group.
    task = _sample_grid_task.options(num_gpus=cfg.scaling.gpus_per_worker, scheduling_strategy="DEFAULT")
    return ray.get(task.remote(*args))


def epochs_of(cfg: Config, train_rows: int) -> float:
    """How many passes over `train_rows` the run's max_steps make at its global batch."""
    return cfg.train.max_steps * cfg.train.batch_size * cfg.train.grad_accum * cfg.scaling.max_workers / train_rows


def format_start(cfg: Config, run_dir: str) -> str:
    """The config in three lines, logged before Ray Train starts (the logger puts "[raydiff] " before each)."""
    t, s, d, o = cfg.train, cfg.scaling, cfg.deepspeed, cfg.objective
    per_step = t.batch_size * t.grad_accum * s.max_workers  # elastic: at max workers
    device = f"{s.gpus_per_worker:g} GPU" if s.use_gpu else f"{s.cpus_per_worker:g} CPU"
    workers = f"{s.min_workers}-{s.max_workers} (elastic)" if s.elastic else s.num_workers
    return "\n".join([
        f"run {cfg.run.name} in {run_dir}",
        f"  model {cfg.model.pretrained} | {t.max_steps} steps | {workers} workers ({device} each) x "
        f"batch {t.batch_size} x accumulation {t.grad_accum} = {per_step} samples/step | "
        f"ZeRO-{d.zero_stage} {d.precision}",
        f"  IP gamma {o.gamma:g} ({o.gamma_schedule}) | {cfg.optim.optimizer} lr {cfg.optim.lr:.1e} "
        f"({cfg.optim.lr_scheduler}) | validation every {cfg.validation.every_n_steps} | checkpoint every "
        f"{cfg.checkpoint.every_n_steps} (keep {cfg.checkpoint.keep})",
    ])


def format_summary(s: Summary, run_dir: str, model_dir: str, checkpoint: str | None, extras: dict[str, str]) -> str:
    best = f"{s.best_val_loss:.4f} (step {s.best_val_step})" if s.best_val_loss is not None else "n/a"
    lines = [
        "[raydiff] run finished",
        f"  steps:          {s.steps}",
        f"  wall time:      {s.wall_s:.0f}s (this launch)",
        f"  throughput:     {s.samples_per_s:.1f} samples/s (mean over logged steps)",
        f"  best val_loss:  {best}",
        f"  model:          {model_dir}",
        f"  checkpoints:    {checkpoint or 'none'} (latest; all under {run_dir})",
        *(f"  {k + ':':<16}{v}" for k, v in extras.items()),
    ]
    return "\n".join(lines)
