"""The sweep driver: a Tune trial builds and fits one TorchTrainer (the Train+Tune pattern), Tune schedules trials.

`python -m raydiff.tune [--config NAME|PATH] [--set section.key=value ...]`
Re-running the same command resumes an interrupted sweep: finished trials are kept, unfinished ones continue.
"""

from __future__ import annotations

import logging
import math
import os

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.search import ConcurrencyLimiter

from raydiff import models, storage
from raydiff.config import Config, from_dict, run_dir, set_value, storage_path, validate
from raydiff.train.driver import init_ray, load_cli_config, prepare_precompute_cache, run_cpus, run_training
from raydiff.tune import asha
from raydiff.tune.report import write_sweep_outputs

logger = logging.getLogger(__name__)

METRIC, MODE = "val_loss", "min"
TRIAL_DRIVER_CPUS = 0.01


def param_space(cfg: Config) -> dict:
    """`tune.search_space` as Tune distributions, keyed by the dotted config key."""
    make = {"grid": tune.grid_search, "choice": tune.choice,
            "uniform": lambda b: tune.uniform(*b), "loguniform": lambda b: tune.loguniform(*b)}
    return {key: make[kind](values) for key, spec in cfg.tune.search_space.items() for kind, values in spec.items()}


def expected_trials(cfg: Config) -> int:
    """Grid points x num_samples (Optuna: num_samples); fewer trials after fit() means the sweep was interrupted."""
    grid = math.prod(len(v) for spec in cfg.tune.search_space.values() for kind, v in spec.items() if kind == "grid")
    return cfg.tune.num_samples * grid


def trial_config(base: dict, params: dict, trial_id: str, sweep_dir: str) -> Config:
    """The base config with the trial's sampled values; the trial id names the run, so a resumed trial continues."""
    cfg = from_dict(base)
    for key, value in params.items():
        set_value(cfg, key, value)
    cfg.run.name = trial_id
    cfg.run.storage_path = trial_runs_dir(sweep_dir)
    return validate(cfg)


def trial_runs_dir(sweep_dir: str) -> str:
    return storage.join(sweep_dir, "runs")


def run_trial(params: dict, base: dict, sweep_dir: str) -> None:
    """One Tune trial: fit a TorchTrainer whose reports reach Tune through TuneReportCallback."""
    cfg = trial_config(base, params, tune.get_context().get_trial_id(), sweep_dir)
    run_training(cfg, callbacks=[TuneReportCallback()])


def cpus_per_trial(cfg: Config) -> float:
    return run_cpus(cfg) + TRIAL_DRIVER_CPUS


def max_concurrent_trials(cfg: Config, cluster: dict | None = None) -> int:
    """`tune.max_concurrent_trials`, else as many trials as the cluster holds at once: its GPUs divided by a trial's
    GPUs on GPU clusters, else its CPUs divided by a trial's workers plus its data pipeline."""
    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    have = cluster if cluster is not None else ray.cluster_resources()
    s = cfg.scaling
    if s.use_gpu:
        fits = have.get("GPU", 0) / (s.max_workers * s.gpus_per_worker)
    else:
        fits = have.get("CPU", 0) / cpus_per_trial(cfg)
    return max(1, math.floor(fits + 1e-9))


def scheduler(cfg: Config, sweep_dir: str):
    """The scheduler of a new sweep; ASHA starts with empty rungs, replacing any state left in `sweep_dir`."""
    if cfg.tune.scheduler == "fifo":
        return tune.schedulers.FIFOScheduler()
    # time_attr "step": rungs are in optimizer steps, whatever the report frequency.
    rungs = asha.ResumableASHA(asha.state_path(sweep_dir), time_attr="step", max_t=cfg.train.max_steps,
                               grace_period=cfg.tune.grace_period, reduction_factor=cfg.tune.reduction_factor)
    rungs.save_state()
    return rungs


def search_alg(cfg: Config, concurrency: int):
    if cfg.tune.search_alg != "optuna":
        return None  # Tune's default: grid keys are expanded, every other key sampled num_samples times
    from ray.tune.search.optuna import OptunaSearch  # here: optuna is optional (config validation checks it)

    return ConcurrencyLimiter(OptunaSearch(seed=cfg.train.seed), max_concurrent=concurrency)


def build_tuner(cfg: Config, sweep_dir: str) -> tune.Tuner:
    """A new Tuner, or the interrupted sweep at `sweep_dir` restored (its trials keep their ids and runs)."""
    # The trial function only drives its TorchTrainer, which reserves the workers' resources itself. Tune
    # refuses an empty request, so the trial takes a token CPU share instead of a whole CPU a worker would lack.
    trainable = tune.with_resources(tune.with_parameters(run_trial, base=cfg.to_dict(), sweep_dir=sweep_dir),
                                    {"cpu": TRIAL_DRIVER_CPUS})
    if tune.Tuner.can_restore(sweep_dir):
        logger.info("resuming the sweep in %s", sweep_dir)
        return tune.Tuner.restore(sweep_dir, trainable=trainable, resume_unfinished=True, resume_errored=True)
    concurrency = max_concurrent_trials(cfg)
    return tune.Tuner(
        trainable,
        param_space=param_space(cfg),
        tune_config=tune.TuneConfig(metric=METRIC, mode=MODE, num_samples=cfg.tune.num_samples,
                                    scheduler=scheduler(cfg, sweep_dir), search_alg=search_alg(cfg, concurrency),
                                    max_concurrent_trials=concurrency),
        run_config=tune.RunConfig(name=cfg.run.name, storage_path=storage_path(cfg)),
    )


def run_sweep(cfg: Config):
    # Train reports val_loss only on validation steps; Tune's scheduler skips the reports without it.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    init_ray(cfg, num_cpus=(cfg.tune.max_concurrent_trials or 1) * cpus_per_trial(cfg))
    models.resolve_pretrained(cfg.model.pretrained)  # build/cache the tiny model once, before trials race for it
    sweep_dir = run_dir(cfg)
    storage.makedirs(sweep_dir)
    storage.write_text(storage.join(sweep_dir, "sweep_config.yaml"), cfg.to_yaml())
    prepare_precompute_cache(cfg, sweep_dir)
    build_tuner(cfg, sweep_dir).fit()
    return write_sweep_outputs(cfg, sweep_dir, trial_runs_dir(sweep_dir), expected_trials(cfg))


def main(argv: list[str] | None = None) -> int:
    cfg = load_cli_config(argv, "python -m raydiff.tune", "Ray Tune sweep over the IP gamma, its schedule and lr.")
    summary = run_sweep(cfg)
    print(summary.text, flush=True)  # the command's result (the trials table), not a log line: printed as it is
    # Non-zero when the sweep was interrupted or a trial failed, so an overnight script notices.
    return 0 if summary.finished else 1
