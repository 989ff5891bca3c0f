"""Aspect-ratio bucketing: the bucket list, closest-bucket assignment, crops/time_ids per bucket, one-bucket batches."""

from __future__ import annotations

import io
import itertools


import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raydiff import config as C
from raydiff.data.buckets import SDXL_BUCKETS_1024, closest_bucket, parse_buckets
from raydiff.data.loader import planned_batches
from raydiff.data.pipeline import DataSpec, _stack, build_datasets, build_manifest
from raydiff.data.stream import ORDER_COLUMN, StreamPosition, rebatch
from raydiff.data.transforms import apply_crop, plan_crop, sample_rng, time_ids


def test_sdxl_list_and_parsing():
    assert (1024, 1024) in SDXL_BUCKETS_1024 and len(SDXL_BUCKETS_1024) == 41
    assert all(w % 64 == 0 and h % 64 == 0 for w, h in SDXL_BUCKETS_1024)
    assert parse_buckets(["sdxl"], 1024) == list(SDXL_BUCKETS_1024)
    small = parse_buckets(["sdxl"], 64)
    assert (64, 64) in small and all(w % 8 == 0 and h % 8 == 0 for w, h in small) and len(set(small)) == len(small)
    assert parse_buckets(["64x32", "32x64", "64x32"], 64) == [(64, 32), (32, 64)]
    assert parse_buckets([], 64) == []
    with pytest.raises(ValueError, match="multiples of 8"):
        parse_buckets(["60x32"], 64)
    with pytest.raises(C.ConfigError, match="data.buckets"):
        C.load_config("tiny_cpu", ["data.buckets=[64x30]"])
    assert C.load_config("tiny_cpu", ["data.buckets=sdxl"]).data.buckets == ["sdxl"]


def test_closest_bucket_by_log_aspect():
    buckets = [(64, 64), (96, 48), (48, 96)]
    assert closest_bucket(100, 100, buckets) == 0
    assert closest_bucket(300, 140, buckets) == 1  # 2.14:1 → 2:1
    assert closest_bucket(140, 300, buckets) == 2
    assert closest_bucket(130, 100, buckets) == 0  # 1.3 is nearer 1 than 2 in log space
    sdxl = list(SDXL_BUCKETS_1024)
    assert sdxl[closest_bucket(1920, 1080, sdxl)] == (1344, 768)


@pytest.mark.parametrize("flip", [False, True])
def test_bucket_crop_and_time_ids_on_an_asymmetric_image(flip):
    # Column x holds value x (mod 256): the crop's columns reveal where it was cut, flipped or not.
    w, h = 250, 100
    grad = np.tile(np.arange(w, dtype=np.uint8), (h, 1))
    img = Image.fromarray(np.stack([grad] * 3, axis=-1))
    seed = next(s for s in range(100) if plan_crop(w, h, (96, 48), False, True, sample_rng(0, 0, s)).flipped == flip)
    plan = plan_crop(w, h, (96, 48), False, True, sample_rng(0, 0, seed))
    assert (plan.resized_w, plan.resized_h) == (120, 48)  # 250x100 scaled by 0.48 covers 96x48
    out = apply_crop(img, plan, (96, 48))
    assert out.shape == (3, 48, 96)
    assert time_ids(h, w, plan, (96, 48)) == (100, 250, plan.crop_top, plan.crop_left, 48, 96)
    # crop_left is where the visible (possibly flipped) crop starts in the (possibly flipped) resized image.
    resized = np.asarray(img.resize((120, 48), Image.Resampling.LANCZOS))[:, :, 0]
    seen = resized[:, ::-1] if flip else resized
    np.testing.assert_array_equal(out[0], seen[plan.crop_top:plan.crop_top + 48, plan.crop_left:plan.crop_left + 96])


def test_bucket_batches_hold_one_bucket_and_keep_rows():
    rng = np.random.default_rng(0)
    rows = []
    for i in range(40):
        b = int(rng.integers(0, 3))
        rows.append({"bucket": b, "pixels": np.full((3, 8 * (b + 1), 8), i, np.uint8), "id": i})
    def col(values):  # ragged pixels as Ray hands them over: an object array of arrays
        return _stack(values) if isinstance(values[0], np.ndarray) else np.array(values)

    batches_in = [{ORDER_COLUMN: np.arange(k, min(k + 7, 40)),
                   **{c: col([r[c] for r in rows[k:k + 7]]) for c in rows[0]}} for k in range(0, 40, 7)]
    out = [b for b, _, _ in rebatch(batches_in, 4, "bucket")]
    assert out and all(len(set(b["bucket"].tolist())) == 1 and len(b["id"]) == 4 for b in out)
    assert all(b["pixels"].shape == (4, 3, 8 * (int(b["bucket"][0]) + 1), 8) for b in out)
    ids = [int(i) for b in out for i in b["id"]]
    assert len(ids) == len(set(ids))
    # Every row is handed out once its bucket fills; only each bucket's last < 4 rows are still waiting.
    per_bucket = np.bincount([r["bucket"] for r in rows])
    assert len(ids) == sum(4 * (n // 4) for n in per_bucket)


def _png(w, h):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (w % 256, h % 256, 7)).save(buf, format="PNG")
    return buf.getvalue()


def test_preprocessor_assigns_buckets(ray_local, tiny_sdxl, tmp_path):
    sizes = [(60, 30), (31, 64), (40, 40), (90, 44), (20, 41), (33, 30)]
    d = tmp_path / "b"
    d.mkdir()
    pq.write_table(pa.table({"image": [{"bytes": _png(w, h), "path": f"{w}x{h}.png"} for w, h in sizes],
                             "text": ["x"] * len(sizes)}), str(d / "b.parquet"))
    buckets = ((32, 32), (48, 24), (24, 48))
    spec = DataSpec(C.DataSection(source=str(d), resolution=32, val_fraction=0.0,
                                  buckets=[f"{w}x{h}" for w, h in buckets]), batch_size=4)
    ds = build_datasets(spec, tiny_sdxl)["train"]
    rows = ds.take_all()
    assert len(rows) == len(sizes)
    for r in rows:
        oh, ow = int(r["time_ids"][0]), int(r["time_ids"][1])
        bw, bh = buckets[int(r["bucket"])]
        assert int(r["bucket"]) == closest_bucket(ow, oh, list(buckets))
        assert r["pixels"].shape == (3, bh, bw) and tuple(r["time_ids"][4:]) == (bh, bw)
    # What a training worker gets from its stream: batches of one bucket each.
    stream = planned_batches(spec, tiny_sdxl, build_manifest(spec), StreamPosition(0, 1, 2, [0]), 0, 2)
    batches = [b for b, _, _ in itertools.islice(stream, 3)]
    assert len(batches) == 3
    for b in batches:
        assert len(set(b["bucket"].tolist())) == 1 and b["pixels"].dtype == np.uint8
        bw, bh = buckets[int(b["bucket"][0])]
        assert tuple(b["pixels"].shape) == (2, 3, bh, bw) and b["time_ids"].shape == (2, 6)
