"""Images/s of the Ray Data preprocessing vs a torch DataLoader running the same transforms with as many workers,
and training samples/s with precomputed latents vs online encoding.

    python benchmarks/data_throughput.py --images 256 --resolution 64 --workers 2
    python benchmarks/data_throughput.py --training --steps 40     # precompute vs online (adds ~10 min on 2 cores)

Both sides run ``raydiff.data.pipeline.Preprocessor`` (decode, EXIF, mode conversion, resize, crop, flip, time_ids,
both tokenizers) on the same parquet rows in batches of ``--batch-size``; Ray Data with a fixed pool of
``--workers`` actors, the DataLoader with ``num_workers=--workers`` processes. Each side is timed over one full
pass after a warm-up pass (actor start-up, tokenizer loading and worker forking are excluded).

``--training``: (1) the step alone, in this process: the frozen encoders + UNet forward/backward + AdamW step vs the
same step fed precomputed latent moments and embeddings (same model, batch and generator); (2) whole raydiff runs of
the tiny config (1 worker, ZeRO-2) with ``data.precompute`` none, latents streamed, and latents from a cache built
by that run; steady-state samples/s is the median of the per-step ``samples_per_s`` after the first 5 steps, and
the run's wall time (Ray start, cache build, data start-up included) is reported next to it.
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
        from raydiff.data.pipeline import Preprocessor

        if self.pre is None:  # built in the worker process, like Ray's actors build theirs
            self.pre = Preprocessor(self.tokenizer, resolution=self.resolution)
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


def step_costs(resolution: int, batch: int, steps: int) -> dict:
    """Seconds per training step with the encoders in the step vs with precomputed inputs (one process)."""
    import numpy as np
    import torch

    from raydiff import models, objective
    from raydiff.data.pipeline import Preprocessor

    comps = models.load_components("tiny")
    unet, vae = comps.unet, comps.vae
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    rng = np.random.default_rng(0)
    pixels = torch.from_numpy(rng.integers(0, 256, (batch, 3, resolution, resolution), dtype=np.uint8))
    ids, ids_2 = (torch.from_numpy(a) for a in Preprocessor(models.resolve_pretrained("tiny"))._tokenize(
        ["a red circle on a blue square"] * batch))
    tids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch, dtype=torch.float32)
    alphas = comps.noise_scheduler.alphas_cumprod.float()
    with torch.no_grad():
        moments = models.latent_moments(vae, pixels)
        cached = models.encode_prompt(comps.text_encoder, comps.text_encoder_2, ids, ids_2)

    def step(online: bool, gen: torch.Generator) -> None:
        with torch.no_grad():
            m = models.latent_moments(vae, pixels) if online else moments
            embeds, pooled = (models.encode_prompt(comps.text_encoder, comps.text_encoder_2, ids, ids_2)
                              if online else cached)
        latents = models.sample_latents(m, vae.config.scaling_factor, gen)
        noised = objective.make_training_batch(latents, alphas, "epsilon", 0.1, gen)
        pred = unet(noised.noisy, noised.timesteps, encoder_hidden_states=embeds,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": tids}).sample
        objective.weighted_loss(pred, noised, None).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    out = {}
    for _ in range(2):  # interleaved rounds: both modes see the same machine state
        for name, online in (("online", True), ("precomputed", False)):
            gen = torch.Generator().manual_seed(0)
            for _ in range(3):
                step(online, gen)
            start = time.perf_counter()
            for _ in range(steps):
                step(online, gen)
            out.setdefault(name, []).append((time.perf_counter() - start) / steps)
    res = {k: round(min(v), 4) for k, v in out.items()}
    res["speedup"] = round(res["online"] / res["precomputed"], 2)
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
                                     "logging.sample_prompts=[]", "validation.sample_steps=0", *precompute])
    start = time.perf_counter()
    out = run_training(cfg)
    wall = time.perf_counter() - start
    rates = [r["samples_per_s"] for r in read_metrics(out.metrics_path) if r.get("step", 0) > 5 and "samples_per_s" in r]
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--training", action="store_true", help="precompute vs online encoding instead")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--train-workers", type=int, default=1)
    args = p.parse_args()
    machine = f"{platform.machine()} {os.cpu_count()} CPUs, {platform.python_version()}"
    if args.training:
        print(json.dumps({"machine": machine, "args": vars(args), "results": training_comparison(args)}, indent=2))
        return

    import ray

    from raydiff.data.demo import write_demo_dataset
    from raydiff.data.pipeline import DataSpec
    from raydiff.models import resolve_pretrained

    tokenizer = resolve_pretrained("tiny")
    data = write_demo_dataset(tempfile.mkdtemp(prefix="raydiff-bench-"), num_images=args.images)
    table = pa.concat_tables([pq.read_table(os.path.join(data, f)) for f in sorted(os.listdir(data))])
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, args.workers + 1), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    spec = DataSpec(source=data, resolution=args.resolution, val_fraction=0.0, batch_size=args.batch_size,
                    concurrency=args.workers)
    results = {}
    for name, run in (("ray_data", lambda: ray_pass(spec, tokenizer)),
                      ("torch_dataloader", lambda: dataloader_pass(table, tokenizer, args.resolution,
                                                                  args.workers, args.batch_size))):
        n, seconds = run()
        results[name] = {"images": n, "seconds": round(seconds, 3), "images_per_s": round(n / seconds, 1)}
    print(json.dumps({"machine": machine, "args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
