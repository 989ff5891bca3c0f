"""The per-worker training loop run by Ray Train: DeepSpeed-wrapped SDXL UNet, frozen VAE and text encoders,
the input-perturbation loss, a fair validation loss, Ray checkpoints, and the final diffusers export.

Read `train_loop_per_worker` top to bottom; the `Worker` methods are its phases.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

from raydiff import console, models, objective, storage, validation
from raydiff.config import Config, from_dict
from raydiff.data import stats as data_stats
from raydiff.data.loader import planned_batches
from raydiff.data.stream import StreamPosition
from raydiff.export import export_pipeline, gather_fp32_state_dict
from raydiff.train import checkpoint as ckpt
from raydiff.train.checkpoint import DS_TAG, STATE_FILE
from raydiff.train.deepspeed_setup import (PRECISION_DTYPES, build_lr_scheduler, build_optimizer, deepspeed_config,
                                          initialize_engine)
from raydiff.train.ema import ShardedEMA
from raydiff.train.metrics_log import MetricsLog
from raydiff.train.step import TrainStep, step_generator
from raydiff.train.speed import apply_speed_settings, use_reserved_cpus



@dataclass
class TrainState:
    """Resume state kept outside DeepSpeed's own files."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch of the last sample trained on
    samples_seen: int = 0  # global, across workers
    stream: dict = field(default_factory=dict)  # the data position: a raydiff.data.stream.StreamPosition


VAL_PREFIXES = ("val_loss", "exposure_bias")  # the validation metrics (Worker.validate)


class Worker:
    def __init__(self, cfg: Config, run_dir: str):
        self.cfg = cfg
        self.run_dir = run_dir
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.dtype = PRECISION_DTYPES[cfg.deepspeed.precision]
        self.state = TrainState()
        self.ema: ShardedEMA | None = None
        self.last_gamma = cfg.objective.gamma
        self.data_stats: str | None = None  # the run's data counter actor (raydiff.data.stats)
        self.data_counts: dict[str, int] = {}  # its counters as of the last report
        self.data: dict = {}  # spec, tokenizer path and the source manifest (driver.build_trainer)
        self.stream = StreamPosition()
        self.checkpoint = None  # the ray.train.Checkpoint to resume from (find_checkpoint)
        self.universal = False  # it was written by another number of workers

    # ------------------------------------------------------------ set-up

    def setup(self) -> None:
        cfg = self.cfg
        use_reserved_cpus(cfg.scaling.cpus_per_worker)
        torch.manual_seed(cfg.train.seed)  # identical UNet init on every rank (only matters for from-config models)
        encoder_dtype = self.dtype if self.dtype != torch.float16 else torch.float16
        comps = models.load_components(cfg.model.pretrained, vae=cfg.model.vae, revision=cfg.model.revision,
                                       variant=cfg.model.variant, text_encoder_dtype=encoder_dtype,
                                       vae_dtype=torch.float32, unet_dtype=self.dtype)
        encoders = models.FrozenEncoders(comps.vae.to(self.device), comps.text_encoder.to(self.device),
                                         comps.text_encoder_2.to(self.device))
        self.alphas_cumprod = comps.noise_scheduler.alphas_cumprod.to(self.device, torch.float32)
        self.num_train_timesteps = comps.noise_scheduler.config.num_train_timesteps
        self.prediction_type = cfg.objective.prediction_type or comps.noise_scheduler.config.prediction_type
        self.comps = comps  # tokenizers and scheduler config for the sample images
        unet = apply_speed_settings(comps.unet, cfg)  # attention kernel, checkpointing, channels_last, compile
        self.find_checkpoint()
        ds_config = deepspeed_config(cfg, self.world)
        if self.universal:  # DeepSpeed re-shards a universal checkpoint's optimizer state for any world size
            ds_config["checkpoint"] = {"load_universal": True}
        optimizer = build_optimizer(unet.parameters(), cfg)
        self.engine, _, _, self.lr_scheduler = initialize_engine(
            model=unet, optimizer=optimizer, lr_scheduler=build_lr_scheduler(optimizer, cfg),
            config=ds_config, dist_init_required=False)
        self.step = TrainStep(self.engine, encoders, self.alphas_cumprod, self.prediction_type, cfg.objective,
                              cfg.objective.gamma_decay_steps or cfg.train.max_steps, self.dtype,
                              models.zeros_for_empty_prompt(cfg.model.pretrained, cfg.model.revision))
        if cfg.train.ema_decay is not None:  # of the fp32 masters, each rank its own slice (raydiff.train.ema)
            self.ema = ShardedEMA(self.engine, cfg.train.ema_decay)

    def find_checkpoint(self) -> None:
        """The newest complete checkpoint, and whether it was written by another number of workers."""
        checkpoint = ray.train.get_checkpoint()
        self.checkpoint = ckpt.latest_complete(checkpoint, self.rank == 0) if checkpoint is not None else None
        saved_world = ckpt.saved_world_size(self.checkpoint) if self.checkpoint is not None else 0
        self.universal = saved_world not in (0, self.world)
        if self.universal and self.rank == 0:
            print(f"[raydiff] checkpoint written by {saved_world} workers, resuming on {self.world}: converting it to "
                  "DeepSpeed's universal format (once, on rank 0)", flush=True)

    def restore(self) -> None:
        """Everything an unbroken run would have at this step: weights, optimizer, LR schedule, EMA, RNGs and the
        data position (so the next batch is the one the unbroken run would train on)."""
        checkpoint = self.checkpoint
        if checkpoint is not None:
            # Only the files this rank reads; another world size is converted once, by rank 0 (train/checkpoint.py).
            with ckpt.resume_dir(checkpoint, self.rank, self.world, universal=self.universal, barrier=dist.barrier,
                                 elastic=self.engine.zero_elastic_checkpoint()) as (ckpt_dir, load_dir):
                self.engine.load_checkpoint(load_dir, tag=DS_TAG)
                with open(os.path.join(ckpt_dir, STATE_FILE)) as f:
                    self.state = TrainState(**json.load(f))
                if self.ema is not None:
                    self.ema.load(ckpt_dir)
                if self.state.stream.get("world") == self.world:
                    ckpt.load_rng_state(ckpt_dir, self.rank)
        saved = StreamPosition(**self.state.stream) if self.state.stream else StreamPosition()
        self.stream = saved.continue_with(self.world, self.cfg.train.batch_size)
        if checkpoint is not None and self.rank == 0:
            print(f"[raydiff] resumed from {checkpoint.path} at step {self.state.step} "
                  f"(epoch {self.state.epoch}, data position {self.stream.samples_consumed()})", flush=True)

    # ------------------------------------------------------------ per-batch work

    def train_micro_step(self, batch: dict, micro: int) -> torch.Tensor:
        gen = step_generator(self.device, self.cfg.train.seed, self.state.step, micro, self.rank)
        loss, self.last_gamma = self.step(batch, self.state.step, gen)  # gamma: read at log time (no host sync)
        return loss

    def update_ema(self) -> None:
        if self.ema is not None:
            self.ema.update()

    # ------------------------------------------------------------ validation

    def load_validation(self) -> None:
        """Encode the held-out split once (frozen encoders, fixed generator); every validation reuses it."""
        gen = step_generator(self.device, self.cfg.validation.seed)
        shard = ray.train.get_dataset_shard("val")
        self.val_batches = [self.step.encode(b, gen) for b in shard.iter_torch_batches(batch_size=self.cfg.validation.batch_size)]
        if not self.val_batches:
            raise data_stats.no_data_error(self.data_stats, "validation")

    def validate(self) -> dict:
        """Unperturbed loss (gamma = 0, no offset noise, unweighted) at fixed timesteps with fixed noise, overall and
        per timestep band, plus the exposure bias of a short sampling chain: comparable across runs with any gamma.

        Batches are spread over ranks; every rank runs the same number of forwards (ZeRO-3 gathers need all ranks),
        a rank short of batches repeats batch 0 with weight 0.
        """
        v = self.cfg.validation
        self.engine.eval()
        sums = torch.zeros(len(v.timesteps), 2, dtype=torch.float64, device=self.device)
        chain_steps = v.exposure_bias_denoising_steps
        moments = torch.zeros(max(chain_steps, 1), 3, dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for index, cond, weight in self.my_val_batches():
                for row, t in enumerate(v.timesteps):
                    gen = step_generator(self.device, v.seed, index, t)
                    ts = torch.full((cond.latents.shape[0],), t, dtype=torch.long, device=self.device)
                    noised = objective.make_training_batch(cond.latents, self.alphas_cumprod, self.prediction_type,
                                                           0.0, gen, timesteps=ts)
                    losses = objective.mse_per_sample(self.step.predict(noised.noisy, ts, cond), noised.target)
                    sums[row] += torch.stack([losses.sum().double(), torch.tensor(float(losses.numel()), dtype=torch.float64, device=self.device)]) * weight
                if chain_steps:
                    moments += weight * validation.exposure_bias_moments(
                        self.step.predict, cond.latents, cond, self.alphas_cumprod, self.prediction_type, chain_steps,
                        v.eps_scale, step_generator(self.device, v.seed, index, -1))
        self.engine.train()
        dist.all_reduce(sums)
        metrics = validation.loss_metrics(v.timesteps, sums, self.num_train_timesteps)
        if chain_steps:
            dist.all_reduce(moments)
            metrics["exposure_bias"], _ = validation.exposure_bias(moments, self.alphas_cumprod.cpu())
        self.render_samples()
        return metrics

    def my_val_batches(self):
        """(index, batch, weight) for this rank, padded to the same count on every rank."""
        rounds = math.ceil(len(self.val_batches) / self.world)
        for i in range(rounds):
            index = i * self.world + self.rank
            weight = 1.0 if index < len(self.val_batches) else 0.0
            yield index, self.val_batches[index if weight else 0], weight

    def render_samples(self) -> None:
        """Rank 0 renders validation.prompts into samples/step_XXXXXX.png (and TensorBoard) with a fixed seed."""
        v = self.cfg.validation
        if not v.prompts or self.rank != 0:
            return
        if self.cfg.deepspeed.zero_stage == 3:  # rank 0 alone cannot run a sharded UNet (its forwards gather)
            print("[raydiff] validation images skipped: ZeRO-3 shards the UNet across ranks", flush=True)
            return
        c, unet = self.comps, self.engine.module
        scheduler = EulerDiscreteScheduler.from_config(c.noise_scheduler.config, prediction_type=self.prediction_type)
        e = self.step.encoders
        pipe = StableDiffusionXLPipeline(vae=e.vae, text_encoder=e.text_encoder, text_encoder_2=e.text_encoder_2,
                                         tokenizer=c.tokenizer,
                                         tokenizer_2=c.tokenizer_2, unet=unet, scheduler=scheduler,
                                         add_watermarker=False)
        pipe.set_progress_bar_config(disable=True)
        was_training = unet.training
        unet.eval()
        try:
            grid = validation.render_grid(pipe, v.prompts, v.image_denoising_steps, v.seed, v.eps_scale,
                                          self.prediction_type)
        finally:
            unet.train(was_training)
        self.save_grid(grid)

    def save_grid(self, grid) -> None:
        buf = io.BytesIO()
        grid.save(buf, format="PNG")
        path = storage.join(self.run_dir, "samples", f"step_{self.state.step:06d}.png")
        storage.write_bytes(path, buf.getvalue())
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # TensorBoard is optional
            return
        if not storage.is_local(self.run_dir):
            return
        with SummaryWriter(os.path.join(self.run_dir, "tensorboard")) as writer:
            writer.add_image("samples", np.asarray(grid), self.state.step, dataformats="HWC")

    # ------------------------------------------------------------ checkpoint and report

    def report(self, metrics: dict, with_checkpoint: bool) -> None:
        """Every rank reports (a barrier); with a checkpoint, every rank first saves its DeepSpeed shards to local disk,
        uploaded in the background (raydiff.train.checkpoint.report)."""
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        places = [None] * self.world  # every rank's data position goes into rank 0's trainer_state.json
        dist.all_gather_object(places, (self.stream.consumed[self.rank], self.stream.emitted[self.rank]))
        self.state.stream = dataclasses.asdict(dataclasses.replace(
            self.stream, consumed=[c for c, _ in places], emitted=[list(e) for _, e in places]))
        tmp = ckpt.staging_dir()  # after this rank's previous upload: one in flight at most
        try:
            self.engine.save_checkpoint(tmp, tag=DS_TAG)
            if self.rank == 0:
                with open(os.path.join(tmp, STATE_FILE), "w") as f:
                    json.dump(dataclasses.asdict(self.state), f)
            if self.ema is not None:
                self.ema.save(tmp)
            ckpt.save_rng_state(tmp, self.rank)
            ckpt.write_manifest(tmp, self.rank)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        # Ray's upload thread uploads and deletes it while training goes on; the run's last checkpoint is waited for,
        # so that nothing after it (the export) can fail before it is safe.
        ckpt.report(metrics, tmp, wait=self.state.step >= self.cfg.train.max_steps)

    # ------------------------------------------------------------ the loop

    def train(self) -> None:
        cfg = self.cfg
        # Rows up to the restored step stay; a start from scratch (also after a failure before any checkpoint)
        # logs everything again, from the step-0 baseline.
        kept = self.state.step if self.checkpoint is not None else -1
        log = MetricsLog(storage.join(self.run_dir, "metrics.jsonl"), kept) if self.rank == 0 else None
        global_batch = cfg.train.batch_size * cfg.train.grad_accum * self.world
        loss_sum, loss_count = torch.zeros((), device=self.device), 0
        window_start, window_steps, start_step = time.perf_counter(), 0, self.state.step
        run_start = time.perf_counter()
        micro = 0  # micro-steps run across epoch boundaries, like DeepSpeed's own count
        if self.state.step == 0:  # the untrained baseline, so every curve starts from the same point
            baseline = {"step": 0, "epoch": 0, **self.validate(), "gamma": self.gamma_now(), "time": time.time()}
            if log is not None:
                log.append(baseline)
                print(f"[raydiff] step 0/{cfg.train.max_steps} | val_loss {baseline['val_loss']:.4f} (untrained)",
                      flush=True)
            ray.train.report(baseline)
        for batch, consumed, epoch in self.train_batches():
            loss_sum += self.train_micro_step(batch, micro)
            loss_count += 1
            micro += 1
            if micro < cfg.train.grad_accum:
                continue
            micro = 0
            # Only rows of completed optimizer steps count as consumed.
            self.stream.consumed[self.rank], self.stream.emitted[self.rank] = consumed
            self.update_ema()
            self.state.step += 1
            self.state.epoch = epoch
            self.state.samples_seen += global_batch
            window_steps += 1
            step = self.state.step
            is_last = step >= cfg.train.max_steps
            do_val = step % cfg.validation.every_n_steps == 0 or is_last
            do_ckpt = step % cfg.checkpoint.every_n_steps == 0 or is_last
            do_report = step % cfg.train.report_every_n_steps == 0 or do_val or do_ckpt
            if not (step % cfg.train.log_every_n_steps == 0 or do_report):
                continue
            if do_report or not self.data_counts:  # an actor round trip: refreshed when Ray gets a report
                self.data_counts = data_stats.metrics(self.data_stats)
            metrics = self.step_metrics(loss_sum / max(loss_count, 1), window_start, window_steps, global_batch)
            loss_sum, loss_count = torch.zeros((), device=self.device), 0
            if do_val:
                metrics.update(self.validate())
            if log is not None:
                log.append(metrics)
                self.print_progress(metrics, run_start, start_step)
            if is_last:
                self.finish(metrics)
                return
            if do_report:
                self.report(metrics, with_checkpoint=do_ckpt)
            # samples_per_s measures training only, not validation or checkpoint time.
            window_start, window_steps = time.perf_counter(), 0
        raise data_stats.no_data_error(self.data_stats, "train")  # the stream ended: every row of an epoch was bad

    def finish(self, metrics: dict) -> None:
        """The last step: the checkpoint first (a failing export then resumes from it and only exports again), then
        the export, then the full metrics. The checkpoint's report leaves out the validation metrics on purpose: a
        Tune scheduler acts on reports with val_loss and could stop the trial at max_steps before the export."""
        self.report({k: v for k, v in metrics.items() if not k.startswith(VAL_PREFIXES)}, with_checkpoint=True)
        self.export()
        ray.train.report(metrics)

    def train_batches(self):
        """(torch batch, rows consumed, epoch) from this rank's seeded stream, from the restored data position."""
        d = self.data
        t = self.cfg.train
        rows_needed = (t.max_steps - self.state.step) * t.grad_accum * t.batch_size  # one execution for the run
        for batch, consumed, epoch in planned_batches(d["spec"], d["tokenizer_path"], d["manifest"],
                                                      self.stream, self.rank, t.batch_size, t.prefetch_batches,
                                                      rows_needed):
            yield {c: torch.from_numpy(np.ascontiguousarray(v)) for c, v in batch.items()}, consumed, epoch

    def step_metrics(self, mean_loss: torch.Tensor, window_start: float, window_steps: int, global_batch: int) -> dict:
        loss = mean_loss.detach().clone()
        dist.all_reduce(loss)
        elapsed = max(time.perf_counter() - window_start, 1e-9)
        return {"step": self.state.step, "epoch": self.state.epoch, "loss": loss.item() / self.world,
                "lr": self.lr_scheduler.get_last_lr()[0], "samples_per_s": window_steps * global_batch / elapsed,
                "gamma": float(self.last_gamma), "time": time.time(), **self.data_counts}

    def gamma_now(self) -> float:
        """The gamma the schedule gives at the current step (random_strength: its mean, gamma / 2)."""
        o = self.cfg.objective
        return o.gamma / 2 if o.gamma_schedule == "random_strength" else float(self.step.gamma(self.state.step))

    def print_progress(self, m: dict, run_start: float, start_step: int) -> None:
        """One line per logged step (`train.log_every_n_steps`): a steady cadence; val_loss only when just computed."""
        done = m["step"] - start_step
        per_step = (time.perf_counter() - run_start) / max(done, 1)
        eta = per_step * (self.cfg.train.max_steps - m["step"])
        val = f" | val_loss {m['val_loss']:.4f}" if "val_loss" in m else ""
        print(f"[raydiff] step {m['step']}/{self.cfg.train.max_steps} | loss {m['loss']:.4f}{val} | "
              f"{m['samples_per_s']:.1f} samples/s | lr {m['lr']:.2e} | ETA {eta:.0f}s", flush=True)

    # ------------------------------------------------------------ export

    def export(self) -> None:
        # Collectives: every rank takes part. With EMA, the export holds the EMA weights (buffers: the live module's).
        state_dict = gather_fp32_state_dict(self.engine, params=self.ema is None)
        ema_weights = self.ema.full_state_dict() if self.ema is not None else None
        if self.rank == 0:
            state_dict.update(ema_weights or {})
            path = export_pipeline(self.cfg, state_dict, self.engine.module.config, self.prediction_type,
                                   storage.join(self.run_dir, "final"), info={"ema": self.ema is not None,
                                                                               "ema_decay": self.cfg.train.ema_decay})
            print(f"[raydiff] exported diffusers pipeline to {path}", flush=True)
        dist.barrier()


def train_loop_per_worker(loop_config: dict) -> None:
    if not loop_config.get("verbose"):
        console.quiet_process()
        console.disable_hf_progress_bars()
    cfg = from_dict(loop_config["config"])
    os.environ.update(loop_config.get("cloud_env") or {})  # run-dir files on an object store (raydiff.storage)
    worker = Worker(cfg, loop_config["run_dir"])
    worker.data_stats = loop_config.get("data_stats")
    worker.data = loop_config["data"]
    worker.setup()
    worker.restore()
    worker.load_validation()
    if worker.state.step < cfg.train.max_steps:
        worker.train()  # exports at its last step
    else:
        worker.export()  # resumed from the final checkpoint
