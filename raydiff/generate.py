"""Sample images from a saved SDXL pipeline directory with the stock diffusers pipeline.

    python -m raydiff.generate --model DIR --prompt "a red circle" --out image.png [--steps 30] [--seed 0]

Sampling deliberately goes through unmodified ``StableDiffusionXLPipeline`` so that what we evaluate is what users
get. ``--eps-scale λ`` (Epsilon Scaling) only wraps the UNet's output, so it works with any DDPM-family scheduler;
λ = 1 (the default) leaves the pipeline untouched.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image

from raydiff.export import HALF_VARIANT
from raydiff.models import diffusers_dtype_kwarg, resolve_pretrained
from raydiff.validation import eps_scale_hook, image_grid


def _device_and_dtype() -> tuple[str, torch.dtype]:
    """fp32 on CPU (half precision is slow/unsupported there); bf16, else fp16, on CUDA."""
    if torch.cuda.is_available():
        return "cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return "cpu", torch.float32


def half_variant(path: str, dtype: torch.dtype) -> str | None:
    """"fp16" when sampling in 16 bits from a local export that has those files (half the bytes to read)."""
    unet = os.path.join(path, "unet", f"diffusion_pytorch_model.{HALF_VARIANT}.safetensors")
    return HALF_VARIANT if dtype != torch.float32 and os.path.isfile(unet) else None


def load_pipeline(model_dir: str, device: str | None = None, dtype: torch.dtype | None = None):
    """Load a pipeline dir (or ``"tiny"`` / a hub id); raises FileNotFoundError for a missing local dir."""
    default_device, default_dtype = _device_and_dtype()
    dtype = dtype or default_dtype
    path = resolve_pretrained(model_dir)
    pipe = StableDiffusionXLPipeline.from_pretrained(
        path, **diffusers_dtype_kwarg(dtype), variant=half_variant(path, dtype),
        add_watermarker=False,  # unaltered pixels for metrics
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device or default_device)


def _prepare_pipeline(pipe, eps_scale: float = 1.0):
    """Install sampling-time modifications; returns (pipeline, hook handle or None to remove afterwards)."""
    prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")
    return pipe, eps_scale_hook(pipe.unet, pipe.scheduler, prediction_type, eps_scale)


def generate(
    model_dir: str,
    prompts: str | Sequence[str],
    out: str | None = None,
    steps: int = 30,
    seed: int = 0,
    guidance: float = 5.0,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | None = None,
    num_images: int = 1,
    pipe=None,
    eps_scale: float = 1.0,
) -> list[Image.Image]:
    """Generate ``num_images`` per prompt, seeded; save to ``out`` (see :func:`save_images`) if given.

    Pass an already loaded ``pipe`` to sample repeatedly without reloading (``model_dir`` is then only a label).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    pipe, hook = _prepare_pipeline(pipe if pipe is not None else load_pipeline(model_dir), eps_scale)
    default_size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    # A CPU generator gives the same initial noise on every device, so a seed means the same image everywhere.
    generator = torch.Generator(device="cpu").manual_seed(seed)
    try:
        images = pipe(
            prompt=prompts,
            negative_prompt=[negative_prompt] * len(prompts) if negative_prompt is not None else None,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=height or default_size,
            width=width or default_size,
            num_images_per_prompt=num_images,
            generator=generator,
        ).images
    finally:
        if hook is not None:  # a passed-in pipe is left as it came
            hook.remove()
    if out is not None:
        save_images(images, out)
    return images


def save_images(images: Sequence[Image.Image], out: str) -> list[str]:
    """One image -> ``out``. Several -> a grid at ``out`` plus ``<stem>-000.png``... for per-image metrics."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if len(images) == 1:
        images[0].save(out)
        return [out]
    stem, ext = os.path.splitext(out)
    paths = []
    for i, img in enumerate(images):
        paths.append(f"{stem}-{i:03d}{ext or '.png'}")
        img.save(paths[-1])
    image_grid(images).save(out)
    return [out, *paths]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m raydiff.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="pipeline dir (a saved StableDiffusionXLPipeline), 'tiny' or hub id")
    p.add_argument("--prompt", required=True, action="append", help="repeat for several prompts")
    p.add_argument("--out", required=True, help="output PNG (a grid when several images)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--height", type=int, default=None, help="default: unet sample_size x VAE scale factor")
    p.add_argument("--width", type=int, default=None, help="default: unet sample_size x VAE scale factor")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--eps-scale", type=float, default=1.0, metavar="LAMBDA",
                   help="Epsilon Scaling: divide the predicted noise by LAMBDA (e.g. 1.005); 1 = stock sampling")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.eps_scale <= 0:
        print(f"error: --eps-scale must be > 0, got {args.eps_scale}", file=sys.stderr)
        return 2
    try:
        pipe = load_pipeline(args.model)
    except OSError as e:  # FileNotFoundError from resolve_pretrained, or diffusers failing to find the files
        print(f"error: cannot load model {args.model!r}: {e}", file=sys.stderr)
        return 2
    images = generate(
        args.model,
        args.prompt,
        steps=args.steps,
        seed=args.seed,
        guidance=args.guidance,
        height=args.height,
        width=args.width,
        negative_prompt=args.negative_prompt,
        num_images=args.num_images,
        pipe=pipe,
        eps_scale=args.eps_scale,
    )
    for path in save_images(images, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
