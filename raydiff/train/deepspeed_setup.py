"""DeepSpeed config, optimizer and LR schedule built from the run config."""

from __future__ import annotations

import math

import torch

from raydiff import compat
from raydiff.config import Config, Precision, per_choice

PRECISION_DTYPES = per_choice(Precision, {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16})


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    ds = cfg.deepspeed
    zero: dict = {
        "stage": ds.zero_stage,
        "overlap_comm": cfg.scaling.use_gpu,
        "contiguous_gradients": True,
        "allgather_bucket_size": ds.allgather_bucket_size,
        "reduce_bucket_size": ds.reduce_bucket_size,
    }
    if ds.zero_stage == 3:
        # Without this, save_16bit_model writes nothing under ZeRO-3.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if ds.offload_optimizer and ds.zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.scaling.use_gpu}
    config = {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": cfg.train.batch_size * cfg.train.grad_accum * world_size,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # our own logging reports progress
        "wall_clock_breakdown": False,
    }
    if ds.offload_optimizer and not cfg.scaling.use_gpu:  # CPU workers step torch's optimizer: no op to compile
        config["zero_force_ds_cpu_optimizer"] = False
    if cfg.train.grad_clip > 0:
        config["gradient_clipping"] = cfg.train.grad_clip
    if ds.precision == "bf16":
        config["bf16"] = {"enabled": True}
        # Accumulate micro-step gradients and reduce them across ranks in fp32: bf16's 8-bit mantissa loses small
        # gradients over accumulation and W-way sums (ZeRO 1-3 only; config validation refuses ZeRO-0 with bf16).
        config["data_types"] = {"grad_accum_dtype": "fp32"}
        config["communication_data_type"] = "fp32"
    elif ds.precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return config


# DeepSpeed's CPU shared-memory all-reduce op: it serves only `inference_all_reduce`, which training never calls.
SHM_COMM_OP = "deepspeed_shm_comm"


def skip_cpu_shm_comm_op() -> None:
    """Mark the CPU shm comm op unusable on DeepSpeed's CPU accelerator. Other accelerators (CUDA) have no such op in
    their table: marking it there would fail the run at engine build (found on the first H200 run)."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        compat.disable_deepspeed_op(SHM_COMM_OP)


def initialize_engine(**initialize_kwargs):
    """`deepspeed.initialize` without JIT-building the CPU shared-memory comm op.

    On a CPU machine DeepSpeed's comm backend compiles that op into TORCH_EXTENSIONS_DIR on first use (minutes), for a
    collective training never uses; and a build killed midway leaves its `lock` file behind, on which every later run
    then waits forever. Marking the op incompatible makes the backend use plain torch.distributed (gloo) throughout.
    """
    import deepspeed  # here: the driver imports this module for PRECISION_DTYPES and needs no DeepSpeed

    skip_cpu_shm_comm_op()
    engine, optimizer, loader, scheduler = deepspeed.initialize(**initialize_kwargs)
    if engine.zero_optimization_stage() == 0 and engine.dp_world_size == 1:
        # Alone, a ZeRO-0 engine would still flatten every gradient into buckets and all-reduce them with itself
        # (~9 % of a tiny-model step); DeepSpeed's pipeline engine turns this same switch off for its own reduction.
        engine.enable_backward_allreduce = False
    if engine.zero_optimization_stage() == 0 and engine.gradient_clipping() > 0 and \
            not (engine.fp16_enabled() or engine.bfloat16_enabled()):
        _clip_with_torch(engine)
    return engine, optimizer, loader, scheduler


def _clip_with_torch(engine) -> None:
    """The fp32 clip of a ZeRO-0 engine with torch's clip_grad_norm_: the same norm and scale (the gradients are
    all-reduced by then, so every rank's local norm is the global one), without DeepSpeed's Python loop over tensors
    (10 % of a tiny-model step on CPU). Should DeepSpeed stop calling this method, its own clip runs: slower, same."""
    params = [p for p in engine.module.parameters() if p.requires_grad]
    max_norm = engine.gradient_clipping()
    engine.clip_fp32_gradients = lambda: torch.nn.utils.clip_grad_norm_(params, max_norm)


def build_optimizer(params, cfg: Config) -> torch.optim.Optimizer:
    opt = cfg.optim
    params = [p for p in params if p.requires_grad]
    if opt.optimizer == "adafactor":
        from transformers.optimization import Adafactor  # here: only this optimizer needs transformers

        # The published IP recipe: a fixed lr, no relative step, no parameter scaling.
        return Adafactor(params, lr=opt.lr, weight_decay=opt.weight_decay, scale_parameter=False,
                         relative_step=False, warmup_init=False)
    if cfg.deepspeed.offload_optimizer and cfg.scaling.use_gpu:
        # The optimizer steps on the host: DeepSpeed's vectorised CPU Adam (its op is pre-built in cluster/Dockerfile,
        # else JIT-compiled once per node), the optimizer DeepSpeed requires for offload.
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps,
                                weight_decay=opt.weight_decay, adamw_mode=True)
    # Fused: one kernel for every tensor, on GPUs and (torch >= 2.4) CPUs alike; the per-tensor loop costs a
    # kernel launch per op per tensor (4x slower for the tiny UNet on CPU: docs/performance.md).
    return torch.optim.AdamW(params, lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps,
                             weight_decay=opt.weight_decay, fused=True)


class LRSchedule:
    """Linear warm-up, then constant, cosine or linear decay to 0 at max_steps (a picklable LambdaLR factor)."""

    def __init__(self, kind: str, warmup_steps: int, max_steps: int):
        self.kind, self.warmup_steps, self.max_steps = kind, warmup_steps, max_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps))
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress


def build_lr_scheduler(optimizer, cfg: Config) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, LRSchedule(cfg.optim.lr_scheduler, cfg.optim.warmup_steps, cfg.train.max_steps))
