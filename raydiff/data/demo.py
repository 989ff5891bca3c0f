"""A generated shapes-and-captions dataset, written as HF-style parquet, for smoke tests and demos.

Deterministic from the seed (same seed → byte-identical files with the same Pillow/zlib), with varied
image sizes and aspect ratios so resize/crop/time_ids code paths are all exercised.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import shutil
import tempfile

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 40),
    "purple": (130, 50, 170),
    "orange": (245, 140, 20),
    "pink": (245, 130, 190),
    "cyan": (40, 210, 220),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
    "brown": (120, 75, 35),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon")
SIZES = {"small": 0.4, "": 0.62, "large": 0.88}  # fraction of the cell's short side; "" = medium, unnamed
NUM_FILES = 4
_HF_FEATURES = {"info": {"features": {"image": {"_type": "Image"}, "text": {"dtype": "string", "_type": "Value"}}}}


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    pts = []
    for i in range(10):
        rad = r if i % 2 == 0 else r * 0.45
        a = -math.pi / 2 + i * math.pi / 5
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill) -> None:
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "star":
        draw.polygon(_star(cx, cy, r), fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif shape == "hexagon":
        draw.regular_polygon((cx, cy, r), 6, fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _cells(w: int, h: int, n: int) -> list[tuple[int, int, int, int]]:
    """Split the canvas along its long side so two shapes never overlap."""
    if n == 1:
        return [(0, 0, w, h)]
    if w >= h:
        return [(0, 0, w // 2, h), (w // 2, 0, w, h)]
    return [(0, 0, w, h // 2), (0, h // 2, w, h)]


def _image_size(rng: random.Random) -> tuple[int, int]:
    kind = rng.choice(("landscape", "portrait", "square"))
    long_side, short_side = rng.randint(96, 160), rng.randint(48, 96)
    if kind == "landscape":
        return long_side, short_side
    if kind == "portrait":
        return short_side, long_side
    side = rng.randint(48, 160)
    return side, side


def _phrase(size: str, colour: str, shape: str) -> str:
    words = [w for w in (size, colour, shape) if w]
    return "a " + " ".join(words)


def make_sample(rng: random.Random) -> tuple[Image.Image, str]:
    """One image and its caption, e.g. 'a red circle and a small blue square on a yellow background'."""
    w, h = _image_size(rng)
    background = rng.choice(list(COLOURS))
    img = Image.new("RGB", (w, h), COLOURS[background])
    draw = ImageDraw.Draw(img)
    phrases = []
    for cx0, cy0, cx1, cy1 in _cells(w, h, rng.choice((1, 1, 2))):
        colour = rng.choice([c for c in COLOURS if c != background])  # always visible
        shape, size = rng.choice(SHAPES), rng.choice(list(SIZES))
        side = SIZES[size] * min(cx1 - cx0, cy1 - cy0)
        x0 = cx0 + rng.uniform(0, (cx1 - cx0) - side)
        y0 = cy0 + rng.uniform(0, (cy1 - cy0) - side)
        _draw_shape(draw, shape, (x0, y0, x0 + side, y0 + side), COLOURS[colour])
        phrases.append(_phrase(size, colour, shape))
    return img, f"{' and '.join(phrases)} on a {background} background"


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.save(buf, format="JPEG", quality=90)
    else:
        img.save(buf, format="PNG")
    return buf.getvalue()


def write_demo_dataset(out_dir: str, num_images: int = 320, seed: int = 0) -> str:
    """Write ``num_images`` samples as ``NUM_FILES`` parquet files (image struct {bytes, path}, text)."""
    os.makedirs(out_dir, exist_ok=True)
    rng = random.Random(seed)
    images, texts = [], []
    for i in range(num_images):
        img, caption = make_sample(rng)
        fmt = "JPEG" if rng.random() < 0.25 else "PNG"  # both decoders get exercised
        name = f"shape_{seed}_{i:05d}.{'jpg' if fmt == 'JPEG' else 'png'}"
        images.append({"bytes": _encode(img, fmt), "path": name})
        texts.append(caption)
    schema = pa.schema(
        [("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("text", pa.string())],
        metadata={"huggingface": json.dumps(_HF_FEATURES)},
    )
    n_files = max(1, min(NUM_FILES, num_images))
    bounds = [round(k * num_images / n_files) for k in range(n_files + 1)]
    for k in range(n_files):
        lo, hi = bounds[k], bounds[k + 1]
        table = pa.table({"image": images[lo:hi], "text": texts[lo:hi]}, schema=schema)
        pq.write_table(table, os.path.join(out_dir, f"train-{k:05d}-of-{n_files:05d}.parquet"))
    return out_dir


def ensure_demo_dataset(cache_root: str, num_images: int = 320, seed: int = 0) -> str:
    """Write the demo dataset once under ``cache_root``; concurrent callers never observe a partial directory."""
    final = os.path.join(cache_root, f"demo-shapes-v1-n{num_images}-s{seed}")
    if os.path.isdir(final):
        return final
    os.makedirs(cache_root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-demo-shapes-", dir=cache_root)
    try:
        write_demo_dataset(tmp, num_images=num_images, seed=seed)
        os.rename(tmp, final)  # atomic on one filesystem; fails if another caller won the race
    except OSError:
        if not os.path.isdir(final):
            raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return final
