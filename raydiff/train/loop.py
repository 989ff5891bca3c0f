"""The per-worker training loop run by Ray Train: DeepSpeed-wrapped SDXL UNet, frozen VAE and text encoders,
the input-perturbation loss, a fair validation loss, Ray checkpoints, and the final diffusers export.

Read `train_loop_per_worker` top to bottom; the `Worker` methods are its phases.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

import deepspeed
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from raydiff import models, objective, storage
from raydiff.config import Config, from_dict
from raydiff.data import stats as data_stats
from raydiff.data.buckets import torch_batches
from raydiff.train.deepspeed_setup import PRECISION_DTYPES, build_lr_scheduler, build_optimizer, deepspeed_config
from raydiff.train.metrics_log import MetricsLog

DS_TAG = "deepspeed"  # one DeepSpeed tag per Ray checkpoint directory
STATE_FILE = "trainer_state.json"


@dataclass
class TrainState:
    """Resume state kept outside DeepSpeed's own files."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    samples_seen: int = 0  # global, across workers


@dataclass
class Conditioning:
    latents: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    time_ids: torch.Tensor


def step_generator(device: torch.device, *keys: int) -> torch.Generator:
    """A generator seeded from (seed, step, micro-step, rank, ...): randomness that needs no state to resume."""
    seed = 0
    for k in keys:
        seed = (seed * 1_000_003 + int(k)) % (2**63 - 1)
    return torch.Generator(device=device).manual_seed(seed)


class Worker:
    def __init__(self, cfg: Config, run_dir: str):
        self.cfg = cfg
        self.run_dir = run_dir
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.dtype = PRECISION_DTYPES[cfg.deepspeed.precision]
        self.state = TrainState()
        self.data_stats: str | None = None  # the run's data counter actor (raydiff.data.stats)

    # ------------------------------------------------------------ set-up

    def setup(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)  # identical UNet init on every rank (only matters for from-config models)
        encoder_dtype = self.dtype if self.dtype != torch.float16 else torch.float16
        comps = models.load_components(cfg.model.pretrained, vae=cfg.model.vae, revision=cfg.model.revision,
                                       variant=cfg.model.variant, text_encoder_dtype=encoder_dtype,
                                       vae_dtype=torch.float32)
        self.vae = comps.vae.to(self.device)
        self.text_encoder = comps.text_encoder.to(self.device)
        self.text_encoder_2 = comps.text_encoder_2.to(self.device)
        self.alphas_cumprod = comps.noise_scheduler.alphas_cumprod.to(self.device, torch.float32)
        self.num_train_timesteps = comps.noise_scheduler.config.num_train_timesteps
        self.prediction_type = cfg.objective.prediction_type or comps.noise_scheduler.config.prediction_type
        unet = comps.unet
        if cfg.train.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        optimizer = build_optimizer(unet.parameters(), cfg)
        self.engine, _, _, self.lr_scheduler = deepspeed.initialize(
            model=unet, optimizer=optimizer, lr_scheduler=build_lr_scheduler(optimizer, cfg),
            config=deepspeed_config(cfg, self.world), dist_init_required=False)

    def restore(self) -> None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return
        with checkpoint.as_directory() as ckpt_dir:
            self.engine.load_checkpoint(ckpt_dir, tag=DS_TAG)
            with open(os.path.join(ckpt_dir, STATE_FILE)) as f:
                self.state = TrainState(**json.load(f))
        if self.rank == 0:
            print(f"[raydiff] resumed from {checkpoint.path} at step {self.state.step}", flush=True)

    # ------------------------------------------------------------ per-batch work

    def encode(self, batch: dict, generator: torch.Generator) -> Conditioning:
        """Frozen VAE and text encoders, no grad: pixels -> latents, token ids -> SDXL prompt embeddings."""
        with torch.no_grad():
            pixels = batch["pixels"].to(self.device, torch.float32) / 127.5 - 1.0
            dist_ = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
            latents = dist_.sample(generator=generator).float() * self.vae.config.scaling_factor
            prompt_embeds, pooled = models.encode_prompt(
                self.text_encoder, self.text_encoder_2,
                batch["input_ids"].to(self.device), batch["input_ids_2"].to(self.device))
        return Conditioning(latents, prompt_embeds, pooled, batch["time_ids"].to(self.device, torch.float32))

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        added = {"text_embeds": cond.pooled.to(self.dtype), "time_ids": cond.time_ids.to(self.dtype)}
        return self.engine(noisy.to(self.dtype), timesteps, encoder_hidden_states=cond.prompt_embeds.to(self.dtype),
                           added_cond_kwargs=added, return_dict=False)[0]

    def train_micro_step(self, batch: dict, micro: int) -> torch.Tensor:
        gen = step_generator(self.device, self.cfg.train.seed, self.state.step, micro, self.rank)
        cond = self.encode(batch, gen)
        noised = objective.make_training_batch(cond.latents, self.alphas_cumprod, self.prediction_type,
                                               self.cfg.objective.gamma, gen)
        loss = objective.mse_per_sample(self.predict(noised.noisy, noised.timesteps, cond), noised.target).mean()
        self.engine.backward(loss)
        self.engine.step()
        return loss.detach()

    # ------------------------------------------------------------ validation

    def load_validation(self) -> None:
        """Encode the held-out split once (frozen encoders, fixed generator); every validation reuses it."""
        gen = step_generator(self.device, self.cfg.validation.seed)
        shard = ray.train.get_dataset_shard("val")
        self.val_batches = [self.encode(b, gen) for b in shard.iter_torch_batches(batch_size=self.cfg.validation.batch_size)]
        if not self.val_batches:
            raise data_stats.no_data_error(self.data_stats, "validation")

    def validate(self) -> float:
        """Unperturbed loss (gamma = 0) at fixed timesteps with fixed noise: comparable across runs with any gamma.

        Batches are spread over ranks; every rank runs the same number of forwards (ZeRO-3 gathers need all ranks),
        a rank short of batches repeats batch 0 with weight 0.
        """
        self.engine.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        rounds = math.ceil(len(self.val_batches) / self.world)
        with torch.no_grad():
            for i in range(rounds):
                index = i * self.world + self.rank
                weight = 1.0 if index < len(self.val_batches) else 0.0
                cond = self.val_batches[index if weight else 0]
                for t in self.cfg.validation.timesteps:
                    gen = step_generator(self.device, self.cfg.validation.seed, index, t)
                    ts = torch.full((cond.latents.shape[0],), t, dtype=torch.long, device=self.device)
                    noised = objective.make_training_batch(cond.latents, self.alphas_cumprod, self.prediction_type,
                                                           0.0, gen, timesteps=ts)
                    losses = objective.mse_per_sample(self.predict(noised.noisy, ts, cond), noised.target)
                    total += torch.stack([losses.sum().double(), torch.tensor(float(losses.numel()), dtype=torch.float64, device=self.device)]) * weight
        self.engine.train()
        dist.all_reduce(total)
        return (total[0] / total[1]).item()

    # ------------------------------------------------------------ checkpoint and report

    def report(self, metrics: dict, with_checkpoint: bool) -> None:
        """Every rank reports (a barrier); with a checkpoint, every rank saves its DeepSpeed shards first."""
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        tmp = tempfile.mkdtemp(prefix="raydiff-ckpt-")
        try:
            self.engine.save_checkpoint(tmp, tag=DS_TAG)
            if self.rank == 0:
                with open(os.path.join(tmp, STATE_FILE), "w") as f:
                    json.dump(dataclasses.asdict(self.state), f)
            dist.barrier()
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # ------------------------------------------------------------ the loop

    def train(self) -> None:
        cfg = self.cfg
        log = MetricsLog(storage.join(self.run_dir, "metrics.jsonl"), self.state.step) if self.rank == 0 else None
        shard = ray.train.get_dataset_shard("train")
        global_batch = cfg.train.batch_size * cfg.train.grad_accum * self.world
        loss_sum, loss_count = torch.zeros((), device=self.device), 0
        window_start, window_steps, start_step = time.perf_counter(), 0, self.state.step
        run_start = time.perf_counter()
        last_val, micro = None, 0  # micro-steps run across epoch boundaries, like DeepSpeed's own count
        if self.state.step == 0:  # the untrained baseline, so every curve starts from the same point
            last_val = self.validate()
            baseline = {"step": 0, "epoch": 0, "val_loss": last_val, "gamma": cfg.objective.gamma, "time": time.time()}
            if log is not None:
                log.append(baseline)
            ray.train.report(baseline)
        while self.state.step < cfg.train.max_steps:
            epoch_batches = 0  # an epoch without one batch would loop forever: every row was bad
            for batch in torch_batches(shard, cfg.train.batch_size, cfg.train.prefetch_batches, bool(cfg.data.buckets)):
                epoch_batches += 1
                loss_sum += self.train_micro_step(batch, micro)
                loss_count += 1
                micro += 1
                if micro < cfg.train.grad_accum:
                    continue
                micro = 0
                self.state.step += 1
                self.state.samples_seen += global_batch
                window_steps += 1
                step = self.state.step
                is_last = step >= cfg.train.max_steps
                do_val = step % cfg.validation.every_n_steps == 0 or is_last
                do_ckpt = step % cfg.checkpoint.every_n_steps == 0 or is_last
                do_report = step % cfg.train.report_every_n_steps == 0 or do_val or do_ckpt
                if not (step % cfg.train.log_every_n_steps == 0 or do_report):
                    continue
                metrics = self.step_metrics(loss_sum / max(loss_count, 1), window_start, window_steps, global_batch)
                loss_sum, loss_count = torch.zeros((), device=self.device), 0
                window_start, window_steps = time.perf_counter(), 0
                if do_val:
                    last_val = metrics["val_loss"] = self.validate()
                if log is not None:
                    log.append(metrics)
                    self.print_progress(metrics, last_val, run_start, start_step)
                if do_report:
                    self.report(metrics, with_checkpoint=do_ckpt)
                if is_last:
                    break
            if not epoch_batches:
                raise data_stats.no_data_error(self.data_stats, "train")
            self.state.epoch += 1

    def step_metrics(self, mean_loss: torch.Tensor, window_start: float, window_steps: int, global_batch: int) -> dict:
        loss = mean_loss.detach().clone()
        dist.all_reduce(loss)
        elapsed = max(time.perf_counter() - window_start, 1e-9)
        return {"step": self.state.step, "epoch": self.state.epoch, "loss": loss.item() / self.world,
                "lr": self.lr_scheduler.get_last_lr()[0], "samples_per_s": window_steps * global_batch / elapsed,
                "gamma": self.cfg.objective.gamma, "time": time.time(), **data_stats.metrics(self.data_stats)}

    def print_progress(self, m: dict, last_val: float | None, run_start: float, start_step: int) -> None:
        done = m["step"] - start_step
        per_step = (time.perf_counter() - run_start) / max(done, 1)
        eta = per_step * (self.cfg.train.max_steps - m["step"])
        val = f" | val_loss {last_val:.4f}" if last_val is not None else ""
        print(f"[raydiff] step {m['step']}/{self.cfg.train.max_steps} | loss {m['loss']:.4f}{val} | "
              f"{m['samples_per_s']:.1f} samples/s | lr {m['lr']:.2e} | ETA {eta:.0f}s", flush=True)

    # ------------------------------------------------------------ export

    def export(self) -> None:
        from raydiff.export import export_pipeline, gather_fp32_state_dict

        state_dict = gather_fp32_state_dict(self.engine)  # collective: every rank takes part
        if self.rank == 0:
            path = export_pipeline(self.cfg, state_dict, self.engine.module.config, self.prediction_type,
                                   storage.join(self.run_dir, "final"))
            print(f"[raydiff] exported diffusers pipeline to {path}", flush=True)
        dist.barrier()


def train_loop_per_worker(loop_config: dict) -> None:
    cfg = from_dict(loop_config["config"])
    os.environ.update(loop_config.get("cloud_env") or {})  # run-dir files on an object store (raydiff.storage)
    worker = Worker(cfg, loop_config["run_dir"])
    worker.data_stats = loop_config.get("data_stats")
    worker.setup()
    worker.restore()
    worker.load_validation()
    if worker.state.step < cfg.train.max_steps:
        worker.train()
    worker.export()
