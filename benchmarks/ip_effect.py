"""Does Input Perturbation do what the paper says once the model is trained? (issue 16; docs/ip_effect.md)

    PYTHONPATH=. python benchmarks/ip_effect.py --out docs/ip_effect_raw.json            # the whole plan, resumable
    PYTHONPATH=. python benchmarks/ip_effect.py --datasets digits --seeds 1 --out ...     # one shard of it
    PYTHONPATH=. python benchmarks/ip_effect.py --measure --out ...                       # step / sampling costs
    PYTHONPATH=. python benchmarks/ip_effect.py --report --out docs/ip_effect_raw.json    # table + curves PNG
    PYTHONPATH=. python benchmarks/ip_effect.py --dry-run --out out.json                  # toy size, seconds

Runs = dataset x objective setting x seed. Each run trains a freshly initialised tiny SDXL UNet (init from the seed)
with `raydiff.train.step.TrainStep` around a `PlainEngine` (raydiff's AdamW, grad clip 1.0; no Ray or DeepSpeed:
one process, one torch thread) fed precomputed batches (LATENT_COLUMN moments, text embeddings) exactly as a latent
cache feeds them. An EMA of the weights (`raydiff.objective.ema_update_`) is what is evaluated, as in the paper.

Data (both through raydiff's `Preprocessor` at 64 px, then a fixed deterministic encoding into the UNet's 4x8x8 grid,
not the random tiny VAE, whose latents are mostly its own posterior noise; docs/ip_effect.md):
  * digits: scikit-learn's 1,797 8x8 digits, upsampled to 64 px, captioned "a handwritten digit <k>"; encoding: the
    8x8 grey image in [-1, 1] in each of the 4 channels (a 16x16 nearest upsample packed 2x2 space-to-depth).
  * shapes: raydiff's generated demo shapes; encoding: the 64 px image area-pooled to 8x8, channels R, G, B, grey.
The stored moments have logvar -30, so TrainStep's latent draw is the encoding itself (+ ~4e-8 noise).

Step count: `--steps N`, or the plateau rule run on the reference run (gamma=0, seed 0) of each dataset; every other
run of that dataset then trains exactly that many steps (metrics at equal steps). Plateau rule (`flattened`): held-out
EMA val loss every `eval_every` steps; at step s >= min_steps, stop when the best loss of the last `window` steps is
less than `tol` (relative) below the best loss before them; at most max_steps.

Metrics of the final EMA weights (lower is better unless noted):
  * val_loss: unperturbed (gamma 0) MSE on the held-out split, 8 fixed timesteps, fixed noise (`val_loss_sums`);
  * exposure bias: mean delta_t (and every delta_t) of a DDIM chain of 10 and 50 steps from forward-noised held-out
    samples (`raydiff.validation.exposure_bias_moments`), Epsilon Scaling lambda 1 and 1.005;
  * fd_pixel: Fréchet distance between >= 1,000 generated samples (same samplers, fixed noise, captions of real rows)
    and all real samples, on the decoded 8x8 images; digits also fd_clf (features of an MLP classifier trained on the
    real training split: FID's recipe, a network trained on real images) and clf_acc (generated samples classified
    as their caption's digit; higher is better).
The curve (every eval_every steps): the EMA's val_loss and its exposure bias with the fewest sampler steps.
Every finished run is appended to --out (file-locked, atomic replace); a rerun skips finished runs and continues a
run in progress from the state it saved at its last curve point (--work-dir).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import fcntl
import hashlib
import io
import json
import math
import os
import statistics
import tempfile
import time

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from PIL import Image

from raydiff import models, objective, validation
from raydiff.config import Config, DataSection, load_config
from raydiff.data.columns import LATENT_COLUMN
from raydiff.data.demo import ensure_demo_dataset
from raydiff.data.pipeline import Preprocessor, row_keys
from raydiff.train.deepspeed_setup import build_lr_scheduler, build_optimizer
from raydiff.train.step import Conditioning, PlainEngine, TrainStep
from raydiff.train.validator import val_loss_sums

SETTINGS = {  # name -> (gamma, schedule)
    "gamma=0": (0.0, "constant"),
    "gamma=0.05": (0.05, "constant"),
    "gamma=0.1": (0.1, "constant"),
    "gamma=0.15": (0.15, "constant"),
    "gamma=0.1 linear_decay": (0.1, "linear_decay"),
    "gamma=0.1 random_strength": (0.1, "random_strength"),
}
DATASETS = ("digits", "shapes")
REFERENCE = "gamma=0"  # seed 0 of this setting fixes a dataset's step count (plateau rule)
VAL_TIMESTEPS = [62, 187, 312, 437, 562, 687, 812, 937]  # two per validation band
EPS_SCALES = (1.0, 1.005)
FULL = dict(min_steps=6000, max_steps=20000, eval_every=1000, window=3000, tol=0.005, batch=16, lr=1e-3,
            ema=0.999, num_gen=1000, sampler_steps=[10, 50], num_shapes=1800, num_val=300, digits_rows=0)
DRY_RUN = dict(min_steps=2, max_steps=3, eval_every=1, window=1, tol=0.005, batch=2, lr=1e-3, ema=0.999, num_gen=8,
               sampler_steps=[2, 3], num_shapes=16, num_val=4, digits_rows=40, seeds=[0])
RUN_KEYS = ("min_steps", "max_steps", "eval_every", "window", "tol", "batch", "lr", "ema", "num_gen",
            "sampler_steps", "num_shapes", "num_val", "digits_rows", "steps")  # must match to resume a file
LOGVAR_EXACT = -30.0  # DiagonalGaussianDistribution's lower clamp: std 3e-7, so a drawn latent is the encoding


# ------------------------------------------------------------------------------------------------- data


def digits_table(rows: int) -> tuple[pa.Table, np.ndarray]:
    """sklearn's digits as 64 px RGB PNGs (nearest upsampling, 0..16 -> 0..255) with class captions; labels."""
    from sklearn.datasets import load_digits  # the bench/test extra; only the digits need it

    d = load_digits()
    images, labels = d.images[:rows or None], d.target[:rows or None]
    cells = [{"bytes": _png(np.repeat(np.repeat(img, 8, 0), 8, 1)), "path": f"digit_{i:04d}.png"}
             for i, img in enumerate(images)]
    texts = [f"a handwritten digit {k}" for k in labels]
    return pa.table({"image": cells, "text": texts}), labels.astype(np.int64)


def _png(grey16: np.ndarray) -> bytes:
    pixels = np.clip(np.round(grey16 * 255 / 16), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def shapes_table(num: int) -> pa.Table:
    import pyarrow.parquet as pq

    path = ensure_demo_dataset(models.default_cache_dir(), num)
    return pq.read_table(sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".parquet")))


def encode(name: str, pixels: np.ndarray) -> torch.Tensor:
    """The fixed encoding of uint8 [N, 3, 64, 64] pixels into [N, 4, 8, 8] (values in [-1, 1])."""
    x = F.avg_pool2d(torch.as_tensor(pixels).float() / 127.5 - 1, 8)  # area pooling: exact for the digits
    grey = x.mean(1, keepdim=True)
    if name == "digits":  # nearest 2x upsample to 16x16, pixel_unshuffle(2): four copies of the digit
        return F.pixel_unshuffle(F.interpolate(grey, scale_factor=2, mode="nearest"), 2)
    return torch.cat([x, grey], 1)


def decode(name: str, latents: torch.Tensor) -> torch.Tensor:
    """The encoding's least-squares inverse, flattened: digits [N, 64] grey, shapes [N, 192] RGB."""
    if name == "digits":
        return latents.mean(1).flatten(1)
    return latents[:, :3].flatten(1)


def load_dataset(name: str, comps, args) -> dict:
    """Tensors of the whole dataset, its held-out split (the smallest crc32 keys, as the pipeline splits) and, for
    the digits, the labels and the feature classifier."""
    table, labels = digits_table(args.digits_rows) if name == "digits" else (shapes_table(args.num_shapes), None)
    prep = Preprocessor(models.resolve_pretrained("tiny"), DataSection(resolution=64, center_crop=True,
                                                                       random_flip=False))
    rows = prep(table)
    with torch.no_grad():
        embeds, pooled = models.encode_prompt(comps.text_encoder, comps.text_encoder_2, rows["input_ids"],
                                              rows["input_ids_2"])
    num_val = args.num_val if name == "shapes" or args.digits_rows else 297  # digits: 1,500 train / 297 held out
    order = torch.as_tensor(np.argsort(row_keys(table, "image")))
    data = {"name": name, "x": encode(name, rows["pixels"]), "embeds": embeds, "pooled": pooled,
            "time_ids": torch.as_tensor(rows["time_ids"]), "val": order[:num_val], "train": order[num_val:],
            "labels": None if labels is None else torch.as_tensor(labels)}
    data["classifier"] = None if labels is None else fit_classifier(data)
    return data


def fit_classifier(data: dict):
    """An MLP (64 ReLU features) on the training split's decoded digits; its held-out accuracy is reported."""
    from sklearn.neural_network import MLPClassifier

    x, y = decode("digits", data["x"]).numpy(), data["labels"].numpy()
    clf = MLPClassifier(hidden_layer_sizes=(64,), alpha=1e-3, max_iter=1000, random_state=0)
    clf.fit(x[data["train"].numpy()], y[data["train"].numpy()])
    clf.held_out_accuracy = float(clf.score(x[data["val"].numpy()], y[data["val"].numpy()]))
    return clf


def clf_features(clf, x: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.maximum(x @ clf.coefs_[0] + clf.intercepts_[0], 0))


def cond_of(data: dict, idx: torch.Tensor) -> Conditioning:
    return Conditioning(data["x"][idx], data["embeds"][idx], data["pooled"][idx], data["time_ids"][idx])


def batch_of(data: dict, idx: torch.Tensor, scaling: float) -> dict:
    """A precomputed batch as a latent cache stores it: moments (mean = encoding / scaling, logvar LOGVAR_EXACT)."""
    mean = data["x"][idx] / scaling
    return {LATENT_COLUMN: torch.cat([mean, torch.full_like(mean, LOGVAR_EXACT)], 1),
            "prompt_embeds": data["embeds"][idx], "pooled": data["pooled"][idx], "time_ids": data["time_ids"][idx]}


# ------------------------------------------------------------------------------------------------- training


def flattened(curve: list[tuple[int, float]], min_steps: int, window: int, tol: float) -> bool:
    """The plateau rule on (step, val_loss) points: at the last step s >= min_steps, the best loss of (s - window, s]
    is less than `tol` (relative) below the best loss of the steps <= s - window."""
    if not curve or curve[-1][0] < min_steps:
        return False
    cut = curve[-1][0] - window
    before = [v for s, v in curve if s <= cut]
    recent = [v for s, v in curve if s > cut]
    return bool(before) and bool(recent) and min(before) - min(recent) < tol * min(before)


def run_config(gamma: float, schedule: str, steps: int, batch: int, lr: float) -> Config:
    """The tiny config with this objective setting; the optimizer pinned (AdamW, constant lr, the tiny config's)."""
    return load_config("tiny_cpu", [f"objective.gamma={gamma}", f"objective.gamma_schedule={schedule}",
                                    "objective.gamma_decay_steps=0", f"train.max_steps={steps}",
                                    f"train.batch_size={batch}", "train.grad_clip=1.0", "deepspeed.precision=fp32",
                                    "optim.optimizer=adamw", f"optim.lr={lr}", "optim.weight_decay=0.01",
                                    "optim.lr_scheduler=constant", "optim.warmup_steps=0"])


def build_step(comps, cfg: Config, seed: int) -> TrainStep:
    """TrainStep around a PlainEngine over a UNet initialised from `seed`."""
    torch.manual_seed(seed)
    unet = type(comps.unet).from_config(comps.unet.config).train()
    opt = build_optimizer(unet.parameters(), cfg)
    engine = PlainEngine(unet, opt, cfg.train.grad_clip, build_lr_scheduler(opt, cfg))
    encoders = models.FrozenEncoders(comps.vae, comps.text_encoder, comps.text_encoder_2)
    return TrainStep.build(cfg, engine, encoders, comps.noise_scheduler.alphas_cumprod.float(),
                           comps.noise_scheduler.config.prediction_type)


class EMA:
    """fp32 shadow of the UNet (raydiff.objective.ema_update_), decay warmed up as min(decay, (1 + s) / (10 + s)),
    evaluated through a TrainStep whose engine holds the shadow weights."""

    def __init__(self, step_fn: TrainStep, decay: float):
        self.unet = step_fn.engine.module
        self.shadow = {k: p.detach().clone().float() for k, p in self.unet.named_parameters()}
        self.decay, self.eval_unet = decay, copy.deepcopy(self.unet).eval()
        self.step_fn = dataclasses.replace(step_fn, engine=PlainEngine(self.eval_unet, None))

    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        objective.ema_update_(self.shadow, dict(self.unet.named_parameters()), decay)

    def evaluator(self) -> TrainStep:
        with torch.no_grad():
            for k, p in self.eval_unet.named_parameters():
                p.copy_(self.shadow[k])
        return self.step_fn


@torch.no_grad()
def val_loss(step_fn: TrainStep, data: dict) -> dict:
    x0, cond = data["x"][data["val"]], cond_of(data, data["val"])
    sums = val_loss_sums(step_fn.predict, x0, cond, step_fn.alphas_cumprod, step_fn.prediction_type, VAL_TIMESTEPS,
                         lambda t: torch.Generator().manual_seed(1000 + t))
    return validation.loss_metrics(VAL_TIMESTEPS, sums)


@torch.no_grad()
def exposure(step_fn: TrainStep, data: dict, chain_steps: int, lam: float) -> tuple[float, list[float]]:
    x0, cond = data["x"][data["val"]], cond_of(data, data["val"])
    moments = validation.exposure_bias_moments(step_fn.predict, x0, cond, step_fn.alphas_cumprod,
                                               step_fn.prediction_type, chain_steps, lam,
                                               torch.Generator().manual_seed(7))
    return validation.exposure_bias(moments, step_fn.alphas_cumprod)


def curve_point(step: int, ema: EMA, data: dict, chain_steps: int) -> dict:
    ev = ema.evaluator()  # its own module: the training UNet stays in train mode
    loss, bias = val_loss(ev, data)["val_loss"], exposure(ev, data, chain_steps, 1.0)[0]
    return {"step": step, "val_loss": loss, "exposure_bias": bias}


NOT_RESUMED = {"train_s": 0.0, "resumed_at": []}  # the timing of a run trained in one process


def train(comps, data: dict, setting: str, seed: int, steps: int | None, args,
          partial: str | None = None) -> tuple[TrainStep, list, int, dict]:
    """Train one run: `steps` TrainStep calls, or (steps None) until the plateau rule; (EMA evaluator, curve,
    steps trained, timing). The generator draws each batch's rows, then the step's noise, gamma and timesteps. At
    every curve point the run's state is saved to `partial`, and a run finding that file continues from it; timing
    ({"train_s", "resumed_at"}) adds up the training time of every process the run took and lists where it resumed."""
    gamma, schedule = SETTINGS[setting]
    cfg = run_config(gamma, schedule, steps or args.max_steps, args.batch, args.lr)
    step_fn = build_step(comps, cfg, seed)
    ema, gen = EMA(step_fn, args.ema), torch.Generator().manual_seed(seed)
    scaling, train_rows, chain = comps.vae.config.scaling_factor, data["train"], min(args.sampler_steps)
    last = steps or args.max_steps
    start = time.perf_counter()
    curve, earlier = load_partial(partial, step_fn, ema, gen) or ([curve_point(0, ema, data, chain)], NOT_RESUMED)

    def timed() -> dict:
        return {"train_s": round(earlier["train_s"] + time.perf_counter() - start, 1),
                "resumed_at": list(earlier["resumed_at"])}  # a copy: NOT_RESUMED is shared

    for step in range(curve[-1]["step"], last):
        idx = train_rows[torch.randint(0, len(train_rows), (args.batch,), generator=gen)]
        step_fn(batch_of(data, idx, scaling), step, gen)
        ema.update(step)
        if (step + 1) % args.eval_every == 0 or step + 1 == last:
            curve.append(curve_point(step + 1, ema, data, chain))
            print(f"  {data['name']} {setting} seed {seed} {json.dumps(curve[-1])}", flush=True)
            save_partial(partial, step_fn, ema, gen, curve, timed())
            if steps is None and flattened([(p["step"], p["val_loss"]) for p in curve], args.min_steps,
                                           args.window, args.tol):
                return ema.evaluator(), curve, step + 1, timed()
    return ema.evaluator(), curve, last, timed()


def save_partial(path: str | None, step_fn: TrainStep, ema: EMA, gen: torch.Generator, curve: list,
                 timing: dict) -> None:
    if path is None:
        return
    engine = step_fn.engine
    state = {"unet": engine.module.state_dict(), "optimizer": engine.optimizer.state_dict(),
             "lr_scheduler": engine.lr_scheduler.state_dict(), "ema": ema.shadow, "generator": gen.get_state(),
             "curve": curve, "timing": timing}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_partial(path: str | None, step_fn: TrainStep, ema: EMA, gen: torch.Generator) -> tuple[list, dict] | None:
    """(the saved curve, the timing so far with this resume's step appended), with the weights, optimizer, EMA and
    generator restored; None when nothing is saved."""
    if path is None or not os.path.exists(path):
        return None
    state = torch.load(path, weights_only=False)
    engine = step_fn.engine
    engine.module.load_state_dict(state["unet"])
    engine.optimizer.load_state_dict(state["optimizer"])
    engine.lr_scheduler.load_state_dict(state["lr_scheduler"])
    ema.shadow = state["ema"]
    gen.set_state(state["generator"])
    # A file saved before the time was kept (2026-12-04) has none: its run's train_s counts from this resume.
    saved, step = state.get("timing", NOT_RESUMED), state["curve"][-1]["step"]
    print(f"  resumed {path} at step {step}", flush=True)
    return state["curve"], {"train_s": saved["train_s"], "resumed_at": saved["resumed_at"] + [step]}


def partial_path(args, run_args: dict, key: tuple) -> str:
    """Where a run in progress keeps its state: named by the run and a digest of the results file and its settings."""
    digest = hashlib.sha1(json.dumps([os.path.abspath(args.out), run_args], sort_keys=True).encode()).hexdigest()
    name = "-".join(str(k) for k in key).replace(" ", "_").replace("=", "")
    return os.path.join(args.work_dir, f"{name}-{digest[:12]}.pt")


# ------------------------------------------------------------------------------------------------- final metrics


@torch.no_grad()
def final_metrics(step_fn: TrainStep, data: dict, args) -> dict:
    out = val_loss(step_fn, data)
    real = decode(data["name"], data["x"])
    gen_idx = torch.arange(args.num_gen) % data["x"].shape[0]  # every real row's caption in turn
    cond = cond_of(data, gen_idx)
    clf = data["classifier"]
    if clf is not None:
        out["classifier_held_out_accuracy"] = clf.held_out_accuracy
    for n in args.sampler_steps:
        for lam in EPS_SCALES:
            key = f"n{n}_lam{lam:g}"
            out[f"exposure_bias_{key}"], out[f"deltas_{key}"] = exposure(step_fn, data, n, lam)
            fake = validation.generate_latents(step_fn.predict, (args.num_gen, *data["x"].shape[1:]), cond,
                                               step_fn.alphas_cumprod, step_fn.prediction_type, n, lam,
                                               torch.Generator().manual_seed(11))
            fake_px = decode(data["name"], fake)
            out[f"fd_pixel_{key}"] = validation.frechet_distance(fake_px, real)
            if clf is not None:
                fake_np = fake_px.numpy()
                out[f"fd_clf_{key}"] = validation.frechet_distance(clf_features(clf, fake_np),
                                                                   clf_features(clf, real.numpy()))
                out[f"clf_acc_{key}"] = float((clf.predict(fake_np) == data["labels"][gen_idx].numpy()).mean())
    return out


# ------------------------------------------------------------------------------------------------- results file


def _locked(path: str):
    """An exclusive lock for `path` among this machine's processes, kept outside the results folder."""
    name = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:16]
    lock = open(os.path.join(tempfile.gettempdir(), f"ip_effect-{name}.lock"), "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    return lock


def read_results(path: str) -> dict:
    if not os.path.exists(path):
        return {"runs": []}
    with open(path) as f:
        return json.load(f)


def check_args(results: dict, run_args: dict, path: str) -> None:
    """A results file is resumed only with the run settings it was made with."""
    for key, value in results.get("args", {}).items():
        if run_args.get(key) != value:
            raise SystemExit(f"{path}: args.{key} is {value!r} there but {run_args.get(key)!r} here; use another --out")


def append_run(path: str, run_args: dict, run: dict) -> None:
    """Add one finished run under a file lock, by atomic replace (a killed or stopped writer leaves the old file)."""
    with _locked(path):
        results = read_results(path)
        check_args(results, run_args, path)
        results["args"] = run_args
        results["runs"] = [r for r in results["runs"] if _key(r) != _key(run)] + [run]
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def _key(run: dict) -> tuple:
    return run["dataset"], run["setting"], run["seed"]


def planned(args) -> list[tuple[str, str, int]]:
    """The runs in order of information: a dataset's seeds one after another, each seed's settings together (the
    reference setting first: its plateau fixes the dataset's step count)."""
    settings = [s for s in SETTINGS if s in args.settings]
    return [(d, s, seed) for d in args.datasets for seed in args.seeds for s in settings]


def run_all(args, run_args: dict) -> None:
    torch.set_num_threads(args.threads)
    comps = models.load_components("tiny")
    done = {_key(r): r for r in read_results(args.out)["runs"]}
    check_args(read_results(args.out), run_args, args.out)
    datasets = {}
    for dataset, setting, seed in planned(args):
        if (dataset, setting, seed) in done:
            continue
        if dataset not in datasets:
            datasets[dataset] = load_dataset(dataset, comps, args)
            d = datasets[dataset]
            print(f"{dataset}: {len(d['train'])} train / {len(d['val'])} held out", flush=True)
        steps = args.steps or _reference_steps(done, dataset)
        if steps is None and (setting, seed) != (REFERENCE, 0):
            raise SystemExit(f"{args.out}: no finished reference run ({dataset}, {REFERENCE}, seed 0) to take the "
                             "step count from; include it in this shard or pass --steps")
        partial = partial_path(args, run_args, (dataset, setting, seed))
        step_fn, curve, trained, timing = train(comps, datasets[dataset], setting, seed, steps, args, partial)
        start = time.perf_counter()
        run = {"dataset": dataset, "setting": setting, "seed": seed, "steps": trained, "curve": curve,
               **final_metrics(step_fn, datasets[dataset], args), **timing,
               "eval_s": round(time.perf_counter() - start, 1)}
        append_run(args.out, run_args, run)
        os.remove(partial)
        done[_key(run)] = run
        print(json.dumps({k: v for k, v in run.items() if k != "curve" and not k.startswith("deltas")}), flush=True)


def _reference_steps(done: dict, dataset: str) -> int | None:
    ref = done.get((dataset, REFERENCE, 0))
    return ref["steps"] if ref else None


# ------------------------------------------------------------------------------------------------- measuring


def measure(args) -> dict:
    """Seconds per TrainStep call at each batch size (this data path) and for sampling num_gen samples."""
    torch.set_num_threads(args.threads)
    comps = models.load_components("tiny")
    data = load_dataset("digits", comps, args)
    step_fn, out = build_step(comps, run_config(0.1, "constant", 100, 16, args.lr), 0), {"threads": args.threads}
    gen, scaling = torch.Generator().manual_seed(0), comps.vae.config.scaling_factor
    for batch in (16, 32, 64):
        idx = lambda: data["train"][torch.randint(0, len(data["train"]), (batch,), generator=gen)]  # noqa: E731
        for s in range(3):
            step_fn(batch_of(data, idx(), scaling), s, gen)
        start = time.perf_counter()
        for s in range(args.measure_steps):
            step_fn(batch_of(data, idx(), scaling), s, gen)
        out[f"step_s_batch{batch}"] = (time.perf_counter() - start) / args.measure_steps
    cond = cond_of(data, torch.arange(args.num_gen) % data["x"].shape[0])
    start = time.perf_counter()
    with torch.no_grad():
        validation.generate_latents(step_fn.predict, (args.num_gen, 4, 8, 8), cond, step_fn.alphas_cumprod,
                                    step_fn.prediction_type, 5, 1.0, torch.Generator().manual_seed(0))
    out[f"sample_s_per_chain_step_{args.num_gen}"] = (time.perf_counter() - start) / 5
    return out


# ------------------------------------------------------------------------------------------------- report


FAMILIES = ("exposure_bias", "fd_pixel", "fd_clf", "clf_acc")  # per sampler step count and lambda


def table(runs: list[dict], dataset: str) -> str:
    """Mean ± sd over seeds, one row per (setting, lambda), one column per metric and sampler step count; `*` where
    |mean - gamma=0's mean| exceeds the sum of the two sds (the ±1 sd intervals do not overlap)."""
    runs = [r for r in runs if r["dataset"] == dataset]
    if not runs:
        return f"(no {dataset} runs yet)"
    ns = _sampler_step_counts(runs[0])
    cols = [(f, n) for f in FAMILIES for n in ns if f"{f}_n{n}_lam1" in runs[0]]
    by = {s: [r for r in runs if r["setting"] == s] for s in SETTINGS}
    head = " | ".join(f"{f} n={n}" for f, n in cols)
    lines = [f"| {dataset} setting | λ | seeds | steps | val_loss | {head} |", "|---" * (len(cols) + 5) + "|"]
    for s, rs in by.items():
        for lam in (rs and EPS_SCALES) or ():
            keys = (["val_loss"] if lam == 1 else [None]) + [f"{f}_n{n}_lam{lam:g}" for f, n in cols]
            cells = [_cell(rs, by[REFERENCE], k, s != REFERENCE) if k else "" for k in keys]
            steps = "/".join(map(str, sorted({r["steps"] for r in rs})))
            lines.append(f"| {s} | {lam:g} | {len(rs)} | {steps} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(runs: list[dict], reference: list[dict], key: str, compare: bool) -> str:
    mean, sd = _stats([r[key] for r in runs])
    star = ""
    if compare and reference:
        ref_mean, ref_sd = _stats([r[key] for r in reference])
        star = "*" if abs(mean - ref_mean) > sd + ref_sd else ""  # nan sds (one seed) never star
    return f"{mean:.4g}{star}" if math.isnan(sd) else f"{mean:.4g} ± {sd:.2g}{star}"


HIGHER_IS_BETTER = ("clf_acc",)


def paired_table(runs: list[dict], dataset: str) -> str:
    """Each gamma > 0 setting against gamma=0 *of the same seed* (same initial weights, batches and sampler noise),
    lambda = 1: the relative difference per seed, and on how many of the (seed, metric) pairs it is worse. Pairing
    removes the seed-to-seed spread that the mean ± sd table has to clear; with 3 seeds it is still a screen."""
    runs = [r for r in runs if r["dataset"] == dataset]
    reference = {r["seed"]: r for r in runs if r["setting"] == REFERENCE}
    if not runs or not reference:
        return f"(no {dataset} reference runs yet)"
    some = reference[min(reference)]
    keys = ["val_loss"] + [f"{f}_n{n}_lam1" for f in FAMILIES for n in _sampler_step_counts(some)
                           if f"{f}_n{n}_lam1" in some]
    head = " | ".join(k.replace("_lam1", "").replace("_n", " n=") for k in keys)
    lines = [f"| {dataset} vs γ = 0, same seed | seeds | {head} | worse |", "|---" * (len(keys) + 3) + "|"]
    for setting in SETTINGS:
        paired = sorted(((r["seed"], r) for r in runs if r["setting"] == setting and r["seed"] in reference),
                        key=lambda pair: pair[0])
        if setting == REFERENCE or not paired:
            continue
        cells, worse = [], 0
        for key in keys:
            # A zero reference (a toy run's accuracy) has no relative change: nan, shown and never counted worse.
            changes = [r[key] / reference[seed][key] - 1 if reference[seed][key] else math.nan for seed, r in paired]
            cells.append(", ".join(f"{100 * c:+.1f}" for c in changes) + " %")
            sign = -1 if key.startswith(HIGHER_IS_BETTER) else 1
            worse += sum(sign * c > 0 for c in changes)
        seeds = ", ".join(str(seed) for seed, _ in paired)
        lines.append(f"| {setting} | {seeds} | " + " | ".join(cells) + f" | {worse}/{len(keys) * len(paired)} |")
    return "\n".join(lines)


def _sampler_step_counts(run: dict) -> list[int]:
    return sorted({int(k.split("_n")[1].split("_")[0]) for k in run if k.startswith("exposure_bias_n")})


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else float("nan")


def plot(runs: list[dict], path: str) -> None:
    """Per dataset: held-out EMA val loss and 10-step exposure bias over training, mean over seeds per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = [d for d in DATASETS if any(r["dataset"] == d for r in runs)]
    fig, axes = plt.subplots(len(datasets), 2, figsize=(12, 4 * len(datasets)), squeeze=False)
    for row, dataset in zip(axes, datasets):
        for setting in SETTINGS:
            rs = [r for r in runs if r["dataset"] == dataset and r["setting"] == setting]
            if not rs:
                continue
            n = min(len(r["curve"]) for r in rs)
            steps = [p["step"] for p in rs[0]["curve"][:n]]
            for ax, key in zip(row, ("val_loss", "exposure_bias")):
                ys = np.array([[p[key] for p in r["curve"][:n]] for r in rs])
                ax.plot(steps[1:], ys.mean(0)[1:], label=f"{setting} ({len(rs)} seeds)")
                if len(rs) > 1:
                    ax.fill_between(steps[1:], ys.min(0)[1:], ys.max(0)[1:], alpha=0.15)
        row[0].set(title=f"{dataset}: held-out unperturbed val loss (EMA)", xlabel="step", yscale="log")
        row[1].set(title=f"{dataset}: exposure bias, 10-step DDIM (EMA)", xlabel="step", yscale="log")
        row[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def report(args) -> str:
    runs = read_results(args.out)["runs"]
    if not runs:
        raise SystemExit(f"{args.out}: no finished runs")
    if args.png:
        plot(runs, args.png)
    text = "\n\n".join(t for d in DATASETS for t in (table(runs, d), paired_table(runs, d)))
    print(text)
    return text


# ------------------------------------------------------------------------------------------------- CLI


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="results JSON (appended to; finished runs are skipped)")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help="fixed steps per run (default: the plateau rule)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work-dir", default=os.path.join(models.default_cache_dir(), "ip_effect_partial"),
                   help="state of runs in progress (saved at every curve point; a rerun continues from it)")
    p.add_argument("--dry-run", action="store_true", help=f"toy size: {DRY_RUN}")
    p.add_argument("--measure", action="store_true", help="time the step and the sampler; store under 'costs'")
    p.add_argument("--measure-steps", type=int, default=20)
    p.add_argument("--report", action="store_true", help="print the tables, write --png; trains nothing")
    p.add_argument("--png", default=None, help="curves PNG for --report (e.g. docs/ip_effect_curves.png)")
    for key, value in FULL.items():
        kind = type(value[0]) if isinstance(value, list) else type(value)
        p.add_argument(f"--{key.replace('_', '-')}", type=kind, nargs="+" if isinstance(value, list) else None,
                       default=value)
    args = p.parse_args(argv)
    if args.dry_run:
        vars(args).update(DRY_RUN)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report:
        report(args)
        return 0
    if args.measure:
        costs = measure(args)
        print(json.dumps(costs), flush=True)
        with _locked(args.out):
            results = read_results(args.out)
            results["costs"] = costs
            with open(args.out + ".tmp", "w") as f:
                json.dump(results, f, indent=1)
            os.replace(args.out + ".tmp", args.out)
        return 0
    run_args = {k: getattr(args, k) for k in RUN_KEYS}
    run_all(args, run_args)
    report(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
