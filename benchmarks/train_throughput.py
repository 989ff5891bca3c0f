"""Steady-state training samples/s of raydiff (Ray Train + DeepSpeed, one worker) vs its step in a plain loop.

    PYTHONPATH=. python benchmarks/train_throughput.py --steps 30 --warmup 6 --batch-size 4 --threads 2
    PYTHONPATH=. python benchmarks/train_throughput.py --dry-run --json out.json   # toy size, no Ray

It measures raydiff's step: every side runs `raydiff.train.step.TrainStep`, built by `TrainStep.build` from the
run config as `Worker.__init__` builds it, on the tiny SDXL (`models.load_components("tiny")`) on CPU: the same
objective (gamma 0.1, epsilon target), batch size, AdamW, grad clipping 1.0 and online encoding (frozen VAE + both
text encoders in each step), each micro-step with the generator `Worker.train_micro_step` makes:

- `plain`: a single-process loop of TrainStep around `PlainEngine` (torch AdamW, no DeepSpeed); its batches are the
  demo dataset's rows run through the same `Preprocessor` as Ray Data uses, held in memory (no loader cost at all);
- `deepspeed`: the same loop, TrainStep around `deepspeed.initialize`'s engine with raydiff's own DeepSpeed config
  (world size 1, gloo, no Ray): isolates what DeepSpeed costs;
- `raydiff`: `raydiff.train.driver.run_training` unchanged (TorchTrainer, one worker, Ray Data streaming the demo
  dataset through the preprocessing actors); its rate comes from rank 0's `metrics.jsonl` rows (`time` of each
  step, so logging, data waits and everything else between steps count);
- `raydiff_zeroN_cached` (`--data cached`): the same with `data.precompute: latents` and a `data.cache_dir`: the
  run encodes the training split once (before step 0), then each step reads latent moments and text embeddings;
  compared with `plain_precomputed`, the plain loop fed the same precomputed tensors (the encoders run once, before
  the loop). This pair isolates what the orchestration costs when the data path is not preprocessing on the same CPUs.

Steady state = the steps after `--warmup`. The plain loop runs first and last (its mean is the reference), so a
drift in the machine's load shows up as a difference between the two. Start-up costs are reported separately.
Speed switches (`--plain-variants`) run the plain loop with `raydiff.train.speed.apply_speed_settings`.
The last line is `ratio raydiff/plain = X.XX` for the default set-up (ZeRO-2, streaming data).
`--dry-run`: one timed step after one warm-up, batch 2, plain and ZeRO-2 only, no Ray
(tests/test_benchmarks_dry_run.py runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time


DRY_RUN = dict(steps=1, warmup=1, batch_size=2, zero=[2], skip_ray=True, plain_variants=[], data=["streaming"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="timed steady-state steps")
    p.add_argument("--warmup", type=int, default=6, help="untimed steps first (allocator, oneDNN, data spin-up)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (= raydiff cpus_per_worker)")
    p.add_argument("--zero", type=int, nargs="*", default=[0, 2], help="ZeRO stages for deepspeed/raydiff")
    p.add_argument("--plain-variants", nargs="*", default=[],
                   help="extra plain-loop runs with speed switches: eager channels_last gradient_checkpointing compile")
    p.add_argument("--skip-deepspeed", action="store_true")
    p.add_argument("--skip-ray", action="store_true")
    p.add_argument("--data", nargs="+", default=["streaming"], choices=["streaming", "cached"],
                   help="raydiff's training data: preprocessed online per epoch, and/or a precomputed latent cache")
    p.add_argument("--log-every", type=int, default=1, help="raydiff train.log_every_n_steps (metrics.jsonl rows)")
    p.add_argument("--health-check-s", type=float, default=None,
                   help="RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (raydiff's driver sets 0.2 unless given)")
    p.add_argument("--profile-worker", default=None, metavar="DIR",
                   help="cProfile the worker's Worker.train into DIR and print its top functions")
    p.add_argument("--json", default=None, help="write all results to this file")
    p.add_argument("--dry-run", action="store_true", help=f"toy size, no Ray: {DRY_RUN}")
    args = p.parse_args(argv)
    if args.dry_run:
        vars(args).update(DRY_RUN)
    return args


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:
    # Before torch is imported: the driver, the plain loop and the Ray worker (which inherits it) all get this
    # many intra-op threads; Ray would otherwise derive it from cpus_per_worker.
    os.environ["OMP_NUM_THREADS"] = str(ARGS.threads)
    # Ray workers must import this checkout's raydiff (an editable install elsewhere would otherwise win).
    os.environ["PYTHONPATH"] = os.pathsep.join([ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from raydiff import models  # noqa: E402
from raydiff.config import Config, load_config  # noqa: E402

GAMMA = 0.1


def bench_config(args, zero: int, storage: str, name: str, speed: tuple[str, ...] = (), cached: bool = False) -> Config:
    """The run config both sides share; validation/checkpoint/report steps are pushed past the run."""
    total = args.warmup + args.steps
    never = 10**6
    overrides = [
        f"run.storage_path={storage}", f"run.name={name}", "scaling.num_workers=1",
        f"scaling.cpus_per_worker={args.threads}", f"train.max_steps={total}", f"train.batch_size={args.batch_size}",
        f"train.log_every_n_steps={args.log_every}", f"train.report_every_n_steps={never}",
        f"validation.every_n_steps={never}",
        f"checkpoint.every_n_steps={never}", "validation.exposure_bias_denoising_steps=0", "validation.prompts=[]",
        "logging.sample_prompts=[]", "logging.tensorboard=false", "optim.warmup_steps=0",
        f"deepspeed.zero_stage={zero}", f"objective.gamma={GAMMA}",
        # One epoch covers every step: an epoch boundary restarts the Ray Data pipeline (docs/performance.md).
        f"data.demo_num_images={max(320, 2 * total * args.batch_size)}",
    ]
    speed_keys = {"eager": "train.attention=eager", "channels_last": "train.channels_last=true",
                  "gradient_checkpointing": "train.gradient_checkpointing=true", "compile": "train.compile=true"}
    cache = ["data.precompute=latents", f"data.cache_dir={storage}/cache"] if cached else []
    return load_config("tiny_cpu", overrides + cache + [speed_keys[s] for s in speed])


# ------------------------------------------------------------------ data


def in_memory_batches(cfg: Config, count: int, precomputed: bool = False) -> list[dict[str, torch.Tensor]]:
    """The demo dataset's rows through raydiff's Preprocessor (and, ``precomputed``, its precompute Encoder), as the
    batches a training worker receives."""
    from dataclasses import asdict

    from raydiff.data.precompute import Encoder, EncoderSpec

    import pyarrow as pa
    import pyarrow.parquet as pq

    from raydiff.data.demo import ensure_demo_dataset
    from raydiff.data.pipeline import Preprocessor

    src = ensure_demo_dataset(models.default_cache_dir(), num_images=cfg.data.demo_num_images)
    table = pa.concat_tables([pq.read_table(os.path.join(src, f)) for f in sorted(os.listdir(src))])
    pre = Preprocessor(models.resolve_pretrained("tiny"), cfg.data, seed=cfg.train.seed)
    encode = Encoder(asdict(EncoderSpec(pretrained="tiny", mode="latents"))) if precomputed else dict
    bs = cfg.train.batch_size
    batches = []
    for i in range(count):
        rows = table.slice((i * bs) % (table.num_rows - bs), bs)
        batches.append({k: torch.from_numpy(v) for k, v in encode(pre(rows)).items()})
    return batches


# ------------------------------------------------------------------ the plain loop (and the DeepSpeed-wrapped one)


class PlainTrainer:
    """raydiff's TrainStep, built as Worker.__init__ builds it, without Ray: around a PlainEngine (torch AdamW, no
    DeepSpeed) or, with `deepspeed_zero`, a one-process DeepSpeed engine with raydiff's DeepSpeed config."""

    def __init__(self, cfg: Config, deepspeed_zero: int | None = None):
        from raydiff.train.deepspeed_setup import build_lr_scheduler, build_optimizer
        from raydiff.train.speed import apply_speed_settings
        from raydiff.train.step import PlainEngine, TrainStep

        t0 = time.perf_counter()
        torch.manual_seed(cfg.train.seed)
        c = models.load_components("tiny")
        unet = apply_speed_settings(c.unet, cfg)
        opt = build_optimizer(unet.parameters(), cfg)
        self.load_s = time.perf_counter() - t0
        self.deepspeed_init_s = None
        if deepspeed_zero is None:
            engine = PlainEngine(unet, opt, cfg.train.grad_clip, build_lr_scheduler(opt, cfg))
        else:
            from raydiff.train.deepspeed_setup import deepspeed_config, initialize_engine

            init_process_group()
            t0 = time.perf_counter()
            engine, _, _, _ = initialize_engine(model=unet, optimizer=opt, lr_scheduler=build_lr_scheduler(opt, cfg),
                                                config=deepspeed_config(cfg, 1), dist_init_required=False)
            self.deepspeed_init_s = time.perf_counter() - t0
        encoders = models.FrozenEncoders(c.vae, c.text_encoder, c.text_encoder_2)
        self.step_fn = TrainStep.build(cfg, engine, encoders, c.noise_scheduler.alphas_cumprod.float(),
                                       c.noise_scheduler.config.prediction_type)
        self.seed = cfg.train.seed
        self.loss_sum = torch.zeros(())

    def step(self, batch: dict, index: int) -> None:
        from raydiff.train.step import step_generator

        # The generator Worker.train_micro_step makes (grad_accum 1, rank 0).
        loss, _ = self.step_fn(batch, index, step_generator(torch.device("cpu"), self.seed, index, 0, 0))
        self.loss_sum += loss  # kept on-device, as the worker does; no per-step .item()


def init_process_group() -> None:
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def run_local(args, cfg: Config, batches, deepspeed_zero: int | None = None) -> dict:
    trainer = PlainTrainer(cfg, deepspeed_zero)
    times = []
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            cpu0 = time.process_time()  # all threads of this process
        t0 = time.perf_counter()
        trainer.step(batches[i], i)
        times.append(time.perf_counter() - t0)
    cpu = time.process_time() - cpu0
    steady = times[args.warmup:]
    n = len(steady) * args.batch_size
    return {"samples_per_s": round(n / sum(steady), 3), "cpu_s_per_sample": round(cpu / n, 4),
            "median_step_s": round(statistics.median(steady), 4), "first_step_s": round(times[0], 3),
            "model_load_s": round(trainer.load_s, 3),
            **({"deepspeed_init_s": round(trainer.deepspeed_init_s, 3)} if deepspeed_zero is not None else {}),
            "final_mean_loss": round(float(trainer.loss_sum) / len(times), 4)}


# ------------------------------------------------------------------ raydiff through its driver


class CpuSampler:
    """Polls the CPU time of this process and every descendant (the local Ray cluster: GCS, raylet, Train
    controller and worker, Ray Data actors) so a wall-clock window can be charged in CPU-seconds per process kind.

    On a shared, overloaded machine wall-clock rates mostly measure the other jobs; CPU-seconds per sample measure
    what each side actually computes.
    """

    def __init__(self, interval_s: float = 0.25):
        import threading

        import psutil

        self.me, self.interval = psutil.Process(), interval_s
        self.series: dict[int, tuple[str, list[tuple[float, float]]]] = {}  # pid -> (kind, [(time, cpu_s)])
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def kind(cmdline: list[str], is_driver: bool) -> str:
        text = " ".join(cmdline[:2])
        if is_driver:
            return "driver (this process)"
        if "RayTrainWorker" in text:
            return "train worker"
        if any(k in text for k in ("MapWorker", "SplitCoordinator", "ReadParquet", "_StatsActor", "Autoscaling")):
            return "ray data"
        return "ray system (gcs, raylet, controller, agents)"

    def _run(self) -> None:
        import psutil

        while not self.stop.is_set():
            now = time.time()
            for proc in [self.me, *self.me.children(recursive=True)]:
                try:
                    t = proc.cpu_times()
                    # Ray renames a pooled worker (ray::IDLE) when it becomes an actor: the latest title counts.
                    kind = self.kind(proc.cmdline(), proc.pid == self.me.pid)
                    samples = self.series.get(proc.pid, (kind, []))[1]
                    samples.append((now, t.user + t.system))
                    self.series[proc.pid] = (kind, samples)
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    pass
            self.stop.wait(self.interval)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def window(self, start: float, end: float) -> dict[str, float]:
        """CPU-seconds used between two wall-clock times, summed per process kind."""
        def at(samples, t):
            before = [cpu for ts, cpu in samples if ts <= t]
            return before[-1] if before else 0.0

        out: dict[str, float] = {}
        for kind, samples in self.series.values():
            out[kind] = out.get(kind, 0.0) + at(samples, end) - at(samples, start)
        return out


def profiled_loop(loop_config: dict) -> None:
    """The real train_loop_per_worker with Worker.train (the step loop only) under cProfile (runs in the worker)."""
    import cProfile

    from raydiff.train import loop

    train = loop.Worker.train

    def profiled_train(self):
        prof = cProfile.Profile()
        prof.runcall(train, self)
        prof.dump_stats(loop_config["profile_path"])

    loop.Worker.train = profiled_train
    loop.train_loop_per_worker(loop_config)


def print_profile(path: str, top: int = 25) -> None:
    import pstats

    stats = pstats.Stats(path)
    print(f"worker profile (Worker.train, {stats.total_tt:.1f} s): {path}")
    stats.sort_stats("tottime").print_stats(top)


def run_raydiff(args, cfg: Config) -> dict:
    from raydiff.train import driver
    from raydiff.train.metrics_log import read_metrics

    original_build = driver.build_trainer
    profile_path = None
    if args.profile_worker:
        os.makedirs(args.profile_worker, exist_ok=True)
        profile_path = os.path.join(os.path.abspath(args.profile_worker), f"{cfg.run.name}.prof")

        def build_trainer(cfg, callbacks=None):  # the driver's trainer, running the profiled loop
            trainer = original_build(cfg, callbacks)
            trainer.train_loop_per_worker = profiled_loop
            trainer.train_loop_config["profile_path"] = profile_path
            return trainer

        driver.build_trainer = build_trainer
    t0, wall0 = time.perf_counter(), time.time()
    try:
        with CpuSampler() as cpu:
            out = driver.run_training(cfg)
    finally:
        driver.build_trainer = original_build
    total_s = time.perf_counter() - t0
    if profile_path:
        print_profile(profile_path)
    rows = {r["step"]: r for r in read_metrics(out.metrics_path)}
    # Rows exist every `log_every` steps: the window runs between the logged steps nearest warm-up and the end.
    logged = sorted(s for s in rows if s >= args.warmup)
    first, last = logged[0], logged[-1]
    steady_s = rows[last]["time"] - rows[first]["time"]
    windows = [rows[s]["samples_per_s"] for s in logged[1:]]
    n = (last - first) * args.batch_size
    by_kind = cpu.window(rows[first]["time"], rows[last]["time"])
    return {
        "samples_per_s": round(n / steady_s, 3),
        "cpu_s_per_sample": round(sum(by_kind.values()) / n, 4),
        "cpu_s_per_sample_by_process": {k: round(v / n, 4) for k, v in sorted(by_kind.items())},
        # The worker's own per-step window (excludes its metrics.jsonl write and the all-reduce for the loss).
        "samples_per_s_in_step_window": round(len(windows) / sum(1 / w for w in windows), 3),
        "steady_steps": last - first,
        # worker start, data, model load, DeepSpeed init, baseline validation
        "to_step0_row_s": round(rows[0]["time"] - wall0, 3),
        "first_step_s": round(rows[1]["time"] - rows[0]["time"], 3) if 1 in rows else None,  # needs log_every 1
        "warmup_steps_s": round(rows[first]["time"] - rows[0]["time"], 3),
        "after_last_step_s": round(time.time() - rows[last]["time"], 3),  # final val, checkpoint, export, shutdown
        "total_s": round(total_s, 3),
    }


# ------------------------------------------------------------------ main


def main(args) -> None:
    torch.set_num_threads(args.threads)
    storage = tempfile.mkdtemp(prefix="raydiff-bench-train-")
    base = bench_config(args, 2, storage, "plain")
    batches = in_memory_batches(base, args.warmup + args.steps)
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.1f} at start"
    results: dict = {"machine": machine, "torch": torch.__version__, "args": vars(args)}

    def record(name: str, value: dict) -> None:
        value["load_avg_1m_after"] = round(os.getloadavg()[0], 1)
        results[name] = value
        print(f"{name}: {json.dumps(value)}", flush=True)

    record("plain", run_local(args, base, batches))
    if "cached" in args.data:
        record("plain_precomputed", run_local(args, base, in_memory_batches(base, args.warmup + args.steps, True)))
    for variant in args.plain_variants:
        record(f"plain+{variant}", run_local(args, bench_config(args, 2, storage, "v", (variant,)), batches))
    if not args.skip_deepspeed:
        for zero in args.zero:
            record(f"deepspeed_zero{zero}", run_local(args, bench_config(args, zero, storage, "ds"), batches, zero))
    if not args.skip_ray:
        from raydiff.train.driver import init_ray

        if args.health_check_s is not None:
            os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(args.health_check_s)
        t0 = time.perf_counter()
        init_ray(base)
        record("ray_init", {"seconds": round(time.perf_counter() - t0, 3)})
        for zero in args.zero:
            for data in args.data:
                suffix = "" if data == "streaming" else "_cached"
                cfg = bench_config(args, zero, storage, f"z{zero}{data[0]}", cached=data == "cached")
                record(f"raydiff_zero{zero}{suffix}", run_raydiff(args, cfg))
        import ray

        ray.shutdown()
    record("plain_again", run_local(args, base, batches))

    plain = statistics.mean([results["plain"]["samples_per_s"], results["plain_again"]["samples_per_s"]])
    results["plain_mean_samples_per_s"] = round(plain, 3)
    print(f"\nsteady-state samples/s (batch {args.batch_size}, {args.steps} steps after {args.warmup} warm-up, "
          f"{args.threads} threads):")
    plain_cpu = statistics.mean([results["plain"]["cpu_s_per_sample"], results["plain_again"]["cpu_s_per_sample"]])
    results["plain_mean_cpu_s_per_sample"] = round(plain_cpu, 4)
    print(f"  {'run':32s} {'samples/s':>9s} {'ratio':>6s}   {'CPU-s/sample':>12s} {'CPU ratio':>9s}")
    for name, value in results.items():
        if isinstance(value, dict) and "samples_per_s" in value:
            print(f"  {name:32s} {value['samples_per_s']:9.2f} {value['samples_per_s'] / plain:6.2f}   "
                  f"{value['cpu_s_per_sample']:12.3f} {plain_cpu / value['cpu_s_per_sample']:9.2f}")
    print("start-up (s), separate from the steady state:")
    if "ray_init" in results:
        print(f"  {'ray init':32s} {results['ray_init']['seconds']:9.1f}")
    startup_keys = ("model_load_s", "deepspeed_init_s", "to_step0_row_s", "first_step_s")
    for name, value in results.items():
        if isinstance(value, dict) and "samples_per_s" in value:
            parts = [f"{k[:-2]} {value[k]:.1f}" for k in startup_keys if value.get(k) is not None]
            print(f"  {name:32s} {', '.join(parts)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    key = ("raydiff_zero2" if "raydiff_zero2" in results
           else next((k for k in results if k.startswith("raydiff_")), None))
    if key:
        # Samples per CPU-second relative to plain: the same ratio with the machine's other load factored out.
        print(f"ratio raydiff/plain (CPU time, {key}) = {plain_cpu / results[key]['cpu_s_per_sample']:.2f}")
        for zero in args.zero:
            if f"raydiff_zero{zero}_cached" in results:
                ratio = (results[f"raydiff_zero{zero}_cached"]["samples_per_s"]
                         / results["plain_precomputed"]["samples_per_s"])
                print(f"ratio raydiff/plain (precomputed latents, ZeRO-{zero}) = {ratio:.2f}")
        print(f"ratio raydiff/plain = {results[key]['samples_per_s'] / plain:.2f}")


if __name__ == "__main__":
    sys.exit(main(ARGS))
