"""Export the trained UNet as a complete diffusers SDXL pipeline directory that stock diffusers loads.

The UNet weights are the fp32 master weights gathered from DeepSpeed (any ZeRO stage, any precision); the other
components are taken unchanged from the source model. A bf16/fp16 run also writes diffusers' ``fp16`` variant
(``from_pretrained(dir, variant="fp16", torch_dtype=torch.float16)``: half the download) beside the fp32 files.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch
import torch.distributed as dist
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel

from raydiff import hub, models, storage
from raydiff.config import Config, is_uri

EXPORT_INFO = "raydiff_export.json"


def gather_fp32_state_dict(engine, params: bool = True) -> dict[str, torch.Tensor] | None:
    """Full fp32 weights (`params`) and the buffers on rank 0 (None elsewhere). Collective: every rank must call it,
    in the same order."""
    from deepspeed.utils import safe_get_full_fp32_param  # here: the sampling CLI imports this module, no DeepSpeed

    rank = dist.get_rank() if dist.is_initialized() else 0
    state: dict[str, torch.Tensor] = {}
    for name, param in engine.module.named_parameters() if params else ():
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


def unet_from_state(unet_config, state: dict[str, torch.Tensor]):
    """The UNet built on the meta device and given `state`'s tensors as its weights: no second randomly initialised
    2.6 B-parameter model in host RAM, no copy."""
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
    unet.load_state_dict(state, strict=True, assign=True)
    return unet


def export_pipeline(cfg: Config, unet_state: dict[str, torch.Tensor], unet_config, prediction_type: str, out: str,
                    info: dict | None = None) -> str:
    """Write `<out>` as a StableDiffusionXLPipeline directory (safetensors). Replaces a previous export atomically."""
    unet = unet_from_state(unet_config, unet_state)
    m = cfg.model
    # This node's copy of the other components (the workers already downloaded them: no hub call).
    parts = tuple(p for p in (*hub.ENCODERS, *hub.TOKENIZERS, "scheduler") if not (m.vae and p == "vae"))
    source = hub.local_pretrained(m.pretrained, m.revision, parts, m.variant)
    extra = {}
    if m.vae:
        vae_path, vae_sub = models.vae_location(hub.local_pretrained(m.vae, parts=(hub.STANDALONE_VAE,)))
        extra["vae"] = AutoencoderKL.from_pretrained(vae_path, subfolder=vae_sub)
    pipe = StableDiffusionXLPipeline.from_pretrained(source, unet=unet, variant=m.variant,
                                                     **models.diffusers_dtype_kwarg(torch.float32), **extra)
    # Sampling must use the parameterisation the UNet was trained with.
    if pipe.scheduler.config.get("prediction_type") != prediction_type:
        pipe.scheduler.register_to_config(prediction_type=prediction_type)
    staging = tempfile.mkdtemp(prefix="raydiff-export-", dir=None if is_uri(out) else os.path.dirname(out) or ".")
    try:
        pipe.save_pretrained(staging, safe_serialization=True)
        if cfg.deepspeed.precision != "fp32":
            save_half_variant(pipe, staging)
        with open(os.path.join(staging, EXPORT_INFO), "w") as f:
            json.dump({"source_model": cfg.model.pretrained, "prediction_type": prediction_type, **(info or {})}, f,
                      indent=2)
        _publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


HALF_VARIANT = "fp16"  # diffusers' name for the half-precision weight files, as SDXL base ships them


def save_half_variant(pipe, staging: str, dtype: torch.dtype = torch.float16) -> None:
    """Each model component's weights again as `*.fp16.safetensors`. Called after the fp32 files are written: the
    components are cast in place, one at a time (the pipeline object is discarded afterwards)."""
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            component.to(dtype).save_pretrained(os.path.join(staging, name), safe_serialization=True,
                                                variant=HALF_VARIANT)


def _publish(staging: str, out: str) -> None:
    if is_uri(out):
        storage.upload_dir(staging, out)
        return
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(staging, out)
