"""Precompute (data.precompute): the encoder stage streamed or through a fingerprinted parquet cache, checked against
the online path (the training step's own encoding) on real Ray Data pipelines and the tiny SDXL encoders."""

from __future__ import annotations

import dataclasses
import glob
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from raydiff import models
from raydiff.config import DataSection
from raydiff.data import stats
from raydiff.data.demo import write_demo_dataset
from raydiff.data.loader import planned_train_dataset
from raydiff.data.pipeline import DataSpec, build_manifest, drop_caption, share_chunks
from raydiff.data.precompute import (
    LATENT_COLUMN,
    EncoderSpec,
    choose_epoch_variant,
    ensure_cache,
    fingerprint,
)
from raydiff.data.stream import ORDER_COLUMN, StreamPosition, Units, epoch_share
from raydiff.data.transforms import decode_image, flip_pair, plan_crop, sample_key, sample_rng, time_ids

R = 32
SEED = 5
DROPOUT = 0.3


def test_flip_pair_mirrors_the_window():
    rng = sample_rng(0, 0, 1)
    for w, h in ((90, 40), (40, 90), (33, 33)):
        plan = plan_crop(w, h, R, False, True, rng)
        plain, flipped = flip_pair(plan, R)
        assert not plain.flipped and flipped.flipped
        assert plain.crop_left + flipped.crop_left + R == plan.resized_w  # one window, seen from both sides
        assert plan in (plain, flipped)  # the drawn plan is one of the pair


def test_choose_epoch_variant_draws_the_online_flip_and_dropout():
    """Pure: per row, the flip the online path would draw this epoch and the seeded caption dropout."""
    keys = np.arange(40, dtype=np.int64) * 7919
    tids = np.tile(np.array([[50, 90, 3, 10, R, R]], dtype=np.float32), (40, 1))
    tids_f = tids.copy()
    tids_f[:, 3] = 99
    batch = {"_key": keys, "_row": keys, "time_ids": tids, "time_ids_flipped": tids_f,
             LATENT_COLUMN: np.zeros((40, 2)), LATENT_COLUMN + "_flipped": np.ones((40, 2)),
             "prompt_embeds": np.ones((40, 3, 2), np.float32), "pooled": np.ones((40, 2), np.float32),
             ORDER_COLUMN: np.arange(40)}
    empty = {"prompt_embeds": np.full((3, 2), -1, np.float32), "pooled": np.full(2, -1, np.float32)}
    for epoch in (0, 1):
        out = choose_epoch_variant(batch, seed=SEED, epoch=epoch, random_flip=True, center_crop=False,
                                   caption_dropout=0.5, empty=empty)
        # The source row stays (data.record_rows); the key and the unchosen flip variants go.
        assert sorted(out) == sorted(["time_ids", LATENT_COLUMN, "prompt_embeds", "pooled", ORDER_COLUMN, "_row"])
        want_flip = [plan_crop(90, 50, R, False, True, sample_rng(SEED, epoch, int(k))).flipped for k in keys]
        assert 5 < sum(want_flip) < 35
        assert (out[LATENT_COLUMN][:, 0] == 1).tolist() == want_flip
        assert (out["time_ids"][:, 3] == 99).tolist() == want_flip
        dropped = [drop_caption(SEED, epoch, int(k), 0.5) for k in keys]
        assert (out["pooled"][:, 0] == -1).tolist() == dropped and 5 < sum(dropped) < 35
        assert (out["prompt_embeds"][:, 0, 0] == -1).tolist() == dropped
    assert (batch["pooled"] == 1).all()  # the cached rows themselves are untouched
    # Rows of a stream carry their own epoch (a read chunk may follow an epoch boundary).
    out = choose_epoch_variant({**batch, "_epoch": np.arange(40) % 2}, seed=SEED, random_flip=True, center_crop=False,
                               caption_dropout=0.5, empty=empty)
    want_flip = [plan_crop(90, 50, R, False, True, sample_rng(SEED, i % 2, int(k))).flipped for i, k in enumerate(keys)]
    assert (out["time_ids"][:, 3] == 99).tolist() == want_flip


def test_encoder_encodes_each_bucket_size_and_keeps_row_order(monkeypatch):
    """Rows of different aspect-ratio buckets in one batch: one VAE call per size, results back in row order."""
    from raydiff.data.precompute import Encoder

    calls = []

    def fake_moments(vae, pixels):  # moments = the first channel, twice (its value identifies the row)
        calls.append(tuple(pixels.shape))
        return torch.cat([pixels[:, :1].float()] * 2, dim=1)

    monkeypatch.setattr(models, "latent_moments", fake_moments)
    encoder = Encoder.__new__(Encoder)  # no model loading: the VAE call is replaced above
    encoder.vae = None
    sizes = [(4, 2), (2, 4), (4, 2), (2, 4), (4, 2)]
    pixels = np.empty(len(sizes), dtype=object)
    pixels[:] = [np.full((3, *hw), i, np.uint8) for i, hw in enumerate(sizes)]
    out = encoder.encode_pixels(pixels)
    assert sorted(calls) == [(2, 3, 2, 4), (3, 3, 4, 2)]
    assert [o.shape for o in out] == [(2, *hw) for hw in sizes]
    assert [float(o.mean()) for o in out] == [0.0, 1.0, 2.0, 3.0, 4.0]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
    """20 demo images plus one truncated image (skipped and counted)."""
    d = write_demo_dataset(str(tmp_path_factory.mktemp("precompute-data")), num_images=20, seed=3)
    png = Image.new("RGB", (80, 80), (9, 9, 9))
    import io

    buf = io.BytesIO()
    png.save(buf, format="PNG")
    extra = pa.table({"image": [{"bytes": buf.getvalue()[:100], "path": "broken.png"}], "text": ["broken"]},
                     schema=pq.read_schema(glob.glob(os.path.join(d, "*.parquet"))[0]))
    pq.write_table(extra, os.path.join(d, "extra.parquet"))
    return d


def _collect(ds) -> dict[str, np.ndarray]:
    batches = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    return {c: np.concatenate([b[c] for b in batches]) for c in batches[0]}


def _unet_inputs(rows: dict[str, np.ndarray], enc: models.FrozenEncoders) -> dict[str, torch.Tensor]:
    """What the training step feeds the UNet for these rows (raydiff.train.step.TrainStep.encode), one generator."""
    from raydiff.config import ObjectiveSection
    from raydiff.train.step import TrainStep

    step = TrainStep(None, enc, torch.zeros(1), "epsilon", ObjectiveSection(), 1, torch.float32)
    batch = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in rows.items() if v.dtype != object}
    cond = step.encode(batch, torch.Generator().manual_seed(0))
    return {"latents": cond.latents, "prompt_embeds": cond.prompt_embeds, "pooled": cond.pooled,
            "time_ids": cond.time_ids}


def _assert_same_inputs(a: dict, b: dict) -> None:
    np.testing.assert_array_equal(a["time_ids"].numpy(), b["time_ids"].numpy())
    for k in ("latents", "prompt_embeds", "pooled"):
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_cache_and_streamed_precompute_give_the_online_unet_inputs(ray_local, tiny_sdxl, source, tmp_path):
    actor = stats.create()
    spec = DataSpec(DataSection(source=source, resolution=R, val_fraction=0.2, val_max_samples=3,
                                caption_dropout=DROPOUT), seed=SEED, batch_size=8, stats_actor=actor)
    index = build_manifest(spec)
    encoder = EncoderSpec(pretrained=tiny_sdxl, mode="latents")
    cache_dir = str(tmp_path / "cache")

    # Miss: built once; the broken row is skipped, counted, and recorded with the cache.
    data_dir = ensure_cache(spec, encoder, tiny_sdxl, index, cache_dir)
    root = os.path.dirname(data_dir)
    manifest = json.load(open(os.path.join(root, "cache.json")))
    assert manifest["rows"] == index.num_train - 1 and manifest["counts"]["data_skipped"] == 1
    assert stats.metrics(actor)["data_skipped"] == 1
    # Hit: same data directory, nothing rebuilt; the build's skips count in the new run too.
    actor_2 = stats.create()
    spec_2 = dataclasses.replace(spec, stats_actor=actor_2)
    assert ensure_cache(spec_2, encoder, tiny_sdxl, index, cache_dir) == data_dir
    assert sorted(os.listdir(root)) == sorted([os.path.basename(data_dir), "cache.json"])
    assert "row_index.json" in os.listdir(data_dir)
    assert stats.metrics(actor_2)["data_skipped"] == 1

    # Epoch 0: the cached rows, the streamed encoder and the online path give the same UNet inputs per sample.
    enc = models.load_encoders(tiny_sdxl)
    pos = StreamPosition(0, 1, 4, [0])
    share = share_chunks(index, epoch_share(Units(index.unit_train_rows), SEED, pos, 0, 0))
    online = _collect(planned_train_dataset(spec, tiny_sdxl, index, share))
    cached = _collect(planned_train_dataset(dataclasses.replace(spec, cache=data_dir), tiny_sdxl, index, share))
    streamed = _collect(planned_train_dataset(dataclasses.replace(spec, encoder=dataclasses.asdict(encoder)),
                                              tiny_sdxl, index, share))
    assert online[ORDER_COLUMN].tolist() == cached[ORDER_COLUMN].tolist() == streamed[ORDER_COLUMN].tolist()
    assert len(online[ORDER_COLUMN]) == index.num_train - 1
    assert LATENT_COLUMN in cached and "pixels" not in cached and "input_ids" not in cached
    reference = _unet_inputs(online, enc)
    _assert_same_inputs(_unet_inputs(cached, enc), reference)
    _assert_same_inputs(_unet_inputs(streamed, enc), reference)

    # Caption dropout reached every path: dropped rows condition on zeros (the pipeline's empty negative prompt).
    is_empty = [bool((p == 0).all() and (e == 0).all())
                for p, e in zip(reference["pooled"], reference["prompt_embeds"])]
    assert 0 < sum(is_empty) < len(is_empty)

    # Epoch 1 from the cache: epoch 0's window, with the flip the online path draws in epoch 1.
    share_1 = share_chunks(index, epoch_share(Units(index.unit_train_rows), SEED, pos, 0, 1))
    cached_1 = _collect(planned_train_dataset(dataclasses.replace(spec, cache=data_dir), tiny_sdxl, index, share_1))
    rows = _source_rows(source)
    flips_changed = 0
    for t in cached_1["time_ids"]:
        matches = [r for r in rows if (r["h"], r["w"]) == (int(t[0]), int(t[1]))]
        expected = set()
        for r in matches:
            plan_0 = plan_crop(r["w"], r["h"], R, False, True, sample_rng(SEED, 0, r["key"]))
            flip_1 = plan_crop(r["w"], r["h"], R, False, True, sample_rng(SEED, 1, r["key"])).flipped
            expected.add(time_ids(r["h"], r["w"], flip_pair(plan_0, R)[flip_1], R))
            flips_changed += flip_1 != plan_0.flipped
        assert tuple(int(v) for v in t) in expected
    assert flips_changed > 0

    # Miss (another cache directory) on a change of preprocessing, encoder dtype, model files, source files or split.
    key = fingerprint(spec, encoder, index)
    assert os.path.basename(root) == key
    assert fingerprint(dataclasses.replace(spec, data=dataclasses.replace(spec.data, center_crop=True)), encoder,
                       index) != key
    assert fingerprint(dataclasses.replace(spec, seed=SEED + 1), encoder, index) != key
    assert fingerprint(spec, dataclasses.replace(encoder, text_dtype="bfloat16"), index) != key
    assert fingerprint(spec, encoder, dataclasses.replace(index, val_rows=index.val_rows[1:])) != key
    assert fingerprint(spec, encoder, dataclasses.replace(index, fingerprint="another listing")) != key
    config = os.path.join(tiny_sdxl, "vae", "config.json")
    os.utime(config, ns=(os.stat(config).st_atime_ns, os.stat(config).st_mtime_ns + 1))
    assert fingerprint(spec, encoder, index) != key


def _source_rows(d: str) -> list[dict]:
    rows = []
    for f in sorted(glob.glob(os.path.join(d, "*.parquet"))):
        for img in pq.read_table(f)["image"].to_pylist():
            try:
                w, h = decode_image(img["bytes"]).size
            except ValueError:
                continue
            rows.append({"key": sample_key(img["bytes"]), "w": w, "h": h})
    return rows


def test_cache_on_a_bucket_is_built_once_and_read_back(ray_local, tiny_sdxl, source, s3_bucket):
    """data.cache_dir on a real S3-API server: the build, the manifest commit, a hit, and the per-epoch read."""
    from raydiff import storage

    spec = DataSpec(DataSection(source=source, resolution=R, val_fraction=0.2, val_max_samples=3), seed=SEED,
                    batch_size=8)
    index = build_manifest(spec)
    encoder = EncoderSpec(pretrained=tiny_sdxl, mode="text")
    cache_dir = f"{s3_bucket}/cache"
    data_dir = ensure_cache(spec, encoder, tiny_sdxl, index, cache_dir)
    assert data_dir.startswith(cache_dir + "/") and storage.exists(os.path.dirname(data_dir) + "/cache.json")
    assert ensure_cache(spec, encoder, tiny_sdxl, index, cache_dir) == data_dir
    share = share_chunks(index, epoch_share(Units(index.unit_train_rows), SEED, StreamPosition(0, 1, 4, [0]), 0, 0))
    rows = _collect(planned_train_dataset(dataclasses.replace(spec, cache=data_dir), tiny_sdxl, index, share))
    assert len(rows[ORDER_COLUMN]) == index.num_train - 1  # every good training row, the broken one skipped
    assert "pixels" in rows and "prompt_embeds" in rows and LATENT_COLUMN not in rows  # text mode keeps pixels
