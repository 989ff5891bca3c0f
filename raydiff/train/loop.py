"""The per-worker training loop run by Ray Train: DeepSpeed-wrapped SDXL UNet, frozen VAE and text encoders,
the input-perturbation loss, a fair validation loss, Ray checkpoints, and the final diffusers export.

Read `train_loop_per_worker` top to bottom, then `Worker.train`. The step is raydiff.train.step's; the components
that act on their own cadence are raydiff.train.checkpointer (save, restore), raydiff.train.validator (val loss,
exposure bias, sample images) and raydiff.train.metrics_logger (metrics.jsonl, progress lines, step metrics).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from raydiff import console, models, storage
from raydiff.config import Config, from_dict
from raydiff.data import stats
from raydiff.data.loader import Prefetched, held_out_batches, planned_batches
from raydiff.data.stream import StreamPosition
from raydiff.export import export_pipeline, gather_fp32_state_dict
from raydiff.train import elastic
from raydiff.train.checkpointer import Checkpointer, TrainState
from raydiff.train.deepspeed_setup import (PRECISION_DTYPES, build_lr_scheduler, build_optimizer, deepspeed_config,
                                          initialize_engine)
from raydiff.train.ema import ShardedEMA
from raydiff.train.metrics_logger import MetricsLogger
from raydiff.train.preemption import Notice, PreemptionWatch
from raydiff.train.row_trace import RowTrace, group_attempt_id
from raydiff.train.speed import apply_speed_settings, use_reserved_cpus
from raydiff.train.step import TrainStep, step_generator
from raydiff.train.validator import METRIC_PREFIXES, Validator

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Place:
    """Where a worker runs: its rank, the number of workers, its device."""

    rank: int
    world: int
    device: torch.device

    @classmethod
    def of_this_worker(cls) -> Place:
        ctx = ray.train.get_context()
        return cls(ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device())


def load_model(cfg: Config, device: torch.device, dtype: torch.dtype) -> models.SDXLComponents:
    """The run's SDXL, frozen encoders on the device, the UNet in the training dtype (not yet wrapped)."""
    torch.manual_seed(cfg.train.seed)  # identical UNet init on every rank (only matters for from-config models)
    m = cfg.model
    comps = models.load_components(m.pretrained, vae=m.vae, revision=m.revision, variant=m.variant,
                                   text_encoder_dtype=dtype, vae_dtype=torch.float32, unet_dtype=dtype)
    for encoder in (comps.vae, comps.text_encoder, comps.text_encoder_2):
        encoder.to(device)
    return comps


def build_engine(cfg: Config, unet: torch.nn.Module, world: int, universal: bool):
    """(DeepSpeed engine, LR scheduler) around the UNet with the speed settings applied. `universal`: it will load
    a checkpoint written by another number of workers (DeepSpeed re-shards its optimizer state for any world size)."""
    unet = apply_speed_settings(unet, cfg)  # attention kernel, checkpointing, channels_last, compile
    ds_config = deepspeed_config(cfg, world)
    if universal:
        ds_config["checkpoint"] = {"load_universal": True}
    optimizer = build_optimizer(unet.parameters(), cfg)
    engine, _, _, lr_scheduler = initialize_engine(model=unet, optimizer=optimizer, config=ds_config,
                                                   lr_scheduler=build_lr_scheduler(optimizer, cfg),
                                                   dist_init_required=False)
    return engine, lr_scheduler


class Worker:
    """One Ray Train worker's run: built whole here (model, engine, step, components), then `restore`, `train`
    (which exports at its last step) or only `export` (resumed from the final checkpoint)."""

    def __init__(self, cfg: Config, run_dir: str, data_stats: str | None, data: dict, place: Place | None = None,
                 resume_from: str | None = None):
        """`data_stats`: the run's data counter actor (raydiff.data.stats); `data`: spec, tokenizer path and source
        manifest (driver.build_trainer); `place`: rank, world and device (default: this Ray Train worker's);
        `resume_from`: the checkpoint to resume from when Ray hands none (checkpoint.resume_without_ray_list)."""
        place = place or Place.of_this_worker()
        self.cfg, self.run_dir, self.data_stats, self.data = cfg, run_dir, data_stats, data
        self.rank, self.world, self.device = place.rank, place.world, place.device
        self.dtype = PRECISION_DTYPES[cfg.deepspeed.precision]
        use_reserved_cpus(cfg.scaling.cpus_per_worker)
        self.checkpointer = Checkpointer(cfg.checkpoint.every_n_steps, cfg.train.max_steps, self.rank, self.world)
        # Before the engine: a universal checkpoint changes its config.
        self.checkpointer.find(ray.train.get_checkpoint(), resume_from)
        # The data stream starts first: its first execution overlaps the model and engine build (loader.Prefetched).
        self.batches = self.start_batches(self.checkpointer.saved.step,
                                          self.checkpointer.position(cfg.train.batch_size))
        self.comps = load_model(cfg, self.device, self.dtype)
        self.engine, self.lr_scheduler = build_engine(cfg, self.comps.unet, self.world, self.checkpointer.universal)
        encoders = models.FrozenEncoders(self.comps.vae, self.comps.text_encoder, self.comps.text_encoder_2)
        alphas_cumprod = self.comps.noise_scheduler.alphas_cumprod.to(self.device, torch.float32)
        self.step = TrainStep.build(cfg, self.engine, encoders, alphas_cumprod,
                                    self.comps.noise_scheduler.config.prediction_type, self.dtype)
        # The EMA of the fp32 masters, each rank its own slice (raydiff.train.ema).
        self.ema = ShardedEMA(self.engine, cfg.train.ema_decay) if cfg.train.ema_decay is not None else None
        self.validator = Validator(cfg.validation, cfg.train.max_steps, self.step, self.comps,
                                   cfg.deepspeed.zero_stage, run_dir, self.rank, self.world)
        self.metrics = MetricsLogger(cfg.train, run_dir, self.rank, self.world, self.device, data_stats,
                                     cfg.objective.gamma)
        self.state = TrainState()  # restore() replaces it with the checkpoint's
        self.stream = StreamPosition()  # this world's data position (restore)
        self.preemption = PreemptionWatch(self.rank) if cfg.checkpoint.on_preemption else None
        self.rows = RowTrace(run_dir, self.rank, group_attempt_id()) if cfg.data.record_rows else None

    def restore(self) -> None:
        """Everything an unbroken run would have at this step (raydiff.train.checkpointer)."""
        self.state, self.stream = self.checkpointer.restore(self.engine, self.ema, self.cfg.train.batch_size)
        if self.cfg.scaling.elastic:  # the LR of this world size (raydiff.train.elastic), not the checkpoint's
            elastic.set_peak_lr(self.lr_scheduler, self.cfg.optim.lr * elastic.lr_factor(self.cfg, self.world))

    def train(self) -> None:
        """Optimizer steps from the restored one to train.max_steps; each component says when it acts."""
        t = self.cfg.train
        self.metrics.start(self.state.step, self.checkpointer.resumed)
        if self.state.step == 0:  # the untrained baseline, so every curve starts from the same point
            self.report(self.metrics.baseline(self.validator.run(0), self.gamma_now()), with_checkpoint=False)
        micro = 0  # micro-steps run across epoch boundaries, like DeepSpeed's own count
        for batch, consumed, epoch in self.train_batches():
            if self.rows is not None:
                self.rows.add(self.state.step + 1, batch)
            self.metrics.add(*self.train_micro_step(batch, micro))
            micro = (micro + 1) % t.grad_accum
            if micro:
                continue
            self.finish_optimizer_step(consumed, epoch)
            step = self.state.step
            notice, noticed = self.preemption_notice(step), time.perf_counter()
            do_val, do_ckpt = self.validator.due(step), self.checkpointer.due(step) or notice is not None
            do_log, do_report = self.metrics.due(step, must_report=do_val or do_ckpt)
            if not do_log:
                continue
            metrics = self.metrics.collect(step, epoch, self.lr_scheduler.get_last_lr()[0], refresh_data=do_report)
            if do_val:
                metrics.update(self.validator.run(step))
            self.metrics.write(metrics)
            if step >= t.max_steps:
                self.finish(metrics)
                return
            if do_report:
                self.report(metrics, with_checkpoint=do_ckpt, wait=notice is not None)
            if notice is not None:
                self.preemption.hold(notice, step, time.perf_counter() - noticed)
            self.metrics.restart_window()
        raise stats.no_data_error(self.data_stats, "train")  # the stream ended: every row of an epoch was bad

    # ------------------------------------------------------------ its parts

    def start_batches(self, step: int, position: StreamPosition) -> Prefetched | None:
        """(torch batch, rows consumed, epoch) from this rank's seeded stream at `position` (the checkpoint's: the
        one `restore` returns), produced ahead in a thread; None when only the export is left."""
        d, t = self.data, self.cfg.train
        if step >= t.max_steps:
            return None
        micro_steps = (t.max_steps - step) * t.grad_accum
        batches = planned_batches(d["spec"], d["tokenizer_path"], d["manifest"], position, self.rank, t.batch_size,
                                  t.prefetch_batches, rows_needed=micro_steps * t.batch_size)  # one execution
        # No more than the run trains on: reading ahead past its last step would start a further execution.
        return Prefetched(as_torch(batches, micro_steps))

    def train_batches(self):
        """The stream started in __init__, ended when training ends."""
        try:
            yield from self.batches
        finally:
            self.batches.close()

    def train_micro_step(self, batch: dict, micro: int) -> tuple[torch.Tensor, float | torch.Tensor]:
        """(detached loss, gamma) of one micro-step, its noise drawn from (seed, step, micro-step, rank)."""
        gen = step_generator(self.device, self.cfg.train.seed, self.state.step, micro, self.rank)
        return self.step(batch, self.state.step, gen)

    def finish_optimizer_step(self, consumed: tuple, epoch: int) -> None:
        """After the last micro-step of an optimizer step: the data position (only rows of completed optimizer
        steps count as consumed), the EMA, the trainer state, the throughput window."""
        self.stream.consumed[self.rank], self.stream.emitted[self.rank] = consumed
        if self.ema is not None:
            self.ema.update()
        self.state.step += 1
        self.state.epoch = epoch
        self.state.samples_seen += self.metrics.global_batch
        self.metrics.step_done()

    def preemption_notice(self, step: int) -> Notice | None:
        """The preemption notice to save a just-in-time checkpoint for at this step, or None (collective: every rank
        at every optimizer step; raydiff.train.preemption)."""
        if self.preemption is None or step >= self.cfg.train.max_steps:  # the last step saves one anyway
            return None
        notice = self.preemption.check(self.checkpointer.save_s)
        if notice is None:
            return None
        self.preemption.announce(notice, step, self.checkpointer.saved_step)
        return notice if notice.fits else None

    def gamma_now(self) -> float:
        """The gamma the schedule gives at the current step (random_strength: its mean, gamma / 2)."""
        o = self.cfg.objective
        return o.gamma / 2 if o.gamma_schedule == "random_strength" else float(self.step.gamma(self.state.step))

    def report(self, metrics: dict, with_checkpoint: bool, wait: bool = False) -> None:
        """Every rank reports (a barrier); with a checkpoint (raydiff.train.checkpointer), `wait`: until uploaded."""
        if with_checkpoint:
            if self.rows is not None:
                self.rows.flush(self.state.step)
            self.checkpointer.save(metrics, self.engine, self.ema, self.state, self.stream, wait=wait)
        else:
            ray.train.report(metrics)

    def finish(self, metrics: dict) -> None:
        """The last step: the checkpoint first (a failing export then resumes from it and only exports again), then
        the export, then the full metrics. The checkpoint's report leaves out the validation metrics on purpose: a
        Tune scheduler acts on reports with val_loss and could stop the trial at max_steps before the export."""
        self.report({k: v for k, v in metrics.items() if not k.startswith(METRIC_PREFIXES)}, with_checkpoint=True)
        self.export()
        ray.train.report(metrics)

    # ------------------------------------------------------------ export

    def export(self) -> None:
        # Collectives: every rank takes part. With EMA, the export holds the EMA weights (buffers: the live module's).
        state_dict = gather_fp32_state_dict(self.engine, params=self.ema is None)
        ema_weights = self.ema.full_state_dict() if self.ema is not None else None
        if self.rank == 0:
            state_dict.update(ema_weights or {})
            path = export_pipeline(self.cfg, state_dict, self.engine.module.config, self.step.prediction_type,
                                   storage.join(self.run_dir, "final"), info={"ema": self.ema is not None,
                                                                               "ema_decay": self.cfg.train.ema_decay})
            logger.info("exported diffusers pipeline to %s", path)
        dist.barrier()


def as_torch(batches, limit: int):
    """The first `limit` (numpy batch, consumed, epoch) items as (torch batch, consumed, epoch); `batches` is closed
    after them (or when this is closed)."""
    with contextlib.closing(batches):
        for _, (batch, consumed, epoch) in zip(range(limit), batches):  # range first: no item read past `limit`
            yield torch_batch(batch), consumed, epoch


def torch_batch(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """A numpy batch as torch tensors sharing its memory (copied only where a column is not contiguous)."""
    return {c: torch.from_numpy(np.ascontiguousarray(v)) for c, v in batch.items()}


def validation_batches(loop_config: dict, batch_size: int):
    """The held-out split as torch batches: the driver's rows (driver.validation_data), or Ray Train's "val"."""
    if "val_rows" not in loop_config:
        return ray.train.get_dataset_shard("val").iter_torch_batches(batch_size=batch_size)
    rows = ray.get(loop_config["val_rows"])
    return (torch_batch(batch) for batch in held_out_batches(rows, batch_size))


def train_loop_per_worker(loop_config: dict) -> None:
    if not loop_config.get("verbose"):
        console.quiet_process()
        console.disable_hf_progress_bars()
    cfg = from_dict(loop_config["config"])
    os.environ.update(loop_config.get("cloud_env") or {})  # run-dir files on an object store (raydiff.storage)
    worker = Worker(cfg, loop_config["run_dir"], loop_config.get("data_stats"), loop_config["data"],
                    resume_from=loop_config.get("resume_from"))
    worker.restore()
    worker.validator.load(validation_batches(loop_config, cfg.validation.batch_size), worker.data_stats)
    if worker.state.step < cfg.train.max_steps:
        worker.train()  # exports at its last step
    else:
        worker.export()  # resumed from the final checkpoint
