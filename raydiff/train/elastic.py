"""The global batch policy of an elastic run (`scaling.num_workers: [min, max]`): what changes with the world size.

Each worker keeps its batch (`train.batch_size` x `train.grad_accum` per optimizer step), so the global batch follows
the number of workers W: `batch_size x grad_accum x W`. Keeping the global batch constant instead would need
`grad_accum x max` to be divisible by every W the cluster may give (Ray Train picks any W in [min, max]), and idle
workers or uneven batches otherwise. The learning rate follows the batch: `optim.lr` is the rate at `max` workers
(the size the run is tuned for), scaled at W by `scaling.lr_scaling`: `sqrt` (the square-root rule for Adam-type
optimizers: Malladi et al., 2022, "On the SDEs and Scaling Rules for Adaptive Gradient Algorithms"), `linear`
(Goyal et al., 2017, for SGD) or `none`. A fixed-size run has W = max: factor 1, nothing changes.
"""

from __future__ import annotations

import math

from raydiff.config import Config, LrScaling, per_choice

RULES = per_choice(LrScaling, {"sqrt": math.sqrt, "linear": lambda r: r, "none": lambda r: 1.0})


def global_batch(cfg: Config, world: int) -> int:
    """Samples per optimizer step across the `world` workers."""
    return cfg.train.batch_size * cfg.train.grad_accum * world


def lr_factor(cfg: Config, world: int) -> float:
    """The factor on `optim.lr` at `world` workers: 1.0 at the max of an elastic run, and always for a fixed one (a
    fixed run relaunched on another number of workers keeps its rate)."""
    if not cfg.scaling.elastic:
        return 1.0
    return float(RULES[cfg.scaling.lr_scaling](world / cfg.scaling.max_workers))


def set_peak_lr(scheduler, peak_lr: float) -> None:
    """Make `peak_lr` the base of a LambdaLR and its optimizer's current rate `peak_lr x schedule(step)`.

    Called after a restore: the checkpoint's optimizer and scheduler carry the rate of the world size that wrote it.
    At an unchanged peak this recomputes the very value the scheduler set (same expression), so an unchanged world
    resumes bit for bit."""
    scheduler.base_lrs = [peak_lr] * len(scheduler.optimizer.param_groups)
    for group, base, schedule in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["initial_lr"] = base
        group["lr"] = base * schedule(scheduler.last_epoch)
