"""Model-speed switches for the trained UNet, applied once before `deepspeed.initialize` (`train.*` config keys).

- `train.attention`: `sdpa` (default) runs every attention layer through
  `torch.nn.functional.scaled_dot_product_attention` (diffusers' `AttnProcessor2_0`, which diffusers already picks
  by default on torch >= 2; enforced here so a model loaded with other processors still gets it); `eager` is
  diffusers' explicit baddbmm + softmax, kept as a baseline.
- `train.gradient_checkpointing`: recompute activations in the backward pass (memory for ~30 % more compute).
- `train.channels_last`: NHWC weights for the convolutions (faster cuDNN/oneDNN kernels on tensor cores).
- `train.compile`: `torch.compile` of the UNet, in place (`nn.Module.compile`), so parameter names, DeepSpeed
  checkpoints and the diffusers export are unchanged.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from raydiff import compat
from raydiff.config import Attention, Config, per_choice

ATTENTION_PROCESSORS = per_choice(Attention, {"sdpa": AttnProcessor2_0, "eager": AttnProcessor})


def uses_sdpa(unet: torch.nn.Module) -> bool:
    """True when every attention layer of the UNet runs through PyTorch's fused SDPA kernel."""
    procs = unet.attn_processors.values()
    return bool(procs) and all(isinstance(p, AttnProcessor2_0) for p in procs)


def apply_speed_settings(unet: torch.nn.Module, cfg: Config) -> torch.nn.Module:
    """Apply the `train.*` speed switches to a freshly loaded (not yet DeepSpeed-wrapped) UNet; returns it."""
    t = cfg.train
    wanted = ATTENTION_PROCESSORS[t.attention]
    if not all(type(p) is wanted for p in unet.attn_processors.values()):
        unet.set_attn_processor(wanted())
    if t.gradient_checkpointing:  # before compile: the compiled graph must include the checkpointed regions
        unet.enable_gradient_checkpointing()
    if t.channels_last:
        unet.to(memory_format=torch.channels_last)
    if t.compile:
        # In place: the module keeps its class, attributes (`.config`) and state-dict keys; compilation itself is
        # lazy and happens on the first forward (the first step is slow, later ones reuse the graph).
        unet.compile()
    return unet


def worker_threads(cpus: float) -> int:
    """Torch intra-op threads for a process holding `cpus` logical CPUs: one per whole CPU, at least one. Ray's
    default depends on how the process was started (OMP_NUM_THREADS=1 for fractional CPUs, every core for a process
    outside a reservation); a worker that uses fewer threads than its CPUs leaves them idle, more oversubscribes
    the node's other workers and Ray Data tasks."""
    return max(1, int(cpus))


def use_reserved_cpus(cpus: float) -> int:
    """Set this process's torch threads to what its reservation holds (`worker_threads`); returns the count."""
    threads = worker_threads(cpus)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def is_compiled(unet: torch.nn.Module) -> bool:
    return compat.is_compiled(unet)
