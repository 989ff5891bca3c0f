"""SDXL image preprocessing: decode, resize short side, crop, flip, and the matching ``time_ids``.

Pure functions (no Ray) so they can be unit-tested and reused by a latent-caching step: whatever crop is
applied to the pixels must be the crop recorded in ``time_ids`` (a known mismatch bug elsewhere recomputes it).
"""

from __future__ import annotations

import io
import random
import zlib
from dataclasses import dataclass, replace
from typing import Union

import numpy as np
from PIL import Image, ImageOps

Rng = Union[random.Random, np.random.Generator]
Size = Union[int, tuple[int, int]]  # a square side, or (width, height) of an aspect-ratio bucket


def _wh(size: Size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

# Modes whose alpha (or palette transparency) must be composited rather than dropped: dropping alpha turns
# transparent areas into whatever colour happens to be stored under them (often black).
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_HIGH_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}


class ImageDecodeError(ValueError):
    """Raised when image bytes cannot be decoded into a usable RGB image."""


@dataclass(frozen=True)
class CropPlan:
    """Where a sample is cut from its resized image. ``crop_left`` is measured in the (possibly flipped) output."""

    resized_w: int
    resized_h: int
    crop_top: int
    crop_left: int
    flipped: bool


def _round_half_up(x: float) -> int:
    # Python's round() is banker's rounding; half-up is easier to reason about and to test.
    return int(np.floor(x + 0.5))


def resized_size(orig_w: int, orig_h: int, resolution: Size) -> tuple[int, int]:
    """Smallest aspect-preserving scale (up or down) that covers the target: for a square, short side = resolution."""
    tw, th = _wh(resolution)
    if orig_w <= 0 or orig_h <= 0:
        raise ValueError(f"invalid image size {orig_w}x{orig_h}")
    if orig_w * th <= orig_h * tw:  # relatively taller than the target: width decides
        return tw, max(th, _round_half_up(orig_h * tw / orig_w))
    return max(tw, _round_half_up(orig_w * th / orig_h)), th


def _randint(rng: Rng, high_inclusive: int) -> int:
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(0, high_inclusive + 1))
    return rng.randint(0, high_inclusive)


def plan_crop(
    orig_w: int, orig_h: int, resolution: Size, center_crop: bool, random_flip: bool, rng: Rng
) -> CropPlan:
    """Resize to cover the target → (random|center) crop of the target size → horizontal flip with p=0.5.

    ``resolution`` is a square side or a bucket's (width, height). Draw order is fixed (top, left, flip) so a
    given rng state always gives the same plan.
    """
    tw, th = _wh(resolution)
    rw, rh = resized_size(orig_w, orig_h, (tw, th))
    if center_crop:
        top, left = (rh - th) // 2, (rw - tw) // 2
    else:
        top, left = _randint(rng, rh - th), _randint(rng, rw - tw)
    flipped = bool(random_flip and rng.random() < 0.5)
    if flipped:
        # The conditioning must describe the image the model sees, i.e. the flipped one.
        left = rw - (left + tw)
    return CropPlan(resized_w=rw, resized_h=rh, crop_top=top, crop_left=left, flipped=flipped)


def flip_pair(plan: CropPlan, resolution: Size) -> tuple[CropPlan, CropPlan]:
    """(unflipped, flipped) versions of ``plan``'s crop window: the same pixels, mirrored, each with its own
    ``crop_left`` (a latent cache encodes both so the flip can still be drawn per epoch)."""
    tw, _ = _wh(resolution)
    left = plan.resized_w - plan.crop_left - tw if plan.flipped else plan.crop_left
    return (replace(plan, crop_left=left, flipped=False),
            replace(plan, crop_left=plan.resized_w - left - tw, flipped=True))


def apply_crop(img: Image.Image, plan: CropPlan, resolution: Size) -> np.ndarray:
    """Execute ``plan`` on an RGB image; returns uint8 ``[3, H, W]`` (``[3, R, R]`` for a square)."""
    tw, th = _wh(resolution)
    resized = img.convert("RGB").resize((plan.resized_w, plan.resized_h), Image.Resampling.LANCZOS)
    # plan.crop_left is in flipped coordinates; map it back to cut from the unflipped image.
    left = plan.resized_w - plan.crop_left - tw if plan.flipped else plan.crop_left
    out = resized.crop((left, plan.crop_top, left + tw, plan.crop_top + th))
    if plan.flipped:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.ascontiguousarray(np.asarray(out, dtype=np.uint8).transpose(2, 0, 1))


def time_ids(orig_h: int, orig_w: int, plan: CropPlan, resolution: Size) -> tuple[int, int, int, int, int, int]:
    """SDXL micro-conditioning: (original_h, original_w, crop_top, crop_left, target_h, target_w)."""
    tw, th = _wh(resolution)
    return (orig_h, orig_w, plan.crop_top, plan.crop_left, th, tw)


def sample_key(image_bytes: bytes | None, path: str | None = None) -> int:
    """Stable 32-bit key of a sample: crc32 of its bytes (or of its path when bytes are absent).

    Rows with neither get 0xFFFFFFFF, which is never a validation candidate.
    """
    if image_bytes:
        return zlib.crc32(image_bytes)
    if path:
        return zlib.crc32(path.encode("utf-8"))
    return 0xFFFFFFFF


def sample_rng(seed: int, epoch: int, key: int) -> np.random.Generator:
    """Per-sample generator: the same (seed, epoch, sample) gives the same crop on any worker, in any order."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), int(key)]))


def _composite_on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_bit_to_rgb(img: Image.Image) -> Image.Image:
    # PIL's convert("RGB") clips 16/32-bit values at 255, turning most of a 16-bit image white; rescale instead.
    arr = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        scale = 255.0 if arr.size and arr.max() <= 1.0 else 1.0
    elif img.mode == "I" and (arr.size == 0 or arr.max() <= 255):
        scale = 1.0  # already 8-bit range stored in a 32-bit container
    else:
        scale = 255.0 / 65535.0
    gray = np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB, compositing transparency on white and rescaling high-bit-depth greys."""
    if img.mode == "RGB":
        return img
    if img.mode in _ALPHA_MODES or (img.mode == "P" and "transparency" in img.info):
        return _composite_on_white(img)
    if img.mode in _HIGH_BIT_MODES:
        return _high_bit_to_rgb(img)
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...


def check_aspect_ratio(w: int, h: int, max_aspect_ratio: float) -> None:
    ratio = max(w, h) / max(min(w, h), 1)
    if ratio > max_aspect_ratio:
        raise ImageDecodeError(f"aspect ratio {ratio:.2f} ({w}x{h}) exceeds data.max_aspect_ratio {max_aspect_ratio}")


def decode_image(data: bytes, max_aspect_ratio: float | None = None) -> Image.Image:
    """Decode image bytes to an upright RGB image; raises ImageDecodeError with the reason on failure.

    ``max_aspect_ratio`` is checked on the header, before the pixels are decoded: a 40:1 panorama would need a
    huge buffer once its short side is resized to the training resolution.
    """
    if not data:
        raise ImageDecodeError("empty image bytes")
    try:
        img = Image.open(io.BytesIO(data))
    except Exception as e:
        raise ImageDecodeError(f"cannot decode image ({len(data)} bytes): {type(e).__name__}: {e}") from e
    if max_aspect_ratio is not None:
        check_aspect_ratio(*img.size, max_aspect_ratio)
    try:
        img.load()  # force the full decode here so truncated files fail now, not mid-resize
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise ImageDecodeError(f"cannot decode image ({len(data)} bytes): {type(e).__name__}: {e}") from e
    try:
        img = ImageOps.exif_transpose(img) or img
    except Exception:
        pass  # broken EXIF should not cost us an otherwise valid image; keep it unrotated
    try:
        return to_rgb(img)
    except Exception as e:
        raise ImageDecodeError(f"cannot convert image mode {img.mode!r} to RGB: {e}") from e
