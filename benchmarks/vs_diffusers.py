"""raydiff against the diffusers SDXL training script, side by side on the same model, data and batch.

The peer is diffusers' `examples/text_to_image/train_text_to_image_sdxl.py`, unmodified (fetch it at the commit the
docs pin: docs/performance.md, "raydiff vs the diffusers script"). Both train the same tiny random-init SDXL pipeline
directory (built here with `raydiff.models.build_tiny_sdxl`) on the same image folder (`metadata.jsonl` + PNGs of the
demo shapes), 64 px center crop, no flip, batch 4, AdamW at a constant LR, grad clip 1.0, fp32, and a checkpoint and
an exported pipeline at the end. The peer logs every step (a progress bar and a TensorBoard scalar) and encodes the
captions and VAE latents of the whole dataset before its first step (`datasets.map`), so raydiff's best layout
precomputes latents too (`data.precompute: latents`).

    PYTHONPATH=. python benchmarks/vs_diffusers.py --diffusers-script /path/to/train_text_to_image_sdxl.py \
        --peer-python /path/to/peer-venv/bin/python --steps 500 --rounds 2 --json docs/vs_diffusers_raw.json

Each round runs every trainer once, in a rotated order (a drift of the machine's load hits every side). Per run:
- steady samples/s: the steps from `--steady-from` to the last, from step end times (the peer: a global
  optimizer-step hook, `torch.optim.optimizer.register_optimizer_step_post_hook`, installed by a launcher that then
  runs the script unchanged; raydiff: the `time` of each `metrics.jsonl` row, every step or every 10th);
- start-up: process start to the end of step 1 (raydiff logging every 10th step: its first row less 9 median steps);
- wall: process start to exit (the export, the summary and Ray's shutdown included).
The last line is `ratio raydiff/diffusers = X.XX`: raydiff's best layout over the peer in steady samples/s (medians
over rounds). `--dry-run` prepares the inputs and runs each trainer for 4 steps without timing anything.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# What raydiff runs in each layout, on top of the shared settings (`raydiff_overrides`).
LAYOUTS = {
    # The tiny config's worker shape, one worker holding the whole batch: online encoding, ZeRO-2.
    "default": ["scaling.num_workers=1", "scaling.cpus_per_worker=0.5", "deepspeed.zero_stage=2"],
    # The best for one 2-core machine: one worker on one core (one torch thread) leaving the other to Ray's processes
    # and the data stream (the tiny UNet's step is bound by per-op dispatch: a second intra-op thread barely shortens
    # it, and on two shared cores it waits at every parallel region for a core a Ray process holds; measured side by
    # side with `best_2cpu`), ZeRO-0 (ZeRO partitions nothing with one worker and its hooks cost per tensor), the
    # latents and embeddings encoded once into a cache, and a Ray report (a barrier through an actor, tens of ms
    # here) every 100 steps: TensorBoard gets fewer points between validations. A metrics.jsonl row every step, a
    # console line every 2 s (the defaults).
    "best": ["scaling.num_workers=1", "scaling.cpus_per_worker=1", "deepspeed.zero_stage=0",
             "data.precompute=latents", "data.cache_dir={workdir}/raydiff-cache", "train.report_every_n_steps=100"],
    # `best` with both cores for the worker (two torch threads): the best layout until 2026-12-04.
    "best_2cpu": ["scaling.num_workers=1", "scaling.cpus_per_worker=2", "deepspeed.zero_stage=0",
                  "data.precompute=latents", "data.cache_dir={workdir}/raydiff-cache",
                  "train.report_every_n_steps=100"],
    # Two workers of one core each (data parallel on one machine), online encoding.
    "two_workers": ["scaling.num_workers=2", "scaling.cpus_per_worker=1", "train.batch_size={half_batch}",
                    "deepspeed.zero_stage=2"],
}
BEST = "best"

# Installs a per-step clock, then runs the peer's script as __main__ with its own arguments (nothing in it changed).
PEER_LAUNCHER = """\
import atexit, json, os, runpy, sys, time
from torch.optim.optimizer import register_optimizer_step_post_hook
times = []
register_optimizer_step_post_hook(lambda optimizer, args, kwargs: times.append(time.time()))
atexit.register(lambda: json.dump(times, open(os.environ["PEER_STEP_TIMES"], "w")))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

# The floor: the same UNet (loaded from the shared pipeline directory), the same batch shapes, forward + MSE + backward
# + clip + AdamW (torch's fused CPU kernel, as raydiff uses) in a bare loop on fixed random tensors: no data, no
# noise schedule, no logging. What no trainer of this model and batch can undercut on this machine.
FLOOR_SCRIPT = """\
import json, os, sys, time
import torch
from diffusers import UNet2DConditionModel
model, steps, batch, latent, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet").train()
c = unet.config
text_embeds = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
x = torch.randn(batch, c.in_channels, latent, latent)
cond = dict(encoder_hidden_states=torch.randn(batch, 77, c.cross_attention_dim),
            added_cond_kwargs={"text_embeds": torch.randn(batch, text_embeds), "time_ids": torch.randn(batch, 6)})
opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=True)
times = []
for _ in range(steps):
    t = torch.randint(0, 1000, (batch,))
    loss = torch.nn.functional.mse_loss(unet(x, t, **cond).sample, x)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    times.append(time.time())
json.dump(times, open(out, "w"))
"""
FLOOR = "floor"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--diffusers-script", help="path to diffusers' train_text_to_image_sdxl.py (unmodified)")
    p.add_argument("--peer-python", default=sys.executable,
                   help="the Python that runs the peer (it needs torchvision, datasets and accelerate)")
    p.add_argument("--workdir", default=None, help="model, data, caches and runs (default: a temporary directory)")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--steady-from", type=int, default=20, help="steady state: the steps after this one")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--layouts", nargs="+", default=["default", BEST], choices=sorted(LAYOUTS))
    p.add_argument("--skip-peer", action="store_true", help="raydiff's layouts only (no ratio)")
    p.add_argument("--floor", action="store_true",
                   help="also run the floor: the bare UNet step in a loop (FLOOR_SCRIPT), in this Python")
    p.add_argument("--peer-threads", type=int, default=None,
                   help="a control: run the peer with OMP_NUM_THREADS/MKL_NUM_THREADS set to this (default: unset, "
                        "torch's own choice: one thread per core)")
    p.add_argument("--dry-run", action="store_true", help="4 steps of each trainer, nothing timed")
    p.add_argument("--json", default=None, help="write every run's numbers here")
    return p.parse_args(argv)


# ------------------------------------------------------------------ inputs both trainers share


def prepare_inputs(workdir: str, images: int, seed: int = 0) -> tuple[str, str]:
    """(the tiny SDXL pipeline directory, an image folder with metadata.jsonl), built once per workdir."""
    from raydiff.data.demo import make_sample
    from raydiff.models import build_tiny_sdxl

    model = os.path.join(workdir, "tiny-sdxl")
    if not os.path.isfile(os.path.join(model, "model_index.json")):
        build_tiny_sdxl(model, seed=seed)
    data = os.path.join(workdir, f"images-{images}")
    if not os.path.isfile(os.path.join(data, "metadata.jsonl")):
        os.makedirs(data, exist_ok=True)
        rng = random.Random(seed)
        lines = []
        for i in range(images):
            image, caption = make_sample(rng)
            name = f"{i:05d}.png"
            image.save(os.path.join(data, name))
            lines.append(json.dumps({"file_name": name, "text": caption}))
        with open(os.path.join(data, "metadata.jsonl.tmp"), "w") as f:
            f.write("\n".join(lines) + "\n")
        os.rename(os.path.join(data, "metadata.jsonl.tmp"), os.path.join(data, "metadata.jsonl"))
    return model, data


# ------------------------------------------------------------------ the two trainers


def peer_command(args, model: str, data: str, out: str) -> list[str]:
    return [args.peer_python, "-c", PEER_LAUNCHER, args.diffusers_script,
            f"--pretrained_model_name_or_path={model}", f"--train_data_dir={data}", f"--output_dir={out}",
            f"--resolution={args.resolution}", "--center_crop", f"--train_batch_size={args.batch_size}",
            f"--max_train_steps={args.steps}", f"--checkpointing_steps={args.steps}", "--learning_rate=1e-4",
            "--lr_scheduler=constant", "--lr_warmup_steps=0", "--max_grad_norm=1.0", "--mixed_precision=no",
            "--dataloader_num_workers=0", "--seed=0", "--report_to=tensorboard"]


def raydiff_overrides(args, model: str, data: str, workdir: str, name: str, layout: str) -> list[str]:
    shared = [
        f"run.storage_path={workdir}/raydiff-runs", f"run.name={name}", f"model.pretrained={model}",
        f"data.source={data}", f"data.resolution={args.resolution}", "data.center_crop=true", "data.random_flip=false",
        "data.val_max_samples=4", f"train.batch_size={args.batch_size}", f"train.max_steps={args.steps}",
        "train.log_every_n_steps=1", "optim.lr=1e-4", "optim.lr_scheduler=constant", "optim.warmup_steps=0",
        f"checkpoint.every_n_steps={args.steps}", f"validation.every_n_steps={args.steps}",
        "validation.exposure_bias_denoising_steps=0", "validation.prompts=[]", "logging.sample_prompts=[]",
    ]
    fill = {"workdir": workdir, "half_batch": max(1, args.batch_size // 2)}
    return shared + [o.format(**fill) for o in LAYOUTS[layout]]


def run_timed(cmd: list[str], env: dict, log_path: str) -> tuple[float, float]:
    """(start wall-clock time, seconds to exit); raises with the log's tail when the command fails."""
    start = time.time()
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"{cmd[:4]} exited {proc.returncode}; log {log_path}:\n{tail}")
    return start, wall


def rates(step_end_times: dict[int, float], start: float, steady_from: int, batch: int) -> dict:
    """Steady samples/s over the steps after `steady_from` (the first timed step at or after it), median seconds
    per step between consecutive timed steps, and the start-up: process start to the end of step 1 (estimated from
    the first timed step and the median when step 1 has no time)."""
    steps = sorted(s for s in step_end_times if s >= steady_from)
    first, last = steps[0], steps[-1]
    steady = (last - first) * batch / (step_end_times[last] - step_end_times[first])
    per_step = [(step_end_times[b] - step_end_times[a]) / (b - a) for a, b in zip(steps, steps[1:])]
    median = statistics.median(per_step)
    s0 = min(step_end_times)
    return {"steady_samples_per_s": steady, "median_step_s": median, "max_step_s": max(per_step),
            "startup_s": step_end_times[s0] - start - (s0 - 1) * median, "steps": last}


def run_peer(args, model: str, data: str, workdir: str, tag: str) -> dict:
    out = os.path.join(workdir, f"peer-{tag}")
    shutil.rmtree(out, ignore_errors=True)
    times_file = os.path.join(workdir, f"peer-{tag}-steps.json")
    env = {**os.environ, "PEER_STEP_TIMES": times_file, "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": os.path.join(workdir, "hf-datasets"), **peer_thread_env(args)}
    start, wall = run_timed(peer_command(args, model, data, out), env, os.path.join(workdir, f"peer-{tag}.log"))
    with open(times_file) as f:
        times = json.load(f)
    return {"wall_s": wall, **rates({i + 1: t for i, t in enumerate(times)}, start, args.steady_from, args.batch_size)}


def run_floor(args, model: str, workdir: str, tag: str) -> dict:
    times_file = os.path.join(workdir, f"floor-{tag}-steps.json")
    latent = args.resolution // 8  # the VAE's downsampling
    cmd = [sys.executable, "-c", FLOOR_SCRIPT, model, str(args.steps), str(args.batch_size), str(latent), times_file]
    start, wall = run_timed(cmd, {**os.environ, "HF_HUB_OFFLINE": "1"}, os.path.join(workdir, f"floor-{tag}.log"))
    with open(times_file) as f:
        times = json.load(f)
    return {"wall_s": wall, **rates({i + 1: t for i, t in enumerate(times)}, start, args.steady_from, args.batch_size)}


def peer_thread_env(args) -> dict:
    n = args.peer_threads
    return {} if n is None else {"OMP_NUM_THREADS": str(n), "MKL_NUM_THREADS": str(n)}


def run_raydiff(args, model: str, data: str, workdir: str, layout: str, tag: str) -> dict:
    name = f"{layout}-{tag}"
    shutil.rmtree(os.path.join(workdir, "raydiff-runs", name), ignore_errors=True)
    cmd = [sys.executable, "-m", "raydiff.train", "--config", "tiny_cpu"]
    for override in raydiff_overrides(args, model, data, workdir, name, layout):
        cmd += ["--set", override]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("RAY_ADDRESS", None)
    start, wall = run_timed(cmd, env, os.path.join(workdir, f"raydiff-{name}.log"))
    with open(os.path.join(workdir, "raydiff-runs", name, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    times = {r["step"]: r["time"] for r in rows if r["step"] > 0 and "loss" in r}
    global_batch = args.batch_size  # every layout keeps the global batch
    return {"wall_s": wall, **rates(times, start, args.steady_from, global_batch)}


# ------------------------------------------------------------------ rounds and the report


def trainers(args) -> list[str]:
    return (([] if args.skip_peer else ["diffusers"]) + ([FLOOR] if args.floor else [])
            + [f"raydiff:{layout}" for layout in args.layouts])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        args.steps, args.steady_from, args.rounds = 4, 1, 1
    if not args.skip_peer and not args.diffusers_script:
        raise SystemExit("--diffusers-script is required (or --skip-peer): see docs/performance.md")
    workdir = args.workdir or tempfile.mkdtemp(prefix="raydiff-vs-diffusers-")
    os.makedirs(workdir, exist_ok=True)
    model, data = prepare_inputs(workdir, args.images)
    names = trainers(args)
    results: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]  # rotated: each trainer runs first once
        for n in order:
            tag = f"r{r}"
            res = (run_peer(args, model, data, workdir, tag) if n == "diffusers"
                   else run_floor(args, model, workdir, tag) if n == FLOOR
                   else run_raydiff(args, model, data, workdir, n.split(":", 1)[1], tag))
            results[n].append(res)
            print(f"round {r} {n}: {json.dumps({k: round(v, 3) for k, v in res.items()})}", flush=True)
    summary = report(args, results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": results, "summary": summary, "uname": os.uname().release,
                       "cpus": os.cpu_count()}, f, indent=1)
    return 0


def report(args, results: dict[str, list[dict]]) -> dict:
    summary = {n: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for n, runs in results.items()}
    print(f"\n{'trainer':<22}{'steady samples/s':>18}{'median step s':>15}{'start-up s':>12}{'wall s':>10}"
          f"  ({args.steps} steps, batch {args.batch_size}, medians over {args.rounds} rounds)")
    for n, s in summary.items():
        print(f"{n:<22}{s['steady_samples_per_s']:>18.2f}{s['median_step_s']:>15.3f}{s['startup_s']:>12.1f}"
              f"{s['wall_s']:>10.1f}")
    best = f"raydiff:{BEST}"
    for n in (n for n in summary if n != "diffusers"):  # per round: the machine's drift is shared within a round
        for ref in (r for r in ("diffusers", FLOOR) if r in summary and r != n):
            per_round = [a["steady_samples_per_s"] / b["steady_samples_per_s"]
                         for a, b in zip(results[n], results[ref])]
            print(f"steady {n}/{ref} per round: {', '.join(f'{x:.2f}' for x in per_round)}")
    if "diffusers" in summary and best in summary:
        peer, ours = summary["diffusers"], summary[best]
        print(f"wall raydiff/diffusers = {ours['wall_s'] / peer['wall_s']:.2f} (lower is better)")
        print(f"ratio raydiff/diffusers = {ours['steady_samples_per_s'] / peer['steady_samples_per_s']:.2f}")
    return summary


if __name__ == "__main__":
    sys.exit(main())
