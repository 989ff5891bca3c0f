"""Shape runs: any config, with every setting it has, run on CPU at toy size through the real code path.

A GPU recipe (bf16, ZeRO-2/3, gradient checkpointing, accumulation, EMA, offload, precompute, buckets, validation
images, a Tune sweep) cannot be tried here at its size, but nearly all of what can go wrong with it does not depend on
the size: dtypes meeting, DeepSpeed options combining, the checkpoint and export order. `in_shape` keeps every such
setting and swaps only what needs a GPU cluster or the hub: the model (the tiny SDXL), the data (the generated demo
set), the resolution, the step counts, the storage, the workers' resources.

    python -m raydiff.train --config sdxl_pokemon_blip_ip --shape-check
    python -m raydiff.tune --config tune_gamma_lr --shape-check
"""

from __future__ import annotations

import os

from raydiff.config import Config, from_dict, validate

SHAPE_RESOLUTION = 64  # the tiny SDXL's native size
SHAPE_STEPS = 4  # a checkpoint and a validation at step 2, the last step's checkpoint + export at 4
SHAPE_WORKERS = 2  # enough for ZeRO to partition; what a 2-core machine runs
SHAPE_IMAGES = 64


def in_shape(cfg: Config, storage_path: str, steps: int = SHAPE_STEPS) -> Config:
    """`cfg` on CPU at toy size; every training, objective, DeepSpeed, validation and Tune setting kept."""
    c = from_dict(cfg.to_dict())
    c.run.name = f"{cfg.run.name}-shape"
    c.run.storage_path = storage_path
    c.run.max_failures = 0  # a shape run must fail loudly, not retry
    c.scaling.use_gpu, c.scaling.num_workers = False, min(cfg.scaling.max_workers, SHAPE_WORKERS)
    c.scaling.cpus_per_worker = min(cfg.scaling.cpus_per_worker, 0.5)
    if c.deepspeed.precision == "fp16":  # fp16 needs a GPU; bf16 exercises the same 16-bit paths on CPU
        c.deepspeed.precision = "bf16"
    c.model.pretrained, c.model.vae, c.model.revision, c.model.variant = "tiny", None, None, None
    _data_in_shape(c, storage_path)
    _steps_in_shape(c, steps)
    _tune_in_shape(c, steps)
    return validate(c)


def _data_in_shape(c: Config, storage_path: str) -> None:
    d = c.data
    d.source, d.format, d.image_column, d.caption_column = None, None, "image", "text"
    d.buckets = d.buckets if [b.lower() for b in d.buckets] in ([], ["sdxl"]) else ["sdxl"]
    d.resolution, d.demo_num_images = SHAPE_RESOLUTION, SHAPE_IMAGES
    d.val_fraction, d.val_max_samples = max(d.val_fraction, 0.1), min(d.val_max_samples, 4)
    d.precompute_num_gpus, d.precompute_concurrency = 0.0, 1
    if d.cache_dir is not None:
        d.cache_dir = os.path.join(storage_path, "precompute-cache")


def _steps_in_shape(c: Config, steps: int) -> None:
    half = max(1, steps // 2)
    c.train.max_steps = steps
    c.train.log_every_n_steps = c.train.report_every_n_steps = 1
    c.checkpoint.every_n_steps, c.validation.every_n_steps = half, half
    c.optim.warmup_steps = min(c.optim.warmup_steps, half)
    c.objective.gamma_decay_steps = min(c.objective.gamma_decay_steps, steps)
    c.validation.batch_size = min(c.validation.batch_size, 4)
    c.validation.exposure_bias_denoising_steps = min(c.validation.exposure_bias_denoising_steps, 2)
    c.validation.image_denoising_steps = c.logging.sample_denoising_steps = 2


def _tune_in_shape(c: Config, steps: int) -> None:
    """One trial: the first candidate of each searched key."""
    t = c.tune
    if not t.search_space:
        return
    t.search_space = {key: _first_candidate(spec) for key, spec in t.search_space.items()}
    t.num_samples, t.max_concurrent_trials, t.grace_period = 1, 1, min(t.grace_period, max(1, steps // 2))
    if t.search_alg == "optuna":
        t.search_alg = "random"  # one trial: nothing to search


def _first_candidate(spec: dict) -> dict:
    (_, values), = spec.items()
    return {"grid": [values[0]]}  # a list's first candidate, or a range's lower bound
