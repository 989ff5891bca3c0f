"""Toy-scale evidence for Input Perturbation: does IP lower exposure bias and the sample distance here?

    PYTHONPATH=. python benchmarks/ip_effect.py [--steps 300] [--seeds 0 1 2] [--out docs/ip_effect_raw.json]

Tiny random-init SDXL on the generated demo data. Each run trains the UNet for the same number of steps with one
objective setting (gamma 0; gamma 0.1 constant / linear_decay / random_strength) and seed, then measures with the
functions the training loop uses (`raydiff.objective`, `raydiff.validation`):
  * val_loss: unperturbed (gamma 0), fixed timesteps and noise, held-out images;
  * exposure_bias: mean delta_t of a 10-step DDIM chain started from forward-noised held-out latents;
  * fid_latent: Fréchet distance between generated latents (same DDIM chain from pure noise, training captions) and
    the real latents of the whole dataset, on 2x2-average-pooled latents (64 features).
To fit a 2-core CPU budget the runs skip Ray and DeepSpeed: one process, plain AdamW, latents and text embeddings
encoded once. The objective code path is the same; the distributed machinery is tested elsewhere.
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

from raydiff import models, objective, validation
from raydiff.data.demo import ensure_demo_dataset
from raydiff.data.pipeline import Preprocessor, row_keys

CONFIGS = {  # name -> (gamma, schedule)
    "gamma=0": (0.0, "constant"),
    "gamma=0.1 constant": (0.1, "constant"),
    "gamma=0.1 linear_decay": (0.1, "linear_decay"),
    "gamma=0.1 random_strength": (0.1, "random_strength"),
}
VAL_TIMESTEPS = [125, 375, 625, 875]


def encode_dataset(comps, path: str, num_val: int):
    """(train, val) dicts of latents, prompt embeddings, pooled embeddings and time_ids, encoded once."""
    table = pq.read_table(sorted(glob.glob(f"{path}/*.parquet")))
    prep = Preprocessor(models.resolve_pretrained("tiny"), resolution=64, center_crop=True, random_flip=False)
    rows = prep(table)
    order = np.argsort(row_keys(table, "image"))  # held-out = smallest crc32 keys, like the pipeline's split
    with torch.no_grad():
        pixels = torch.as_tensor(rows["pixels"]).float() / 127.5 - 1
        latents = comps.vae.encode(pixels).latent_dist.mean * comps.vae.config.scaling_factor
        embeds, pooled = models.encode_prompt(comps.text_encoder, comps.text_encoder_2, rows["input_ids"],
                                              rows["input_ids_2"])
    data = {"latents": latents, "embeds": embeds, "pooled": pooled, "time_ids": torch.as_tensor(rows["time_ids"])}
    pick = lambda idx: {k: v[torch.as_tensor(idx)] for k, v in data.items()}  # noqa: E731
    return pick(order[num_val:]), pick(order[:num_val])


def predictor(unet, split: dict):
    def predict(noisy, timesteps, idx):
        added = {"text_embeds": split["pooled"][idx], "time_ids": split["time_ids"][idx]}
        return unet(noisy, timesteps, encoder_hidden_states=split["embeds"][idx], added_cond_kwargs=added,
                    return_dict=False)[0]
    return predict


def train(comps, train_split, gamma, schedule, seed, steps, batch, lr):
    unet = copy.deepcopy(comps.unet).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2)
    ac = comps.noise_scheduler.alphas_cumprod.float()
    gen = torch.Generator().manual_seed(seed)
    predict = predictor(unet, train_split)
    n = train_split["latents"].shape[0]
    for step in range(steps):
        idx = torch.randint(0, n, (batch,), generator=gen)
        g = objective.gamma_at(schedule, gamma, step, steps, batch, False, gen)
        noised = objective.make_training_batch(train_split["latents"][idx], ac, "epsilon", g, gen)
        loss = objective.weighted_loss(predict(noised.noisy, noised.timesteps, idx), noised)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
    return unet.eval()


@torch.no_grad()
def evaluate(comps, unet, train_split, val_split, num_gen: int, chain_steps: int) -> dict:
    ac = comps.noise_scheduler.alphas_cumprod.float()
    x0, idx = val_split["latents"], torch.arange(val_split["latents"].shape[0])
    predict = predictor(unet, val_split)
    sums = []
    for t in VAL_TIMESTEPS:
        ts = torch.full((x0.shape[0],), t, dtype=torch.long)
        noised = objective.make_training_batch(x0, ac, "epsilon", 0.0, torch.Generator().manual_seed(1000 + t), ts)
        losses = objective.mse_per_sample(predict(noised.noisy, ts, idx), noised.target)
        sums.append([losses.sum().item(), losses.numel()])
    out = validation.loss_metrics(VAL_TIMESTEPS, torch.tensor(sums, dtype=torch.float64))
    moments = validation.exposure_bias_moments(predict, x0, idx, ac, "epsilon", chain_steps, 1.0,
                                               torch.Generator().manual_seed(7))
    out["exposure_bias"], _ = validation.exposure_bias(moments, ac)
    gen_idx = torch.arange(num_gen) % train_split["latents"].shape[0]
    fake = validation.sample_latents(predictor(unet, train_split), (num_gen, *x0.shape[1:]), gen_idx, ac, "epsilon",
                                     chain_steps, 1.0, torch.Generator().manual_seed(11))
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
    args = p.parse_args(argv)
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
            unet = train(comps, train_split, gamma, schedule, seed, args.steps, args.batch, args.lr)
            row = {"config": name, "seed": seed, **evaluate(comps, unet, train_split, val_split, args.num_gen,
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
