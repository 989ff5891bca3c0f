"""Export the trained UNet as a complete diffusers SDXL pipeline directory that stock diffusers loads.

The UNet weights are the fp32 master weights gathered from DeepSpeed (any ZeRO stage, any precision); the other
components are taken unchanged from the source model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch
import torch.distributed as dist

from raydiff import models, storage
from raydiff.config import Config, is_uri

EXPORT_INFO = "raydiff_export.json"


def gather_fp32_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """Full fp32 weights on rank 0 (None elsewhere). Collective: every rank must call it, in the same order."""
    from deepspeed.utils import safe_get_full_fp32_param

    rank = dist.get_rank() if dist.is_initialized() else 0
    state: dict[str, torch.Tensor] = {}
    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param)  # ZeRO 1-3 and bf16 optimizers keep fp32 masters apart
        if full is None:  # ZeRO-0 fp32: the module parameters are the master weights
            full = param.detach()
        if rank == 0:
            state[name] = full.detach().float().cpu().contiguous().clone()
    if rank != 0:
        return None
    for name, buf in engine.module.named_buffers():
        state[name] = buf.detach().cpu().contiguous().clone()
    return state


def export_pipeline(cfg: Config, unet_state: dict[str, torch.Tensor], unet_config, prediction_type: str, out: str,
                    info: dict | None = None) -> str:
    """Write `<out>` as a StableDiffusionXLPipeline directory (safetensors). Replaces a previous export atomically."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(unet_config)
    unet.load_state_dict(unet_state, strict=True)
    source = models.resolve_pretrained(cfg.model.pretrained)
    extra = {"vae": AutoencoderKL.from_pretrained(cfg.model.vae)} if cfg.model.vae else {}
    pipe = StableDiffusionXLPipeline.from_pretrained(source, unet=unet, revision=cfg.model.revision,
                                                     variant=cfg.model.variant,
                                                     **models.diffusers_dtype_kwarg(torch.float32), **extra)
    # Sampling must use the parameterisation the UNet was trained with.
    if pipe.scheduler.config.get("prediction_type") != prediction_type:
        pipe.scheduler.register_to_config(prediction_type=prediction_type)
    staging = tempfile.mkdtemp(prefix="raydiff-export-", dir=None if is_uri(out) else os.path.dirname(out) or ".")
    try:
        pipe.save_pretrained(staging, safe_serialization=True)
        with open(os.path.join(staging, EXPORT_INFO), "w") as f:
            json.dump({"source_model": cfg.model.pretrained, "prediction_type": prediction_type, **(info or {})}, f, indent=2)
        _publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _publish(staging: str, out: str) -> None:
    if is_uri(out):
        storage.upload_dir(staging, out)
        return
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(staging, out)
