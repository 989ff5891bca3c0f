"""Aspect-ratio buckets: each image is cropped to the bucket closest to its aspect ratio, and every training batch
holds a single bucket (tensors of one shape), with per-sample ``time_ids``.

``data.buckets: [sdxl]`` is the usual SDXL list of ~1024² sizes (width and height multiples of 64, aspect 1:4 to
4:1), scaled to ``data.resolution``; or list ``WxH`` sizes yourself. Batching by bucket happens on each training
worker over its own stream, so it stays streaming: a bucket's rows wait in a small per-bucket buffer until a batch
is full (``raydiff.data.stream.rebatch``).
"""

from __future__ import annotations

import math
import re

# (width, height) at 1024² — the list SDXL was trained with.
SDXL_BUCKETS_1024 = (
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664), (640, 1600),
    (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280), (832, 1216), (832, 1152),
    (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024), (1024, 960), (1088, 960), (1088, 896),
    (1152, 896), (1152, 832), (1216, 832), (1280, 768), (1344, 768), (1344, 704), (1408, 704), (1472, 704),
    (1536, 640), (1600, 640), (1664, 576), (1728, 576), (1792, 576), (1856, 512), (1920, 512), (1984, 512),
    (2048, 512),
)
BUCKET_COLUMN = "bucket"
_SIZE = re.compile(r"^(\d+)x(\d+)$")


def parse_buckets(spec: list[str], resolution: int) -> list[tuple[int, int]]:
    """``[]`` → no buckets; ``["sdxl"]`` → the SDXL list scaled to ``resolution`` (multiples of 8, deduplicated);
    ``["1024x1024", "1152x896", ...]`` → those (width x height) sizes."""
    if not spec:
        return []
    if [s.lower() for s in spec] == ["sdxl"]:
        scale = resolution / 1024
        sizes = [(max(8, 8 * round(w * scale / 8)), max(8, 8 * round(h * scale / 8))) for w, h in SDXL_BUCKETS_1024]
        return list(dict.fromkeys(sizes))
    out = []
    for s in spec:
        m = _SIZE.match(s.strip().lower())
        if not m or int(m[1]) % 8 or int(m[2]) % 8 or not int(m[1]) or not int(m[2]):
            raise ValueError(f"bucket {s!r} must be 'sdxl' or WIDTHxHEIGHT with multiples of 8 (e.g. 1152x896)")
        out.append((int(m[1]), int(m[2])))
    return list(dict.fromkeys(out))


def closest_bucket(w: int, h: int, buckets: list[tuple[int, int]]) -> int:
    """Index of the bucket nearest in log aspect ratio (so 2:1 and 1:2 are equally far from 1:1); first on ties."""
    target = math.log(w / h)
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][0] / buckets[i][1]) - target))
