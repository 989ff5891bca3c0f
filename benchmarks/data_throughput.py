"""Images/s of the Ray Data preprocessing vs a torch DataLoader running the same transforms with as many workers,
and training samples/s with precomputed latents vs online encoding.

    python benchmarks/data_throughput.py --images 256 --resolution 64 --workers 2
    python benchmarks/data_throughput.py --training --steps 40     # precompute vs online (adds ~10 min on 2 cores)
    python benchmarks/data_throughput.py --dry-run                 # the step comparison (1) alone, toy size, no Ray

Both sides run ``raydiff.data.pipeline.Preprocessor`` (decode, EXIF, mode conversion, resize, crop, flip, time_ids,
both tokenizers) on the same parquet rows in batches of ``--batch-size``; Ray Data with a fixed pool of
``--workers`` actors, the DataLoader with ``num_workers=--workers`` processes. Each side is timed over one full
pass after a warm-up pass (actor start-up, tokenizer loading and worker forking are excluded).

``--training``: (1) the step alone, in this process; it measures raydiff's step, ``raydiff.train.step.TrainStep``
(built by ``TrainStep.build`` from the tiny config, around a ``PlainEngine``: AdamW, no DeepSpeed): the frozen
encoders + UNet forward/backward + optimizer step vs the same step fed precomputed latent moments and embeddings
(same weights, batch and generators, so the same losses); (2) whole raydiff runs of
the tiny config (1 worker, ZeRO-2) with ``data.precompute`` none, latents streamed, and latents from a cache built
by that run; steady-state samples/s is the median of the per-step ``samples_per_s`` after the first 5 steps, and
the run's wall time (Ray start, cache build, data start-up included) is reported next to it.
``--dry-run``: (1) alone at toy size (tests/test_benchmarks_dry_run.py runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq


def ray_pass(spec, tokenizer: str) -> tuple[int, float]:
    from raydiff.data.pipeline import build_datasets

    ds = build_datasets(spec, tokenizer, epoch=0)["train"]
    for _ in ds.iter_batches(batch_size=spec.batch_size):  # warm-up: actors up, tokenizers loaded
        pass
    start, n = time.perf_counter(), 0
    for batch in ds.iter_batches(batch_size=spec.batch_size):
        n += len(batch["time_ids"])
    return n, time.perf_counter() - start


class _Rows:
    """Map-style dataset whose items are whole batches (index lists from a BatchSampler), like Ray's batches."""

    def __init__(self, table: pa.Table, tokenizer: str, resolution: int):
        self.table, self.tokenizer, self.resolution = table, tokenizer, resolution
        self.pre = None

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, indices):
        from raydiff.config import DataSection
        from raydiff.data.pipeline import Preprocessor

        if self.pre is None:  # built in the worker process, like Ray's actors build theirs
            self.pre = Preprocessor(self.tokenizer, DataSection(resolution=self.resolution))
        return self.pre(self.table.take(indices))


def dataloader_pass(table: pa.Table, tokenizer: str, resolution: int, workers: int, batch_size: int):
    import torch.utils.data as tud

    sampler = tud.BatchSampler(tud.SequentialSampler(range(table.num_rows)), batch_size, drop_last=False)
    loader = tud.DataLoader(_Rows(table, tokenizer, resolution), sampler=sampler, batch_size=None,
                            num_workers=workers, persistent_workers=workers > 0)
    for _ in loader:  # warm-up
        pass
    start, n = time.perf_counter(), 0
    for batch in loader:
        n += len(batch["time_ids"])
    return n, time.perf_counter() - start


def step_costs(resolution: int, batch: int, steps: int, warmup: int = 3, rounds: int = 2) -> dict:
    """Seconds per raydiff TrainStep with the encoders in the step vs fed precomputed inputs (one process, no
    DeepSpeed: a PlainEngine). Each mode trains its own copy of the UNet from the same weights, on the same batch,
    with the generators Worker.train_micro_step makes: the two modes compute the same losses."""
    import copy

    import numpy as np
    import torch

    from raydiff import config as C
    from raydiff import models, tokens
    from raydiff.data.columns import LATENT_COLUMN
    from raydiff.train.deepspeed_setup import build_lr_scheduler, build_optimizer
    from raydiff.train.step import PlainEngine, TrainStep, step_generator

    cfg = C.load_config("tiny_cpu", [f"train.batch_size={batch}", f"data.resolution={resolution}"])
    comps = models.load_components("tiny")
    encoders = models.FrozenEncoders(comps.vae, comps.text_encoder, comps.text_encoder_2)
    rng = np.random.default_rng(0)
    pixels = torch.from_numpy(rng.integers(0, 256, (batch, 3, resolution, resolution), dtype=np.uint8))
    ids, ids_2 = (torch.from_numpy(a) for a in tokens.tokenize(
        (comps.tokenizer, comps.tokenizer_2), ["a red circle on a blue square"] * batch))
    tids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch, dtype=torch.float32)
    online = {"pixels": pixels, "input_ids": ids, "input_ids_2": ids_2, "time_ids": tids}

    def train_step() -> TrainStep:
        unet = copy.deepcopy(comps.unet)
        opt = build_optimizer(unet.parameters(), cfg)
        engine = PlainEngine(unet, opt, cfg.train.grad_clip, build_lr_scheduler(opt, cfg))
        return TrainStep.build(cfg, engine, encoders, comps.noise_scheduler.alphas_cumprod.float(),
                               comps.noise_scheduler.config.prediction_type)

    steppers = {"online": train_step(), "precomputed": train_step()}
    cond = steppers["online"].encode(online, torch.Generator())  # the text embeddings a precompute stage stores
    with torch.no_grad():
        moments = models.latent_moments(comps.vae, pixels)
    precomputed = {LATENT_COLUMN: moments, "prompt_embeds": cond.prompt_embeds, "pooled": cond.pooled,
                   "time_ids": tids}
    batches = {"online": online, "precomputed": precomputed}
    done = {name: 0 for name in batches}

    def run(name: str, count: int) -> None:
        for _ in range(count):
            i = done[name]
            steppers[name](batches[name], i, step_generator(torch.device("cpu"), cfg.train.seed, i, 0, 0))
            done[name] += 1

    out = {}
    for _ in range(rounds):  # interleaved rounds: both modes see the same machine state
        for name in batches:
            run(name, warmup)
            start = time.perf_counter()
            run(name, steps)
            out.setdefault(name, []).append((time.perf_counter() - start) / steps)
    res = {k: round(min(v), 4) for k, v in out.items()}
    res["speedup"] = round(res["online"] / res["precomputed"], 2)
    res["train_step"] = f"{TrainStep.__module__}.{TrainStep.__qualname__}"
    return res


def training_run(mode: str, steps: int, out_root: str, cache_dir: str, workers: int) -> dict:
    """One raydiff run of the tiny config; (steady samples/s, wall s) from its metrics."""
    import statistics

    from raydiff import config as C
    from raydiff.train.driver import run_training
    from raydiff.train.metrics_log import read_metrics

    precompute = {"online": [], "latents_streamed": ["data.precompute=latents"],
                  "latents_cached": ["data.precompute=latents", f"data.cache_dir={cache_dir}"]}[mode]
    cfg = C.load_config("tiny_cpu", [f"run.storage_path={out_root}", f"run.name=bench-{mode}",
                                     f"train.max_steps={steps}", f"scaling.num_workers={workers}",
                                     "train.log_every_n_steps=1", f"validation.every_n_steps={steps}",
                                     f"checkpoint.every_n_steps={steps}", "validation.prompts=[]",
                                     "logging.sample_prompts=[]", "validation.exposure_bias_denoising_steps=0",
                                     *precompute])
    start = time.perf_counter()
    out = run_training(cfg)
    wall = time.perf_counter() - start
    rates = [r["samples_per_s"] for r in read_metrics(out.metrics_path)
             if r.get("step", 0) > 5 and "samples_per_s" in r]
    return {"steady_samples_per_s": round(statistics.median(rates), 2), "wall_s": round(wall, 1)}


def training_comparison(args) -> dict:
    import ray

    from raydiff.train.driver import init_ray

    res = {"step_alone_s": step_costs(args.resolution, 4, 20)}
    out_root = tempfile.mkdtemp(prefix="raydiff-bench-runs-")
    from raydiff import config as C

    init_ray(C.load_config("tiny_cpu", ["data.precompute=latents", f"scaling.num_workers={args.train_workers}"]))
    runs = {}
    for mode in ("online", "latents_streamed", "latents_cached"):
        runs[mode] = training_run(mode, args.steps, out_root, os.path.join(out_root, "cache"), args.train_workers)
        print(mode, runs[mode], flush=True)
    ray.shutdown()
    online = runs["online"]["steady_samples_per_s"]
    for mode, r in runs.items():
        r["ratio_to_online"] = round(r["steady_samples_per_s"] / online, 2)
    res["runs"] = runs
    return res


DRY_RUN = dict(batch=2, steps=1, warmup=1, rounds=1)  # step_costs at toy size


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--training", action="store_true", help="precompute vs online encoding instead")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--train-workers", type=int, default=1)
    p.add_argument("--dry-run", action="store_true", help=f"the step alone, toy size, no Ray: {DRY_RUN}")
    args = p.parse_args(argv)
    machine = f"{platform.machine()} {os.cpu_count()} CPUs, {platform.python_version()}"
    if args.dry_run:
        results = {"step_alone_s": step_costs(args.resolution, **DRY_RUN)}
        print(json.dumps({"machine": machine, "args": vars(args), "results": results}, indent=2))
        return
    if args.training:
        print(json.dumps({"machine": machine, "args": vars(args), "results": training_comparison(args)}, indent=2))
        return

    import ray

    from raydiff.data.demo import write_demo_dataset
    from raydiff.config import DataSection
    from raydiff.data.pipeline import DataSpec
    from raydiff.models import resolve_pretrained

    tokenizer = resolve_pretrained("tiny")
    data = write_demo_dataset(tempfile.mkdtemp(prefix="raydiff-bench-"), num_images=args.images)
    table = pa.concat_tables([pq.read_table(os.path.join(data, f)) for f in sorted(os.listdir(data))])
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, args.workers + 1), include_dashboard=False,
             log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    spec = DataSpec(DataSection(source=data, resolution=args.resolution, val_fraction=0.0),
                    batch_size=args.batch_size, concurrency=args.workers)
    results = {}
    for name, run in (("ray_data", lambda: ray_pass(spec, tokenizer)),
                      ("torch_dataloader", lambda: dataloader_pass(table, tokenizer, args.resolution,
                                                                  args.workers, args.batch_size))):
        n, seconds = run()
        results[name] = {"images": n, "seconds": round(seconds, 3), "images_per_s": round(n / seconds, 1)}
    print(json.dumps({"machine": machine, "args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
