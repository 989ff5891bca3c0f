"""Toy-scale evidence for Input Perturbation: does IP lower exposure bias and the sample distance here?

    PYTHONPATH=. python benchmarks/ip_effect.py [--steps 300] [--seeds 0 1 2] [--out docs/ip_effect_raw.json]
    PYTHONPATH=. python benchmarks/ip_effect.py --dry-run --out out.json   # toy size: 2 steps per setting

Tiny random-init SDXL on the generated demo data. Each run trains the UNet for the same number of steps with one
objective setting (gamma 0; gamma 0.1 constant / linear_decay / random_strength) and seed. It measures raydiff's
step: every step is `raydiff.train.step.TrainStep`, built by `TrainStep.build` from the tiny config with that
objective section, fed batches as a latents precompute stage feeds them (VAE moments, a fresh latent sample per
step, text embeddings). It then measures with the functions the training loop's validation uses
(`TrainStep.predict`, `raydiff.train.validator.val_loss_sums`, `raydiff.validation`):
  * val_loss: unperturbed (gamma 0), fixed timesteps and noise, held-out images;
  * exposure_bias: mean delta_t of a 10-step DDIM chain started from forward-noised held-out latents;
  * fid_latent: Fréchet distance between generated latents (same DDIM chain from pure noise, training captions) and
    the real latents of the whole dataset, on 2x2-average-pooled latents (64 features).
To fit a 2-core CPU budget the runs skip Ray and DeepSpeed: one process, TrainStep around a `PlainEngine` (raydiff's
AdamW, grad clipping 1.0, no DeepSpeed), latent moments and text embeddings encoded once. The step is the same; the
distributed machinery is tested elsewhere.
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import statistics
import time

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from raydiff import models, validation
from raydiff.config import Config, DataSection, load_config
from raydiff.data.demo import ensure_demo_dataset
from raydiff.data.pipeline import Preprocessor, row_keys
from raydiff.data.columns import LATENT_COLUMN
from raydiff.train.deepspeed_setup import build_lr_scheduler, build_optimizer
from raydiff.train.step import Conditioning, PlainEngine, TrainStep
from raydiff.train.validator import val_loss_sums

CONFIGS = {  # name -> (gamma, schedule)
    "gamma=0": (0.0, "constant"),
    "gamma=0.1 constant": (0.1, "constant"),
    "gamma=0.1 linear_decay": (0.1, "linear_decay"),
    "gamma=0.1 random_strength": (0.1, "random_strength"),
}
VAL_TIMESTEPS = [125, 375, 625, 875]
DRY_RUN = dict(steps=2, seeds=[0], batch=2, num_images=16, num_val=4, num_gen=4, chain_steps=1)


def encode_dataset(comps, path: str, num_val: int):
    """(train, val) dicts of latent moments, latents (the moments' mean, scaled), prompt embeddings, pooled
    embeddings and time_ids, encoded once."""
    table = pq.read_table(sorted(glob.glob(f"{path}/*.parquet")))
    prep = Preprocessor(models.resolve_pretrained("tiny"), DataSection(resolution=64, center_crop=True,
                                                                       random_flip=False))
    rows = prep(table)
    order = np.argsort(row_keys(table, "image"))  # held-out = smallest crc32 keys, like the pipeline's split
    with torch.no_grad():
        moments = models.latent_moments(comps.vae, torch.as_tensor(rows["pixels"]))  # what a latent cache stores
        latents = moments.chunk(2, dim=1)[0] * comps.vae.config.scaling_factor  # the distribution's mean
        embeds, pooled = models.encode_prompt(comps.text_encoder, comps.text_encoder_2, rows["input_ids"],
                                              rows["input_ids_2"])
    data = {"moments": moments, "latents": latents, "embeds": embeds, "pooled": pooled,
            "time_ids": torch.as_tensor(rows["time_ids"])}
    pick = lambda idx: {k: v[torch.as_tensor(idx)] for k, v in data.items()}  # noqa: E731
    return pick(order[num_val:]), pick(order[:num_val])


def conditioning(split: dict, idx: torch.Tensor) -> Conditioning:
    """Rows `idx` of a split as TrainStep.encode returns them (the latents: the moments' mean)."""
    return Conditioning(split["latents"][idx], split["embeds"][idx], split["pooled"][idx], split["time_ids"][idx])


def run_config(gamma: float, schedule: str, steps: int, batch: int, lr: float) -> Config:
    """The tiny config with this objective setting; the optimizer settings pinned (AdamW, constant lr)."""
    return load_config("tiny_cpu", [f"objective.gamma={gamma}", f"objective.gamma_schedule={schedule}",
                                    "objective.gamma_decay_steps=0", f"train.max_steps={steps}",
                                    f"train.batch_size={batch}", "train.grad_clip=1.0", "deepspeed.precision=fp32",
                                    "optim.optimizer=adamw", f"optim.lr={lr}", "optim.weight_decay=0.01",
                                    "optim.lr_scheduler=constant", "optim.warmup_steps=0"])


def train(comps, train_split, gamma, schedule, seed, steps, batch, lr) -> TrainStep:
    """`steps` TrainStep calls on a fresh copy of the UNet; the generator draws each batch's rows, then the step's
    latent sample, gamma and noise."""
    cfg = run_config(gamma, schedule, steps, batch, lr)
    unet = copy.deepcopy(comps.unet).train()
    opt = build_optimizer(unet.parameters(), cfg)
    engine = PlainEngine(unet, opt, cfg.train.grad_clip, build_lr_scheduler(opt, cfg))
    encoders = models.FrozenEncoders(comps.vae, comps.text_encoder, comps.text_encoder_2)
    step_fn = TrainStep.build(cfg, engine, encoders, comps.noise_scheduler.alphas_cumprod.float(),
                              comps.noise_scheduler.config.prediction_type)
    gen = torch.Generator().manual_seed(seed)
    n = train_split["latents"].shape[0]
    for step in range(steps):
        idx = torch.randint(0, n, (batch,), generator=gen)
        batch_rows = {LATENT_COLUMN: train_split["moments"][idx], "prompt_embeds": train_split["embeds"][idx],
                      "pooled": train_split["pooled"][idx], "time_ids": train_split["time_ids"][idx]}
        step_fn(batch_rows, step, gen)
    engine.eval()
    return step_fn


@torch.no_grad()
def evaluate(step_fn: TrainStep, train_split, val_split, num_gen: int, chain_steps: int) -> dict:
    """Validator.run's metrics on the held-out split (one process) and the latent Fréchet distance, all through
    TrainStep.predict."""
    ac, kind, predict = step_fn.alphas_cumprod, step_fn.prediction_type, step_fn.predict
    x0 = val_split["latents"]
    cond = conditioning(val_split, torch.arange(x0.shape[0]))
    sums = val_loss_sums(predict, x0, cond, ac, kind, VAL_TIMESTEPS, lambda t: torch.Generator().manual_seed(1000 + t))
    out = validation.loss_metrics(VAL_TIMESTEPS, sums)
    moments = validation.exposure_bias_moments(predict, x0, cond, ac, kind, chain_steps, 1.0,
                                               torch.Generator().manual_seed(7))
    out["exposure_bias"], _ = validation.exposure_bias(moments, ac)
    gen_cond = conditioning(train_split, torch.arange(num_gen) % train_split["latents"].shape[0])
    fake = validation.generate_latents(predict, (num_gen, *x0.shape[1:]), gen_cond, ac, kind, chain_steps, 1.0,
                                       torch.Generator().manual_seed(11))
    real = torch.cat([train_split["latents"], val_split["latents"]])
    out["fid_latent"] = validation.frechet_distance(F.avg_pool2d(fake, 2), F.avg_pool2d(real, 2))
    return out


def summarize(results: list[dict]) -> str:
    metrics = ["val_loss", "exposure_bias", "fid_latent"]
    lines = ["| setting | runs | " + " | ".join(f"{m} (mean ± sd)" for m in metrics) + " |",
             "|---|---|" + "---|" * len(metrics)]
    for name in CONFIGS:
        runs = [r for r in results if r["config"] == name]
        if not runs:
            continue
        cells = []
        for m in metrics:
            vals = [r[m] for r in runs]
            sd = statistics.stdev(vals) if len(vals) > 1 else float("nan")
            cells.append(f"{statistics.mean(vals):.4g} ± {sd:.2g}")
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--num-images", type=int, default=320)
    p.add_argument("--num-val", type=int, default=32)
    p.add_argument("--num-gen", type=int, default=256)
    p.add_argument("--chain-steps", type=int, default=10)
    p.add_argument("--out", default=None, help="write every run's numbers as JSON here")
    p.add_argument("--dry-run", action="store_true", help=f"toy size: {DRY_RUN}")
    args = p.parse_args(argv)
    if args.dry_run:
        vars(args).update(DRY_RUN)
    torch.manual_seed(0)
    torch.set_num_threads(2)
    comps = models.load_components("tiny")
    train_split, val_split = encode_dataset(comps, ensure_demo_dataset(models.default_cache_dir(), args.num_images),
                                            args.num_val)
    print(f"train {train_split['latents'].shape[0]} / held-out {val_split['latents'].shape[0]} latents "
          f"{tuple(train_split['latents'].shape[1:])}; {args.steps} steps x batch {args.batch}", flush=True)
    results = []
    for seed in args.seeds:
        for name, (gamma, schedule) in CONFIGS.items():
            start = time.perf_counter()
            step_fn = train(comps, train_split, gamma, schedule, seed, args.steps, args.batch, args.lr)
            row = {"config": name, "seed": seed, **evaluate(step_fn, train_split, val_split, args.num_gen,
                                                             args.chain_steps)}
            row["seconds"] = round(time.perf_counter() - start, 1)
            results.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump({"args": vars(args), "runs": results}, f, indent=1)
    print("\n" + summarize(results), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
