"""Data path: demo dataset, SDXL crop/time_ids arithmetic, image decoding, and the Ray Data pipeline end to end."""

from __future__ import annotations

import glob
import io
import json
import os
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from PIL import Image

from raydiff.config import DataSection
from raydiff.data.demo import ensure_demo_dataset, write_demo_dataset
from raydiff.data.loader import held_out_batches
from raydiff.data.manifest import choose_val_rows
from raydiff.data.pipeline import OUTPUT_COLUMNS, DataSpec, build_datasets, build_manifest, held_out_rows
from raydiff.data.transforms import (
    CropPlan,
    ImageDecodeError,
    apply_crop,
    decode_image,
    plan_crop,
    resized_size,
    sample_key,
    sample_rng,
    time_ids,
)

R = 32  # small resolution keeps the Ray tests fast


# ------------------------------------------------------------------------------------------------ tokenizers


def _byte_chars() -> list[str]:
    # CLIP/GPT-2 byte-level alphabet: printable bytes map to themselves, the rest to code points from 256 up.
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    extra = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(extra))]


def _write_fallback_tokenizers(root: str) -> str:
    """Minimal CLIP byte-level BPE (every byte symbol, a few merges) in SDXL's tokenizer/ + tokenizer_2/ layout."""
    symbols = _byte_chars()
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    merges = ["r e", "re d</w>", "c i", "ci r", "cir c", "circ l", "circl e</w>"]
    for merged in ("re", "red</w>", "ci", "cir", "circ", "circl", "circle</w>"):
        vocab[merged] = len(vocab)
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    for sub in ("tokenizer", "tokenizer_2"):
        d = os.path.join(root, sub)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "vocab.json"), "w") as f:
            json.dump(vocab, f)
        with open(os.path.join(d, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
            json.dump({"model_max_length": 77, "pad_token": "<|endoftext|>"}, f)
    return root


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny SDXL model's tokenizers when raydiff.models provides them, else a minimal BPE written here."""
    try:
        from raydiff.models import resolve_pretrained
    except ImportError:
        return _write_fallback_tokenizers(str(tmp_path_factory.mktemp("tokenizers")))
    with pytest.MonkeyPatch.context() as mp:
        if not os.environ.get("RAYDIFF_CACHE"):
            mp.setenv("RAYDIFF_CACHE", str(tmp_path_factory.mktemp("raydiff-cache")))
        return resolve_pretrained("tiny")


# ------------------------------------------------------------------------------------------------ demo dataset


def _files_bytes(d: str) -> list[bytes]:
    return [open(p, "rb").read() for p in sorted(glob.glob(os.path.join(d, "*.parquet")))]


def test_demo_dataset_is_deterministic_and_hf_shaped(tmp_path):
    a = write_demo_dataset(str(tmp_path / "a"), num_images=40, seed=3)
    b = write_demo_dataset(str(tmp_path / "b"), num_images=40, seed=3)
    c = write_demo_dataset(str(tmp_path / "c"), num_images=40, seed=4)
    assert _files_bytes(a) == _files_bytes(b)
    assert _files_bytes(a) != _files_bytes(c)
    files = sorted(glob.glob(os.path.join(a, "*.parquet")))
    assert len(files) == 4
    table = pa.concat_tables([pq.read_table(f) for f in files])
    assert table.num_rows == 40
    assert table.schema.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    assert table.schema.field("text").type == pa.string()
    sizes = [decode_image(r["bytes"]).size for r in table["image"].to_pylist()]
    assert all(48 <= w <= 160 and 48 <= h <= 160 for w, h in sizes)
    assert any(w > h for w, h in sizes) and any(h > w for w, h in sizes)
    texts = table["text"].to_pylist()
    assert all(t.startswith("a ") and t.endswith(" background") for t in texts)
    assert any(" and " in t for t in texts)


def test_ensure_demo_dataset_writes_once_atomically(tmp_path):
    p1 = ensure_demo_dataset(str(tmp_path), num_images=8, seed=0)
    mtimes = [os.path.getmtime(f) for f in glob.glob(os.path.join(p1, "*.parquet"))]
    p2 = ensure_demo_dataset(str(tmp_path), num_images=8, seed=0)
    assert p1 == p2 == str(tmp_path / "demo-shapes-v1-n8-s0")
    assert [os.path.getmtime(f) for f in glob.glob(os.path.join(p1, "*.parquet"))] == mtimes
    assert os.listdir(tmp_path) == ["demo-shapes-v1-n8-s0"]  # no temp dirs left behind


def test_ensure_demo_dataset_concurrent_callers(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda _: ensure_demo_dataset(str(tmp_path), num_images=12, seed=1), range(4)))
    assert len(set(paths)) == 1
    assert pq.read_table(paths[0]).num_rows == 12
    assert os.listdir(tmp_path) == ["demo-shapes-v1-n12-s1"]


# ------------------------------------------------------------------------------------------------ crop arithmetic


def test_center_crop_values_are_exact():
    land = plan_crop(200, 100, 64, center_crop=True, random_flip=False, rng=random.Random(0))
    assert land == CropPlan(resized_w=128, resized_h=64, crop_top=0, crop_left=32, flipped=False)
    port = plan_crop(90, 300, 64, center_crop=True, random_flip=False, rng=random.Random(0))
    assert port == CropPlan(resized_w=64, resized_h=213, crop_top=74, crop_left=0, flipped=False)  # 300*64/90=213.3


@pytest.mark.parametrize("size", [(201, 100), (90, 300), (200, 100)])
@pytest.mark.parametrize("center", [True, False])
def test_flip_reports_crop_left_in_flipped_image(size, center):
    w, h = size
    flipped_seen = unflipped_seen = 0
    for seed in range(40):
        base = plan_crop(w, h, 64, center, random_flip=False, rng=np.random.default_rng(seed))
        plan = plan_crop(w, h, 64, center, random_flip=True, rng=np.random.default_rng(seed))
        assert (plan.resized_w, plan.resized_h, plan.crop_top) == (base.resized_w, base.resized_h, base.crop_top)
        assert 0 <= plan.crop_top <= plan.resized_h - 64 and 0 <= plan.crop_left <= plan.resized_w - 64
        if plan.flipped:
            flipped_seen += 1
            assert plan.crop_left == plan.resized_w - base.crop_left - 64
        else:
            unflipped_seen += 1
            assert plan.crop_left == base.crop_left
    assert flipped_seen and unflipped_seen


def test_center_flip_on_odd_width_moves_crop_left():
    rng = random.Random(0)
    while not (plan := plan_crop(201, 100, 64, True, True, rng)).flipped:
        pass
    assert (plan.resized_w, plan.crop_left) == (129, 33)  # unflipped center left is (129-64)//2 = 32


def test_random_crop_reaches_both_edges_and_is_seeded():
    lefts = {plan_crop(200, 100, 64, False, False, np.random.default_rng(s)).crop_left for s in range(300)}
    assert min(lefts) == 0 and max(lefts) == 128 - 64
    assert plan_crop(200, 100, 64, False, True, sample_rng(1, 2, 3)) == plan_crop(
        200, 100, 64, False, True, sample_rng(1, 2, 3)
    )


def test_small_images_are_upscaled_by_the_same_rule():
    assert resized_size(20, 10, 64) == (128, 64)
    assert resized_size(10, 10, 64) == (64, 64)
    img = Image.new("RGB", (20, 10), (10, 200, 30))
    plan = plan_crop(20, 10, 64, True, False, random.Random(0))
    out = apply_crop(img, plan, 64)
    assert out.shape == (3, 64, 64) and out.dtype == np.uint8
    assert tuple(out[:, 32, 32]) == (10, 200, 30)


def test_apply_crop_matches_reported_coordinates():
    # Horizontal gradient: column x holds value x, so the crop's columns reveal where it was cut.
    grad = np.tile(np.arange(128, dtype=np.uint8), (64, 1))
    img = Image.fromarray(np.stack([grad] * 3, axis=-1))
    plain = apply_crop(img, CropPlan(128, 64, 0, 10, False), 64)
    assert plain[0, 0, 0] == 10 and plain[0, 0, 63] == 73
    flipped = apply_crop(img, CropPlan(128, 64, 0, 128 - 10 - 64, True), 64)
    np.testing.assert_array_equal(flipped, plain[:, :, ::-1])


def test_time_ids_tuple():
    plan = CropPlan(resized_w=64, resized_h=213, crop_top=74, crop_left=0, flipped=False)
    assert time_ids(300, 90, plan, 64) == (300, 90, 74, 0, 64, 64)


# ------------------------------------------------------------------------------------------------ decoding


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_decode_rgba_composites_on_white():
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    img.putpixel((1, 1), (255, 0, 0, 255))
    img.putpixel((2, 2), (0, 0, 0, 128))
    out = decode_image(_encode(img, "PNG"))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)  # fully transparent red → white, not red or black
    assert out.getpixel((1, 1)) == (255, 0, 0)
    assert all(abs(v - 127) <= 1 for v in out.getpixel((2, 2)))


def test_decode_palette_grey_cmyk_and_16bit():
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 255] + [0, 255, 0] * 255)
    pal.info["transparency"] = 0
    assert decode_image(_encode(pal, "PNG", transparency=0)).getpixel((0, 0)) == (255, 255, 255)
    pal_opaque = Image.new("P", (4, 4), 1)
    pal_opaque.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)
    assert decode_image(_encode(pal_opaque, "PNG")).getpixel((0, 0)) == (0, 255, 0)
    assert decode_image(_encode(Image.new("L", (4, 4), 77), "PNG")).getpixel((0, 0)) == (77, 77, 77)
    cmyk = decode_image(_encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=100))
    r, g, b = cmyk.getpixel((4, 4))
    assert cmyk.mode == "RGB" and r > 200 and g < 60 and b < 60
    arr16 = np.array([[0, 32896, 65535, 65535]], dtype=np.uint16)
    img16 = Image.fromarray(arr16)
    assert img16.mode.startswith("I")
    out = decode_image(_encode(img16, "PNG"))
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_decode_applies_exif_orientation():
    img = Image.new("RGB", (60, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° CW to display"
    out = decode_image(_encode(img, "JPEG", exif=exif.tobytes()))
    assert out.size == (20, 60)


def test_decode_truncated_bytes_raises_clear_error():
    data = _encode(Image.new("RGB", (64, 64), (1, 2, 3)), "PNG")
    with pytest.raises(ImageDecodeError, match="cannot decode image"):
        decode_image(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError):
        decode_image(b"")


def test_val_rows_depend_on_the_rows_places_only():
    names, units = ["a.parquet", "b/c.parquet"], [[50, 50], [200]]
    val = choose_val_rows(names, units, 0.2, 16)
    assert len(val) == 16 and list(val) == sorted(set(val.tolist())) and val.min() >= 0 and val.max() < 300
    assert choose_val_rows(names, units, 0.2, 16).tolist() == val.tolist()  # no seed: every trial holds out these
    assert choose_val_rows(names, [[100], [200]], 0.2, 16).tolist() == val.tolist()  # row groups do not matter
    assert set(choose_val_rows(names, units, 0.2, 8).tolist()) < set(val.tolist())  # a smaller cap keeps a subset
    assert len(choose_val_rows(names, units, 0.01, 1000)) < 12  # the fraction bounds the candidates
    assert choose_val_rows(names, units, 0.0, 16).size == 0 and choose_val_rows(names, units, 0.2, 0).size == 0
    assert choose_val_rows(["x.parquet", "b/c.parquet"], units, 0.2, 16).tolist() != val.tolist()


# ------------------------------------------------------------------------------------------------ Ray pipeline

CORRUPT_PATH = "corrupt_0001.png"


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> str:
    """48 demo images plus one extra file holding a truncated PNG and an RGBA image with a null caption."""
    d = write_demo_dataset(str(tmp_path_factory.mktemp("data")), num_images=48, seed=7)
    good = _encode(Image.new("RGBA", (70, 130), (0, 200, 0, 128)), "PNG")
    bad = _encode(Image.new("RGB", (80, 80), (9, 9, 9)), "PNG")[:100]
    extra = pa.table(
        {
            "image": [{"bytes": bad, "path": CORRUPT_PATH}, {"bytes": good, "path": "rgba.png"}],
            "text": ["a corrupt row", None],
        },
        schema=pq.read_schema(glob.glob(os.path.join(d, "*.parquet"))[0]),
    )
    pq.write_table(extra, os.path.join(d, "extra.parquet"))
    return d


def _source_rows(d: str) -> list[dict]:
    table = pa.concat_tables([pq.read_table(f) for f in sorted(glob.glob(os.path.join(d, "*.parquet")))])
    rows = []
    for img, text in zip(table["image"].to_pylist(), table["text"].to_pylist()):
        rows.append({"bytes": img["bytes"], "path": img["path"], "text": text or "", "key": sample_key(img["bytes"])})
    return rows


def _expected(rows: list[dict], seed: int, epoch: int, center: bool, flip: bool) -> list[tuple[bytes, tuple]]:
    out = []
    for r in rows:
        img = decode_image(r["bytes"])
        w, h = img.size
        plan = plan_crop(w, h, R, center, flip, sample_rng(seed, epoch, r["key"]))
        out.append((apply_crop(img, plan, R).tobytes(), tuple(float(v) for v in time_ids(h, w, plan, R))))
    return out


def _collect(ds) -> dict[str, np.ndarray]:
    batches = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    return {c: np.concatenate([b[c] for b in batches]) for c in batches[0]}


def _as_samples(cols: dict[str, np.ndarray]) -> list[tuple[bytes, tuple]]:
    return [(p.tobytes(), tuple(float(v) for v in t)) for p, t in zip(cols["pixels"], cols["time_ids"])]


def _spec(d: str, **data) -> DataSpec:
    section = DataSection(**{"source": d, "resolution": R, "val_fraction": 0.3, "val_max_samples": 6, **data})
    return DataSpec(section, seed=11, batch_size=16)


def test_build_datasets_end_to_end(ray_local, dataset_dir, tokenizer_dir):
    from transformers import CLIPTokenizer

    rows = _source_rows(dataset_dir)
    spec = _spec(dataset_dir)
    held_out = set(build_manifest(spec).val_rows.tolist())  # global row = place in the sorted files' rows
    assert len(held_out) == 6
    exp_val_rows = [r for g, r in enumerate(rows) if g in held_out and r["path"] != CORRUPT_PATH]
    exp_train_rows = [r for g, r in enumerate(rows) if g not in held_out and r["path"] != CORRUPT_PATH]
    assert len(exp_val_rows) + len(exp_train_rows) == len(rows) - 1
    ds = build_datasets(spec, tokenizer_dir, epoch=0)
    assert set(ds) == {"train", "val"}
    train, val = _collect(ds["train"]), _collect(ds["val"])

    for cols, n in ((train, len(exp_train_rows)), (val, len(exp_val_rows))):
        assert tuple(sorted(cols)) == tuple(sorted(OUTPUT_COLUMNS))
        assert cols["pixels"].dtype == np.uint8 and cols["pixels"].shape == (n, 3, R, R)
        assert cols["input_ids"].dtype == np.int64 and cols["input_ids"].shape == (n, 77)
        assert cols["input_ids_2"].dtype == np.int64 and cols["input_ids_2"].shape == (n, 77)
        assert cols["time_ids"].dtype == np.float32 and cols["time_ids"].shape == (n, 6)

    # Same (seed, epoch, sample) → the crop computed here, in another process, matches the workers' crop exactly;
    # the corrupt row was skipped and every other row is in exactly one split.
    train_samples = _as_samples(train)
    assert sorted(train_samples) == sorted(_expected(exp_train_rows, 11, 0, center=False, flip=True))
    assert sorted(_as_samples(val)) == sorted(_expected(exp_val_rows, 11, 0, center=True, flip=False))

    # Captions stay paired with their images and are tokenized by both tokenizers.
    toks = [CLIPTokenizer.from_pretrained(tokenizer_dir, subfolder=s) for s in ("tokenizer", "tokenizer_2")]
    by_sample = dict(zip(_expected(exp_train_rows, 11, 0, False, True), exp_train_rows))
    for i, sample in enumerate(train_samples):
        caption = by_sample[sample]["text"]
        for col, tok in zip(("input_ids", "input_ids_2"), toks):
            want = tok([caption], padding="max_length", max_length=77, truncation=True).input_ids[0]
            assert train[col][i].tolist() == want

    # Val rows come in listing order.
    assert _as_samples(val) == _expected(exp_val_rows, 11, 0, center=True, flip=False)
    # The driver's in-process read of the held-out split (a run's few val rows) gives exactly these rows.
    here = held_out_rows(spec, tokenizer_dir, build_manifest(spec))
    assert len(here) == len(exp_val_rows)
    for c in OUTPUT_COLUMNS:
        np.testing.assert_array_equal(np.stack([row[c] for row in here]), val[c])
    # Workers batch them as Ray Data would have (loader.held_out_batches): same columns, dtypes, values, last batch
    # short.
    ours = list(held_out_batches(here, 3))
    ray_data = list(ray.data.from_items(here).iter_batches(batch_size=3, batch_format="numpy"))
    assert len(ours) == len(ray_data) == -(-len(here) // 3)
    for a, b in zip(ours, ray_data):
        assert a.keys() == b.keys() and all(a[c].dtype == b[c].dtype for c in a)
        for c in a:
            np.testing.assert_array_equal(a[c], b[c])
    # A second call (another epoch) gives the same val, in the same order, and new train crops for the same images.
    again = build_datasets(spec, tokenizer_dir, epoch=1)
    val2, train2 = _collect(again["val"]), _collect(again["train"])
    for c in OUTPUT_COLUMNS:
        np.testing.assert_array_equal(val2[c], val[c])
    train2_samples = _as_samples(train2)
    assert sorted(train2_samples) == sorted(_expected(exp_train_rows, 11, 1, center=False, flip=True))
    assert sorted(t[:2] for _, t in train2_samples) == sorted(t[:2] for _, t in train_samples)  # same images
    assert len(set(train2_samples) - set(train_samples)) > len(train_samples) // 2


@pytest.mark.parametrize("world", [1, 2, 3])
def test_worker_streams_visit_each_sample_once_per_epoch_in_a_new_seeded_order(ray_local, dataset_dir, tokenizer_dir,
                                                                               world):
    from raydiff.data.loader import planned_train_dataset
    from raydiff.data.pipeline import share_chunks
    from raydiff.data.stream import EPOCH_COLUMN, ORDER_COLUMN, StreamPosition, Units, epoch_share

    spec = _spec(dataset_dir, val_fraction=0.0, shuffle_window=8)
    good = [r for r in _source_rows(dataset_dir) if r["path"] != CORRUPT_PATH]
    manifest = build_manifest(spec)
    assert manifest.num_train == len(good) + 1  # start-up reads footers only: the corrupt row is still listed
    pos = StreamPosition(0, world, 4, [0] * world)
    samples, stream = {0: [], 1: []}, {0: [], 1: []}
    for rank in range(world):  # one execution per worker serves both epochs
        shares = [epoch_share(Units(manifest.unit_train_rows), spec.seed, pos, rank, e, 8) for e in (0, 1)]
        chunks = [c for share in shares for c in share_chunks(manifest, share)]
        cols = _collect(planned_train_dataset(spec, tokenizer_dir, manifest, chunks))
        got = cols[ORDER_COLUMN].tolist()
        assert got == sorted(got)  # in stream order
        for share in shares:
            mine = cols[EPOCH_COLUMN] == share.epoch
            assert set(cols[ORDER_COLUMN][mine].tolist()) <= set(range(share.first, share.end))  # own rows only
            assert share.end - share.first - mine.sum() <= 1  # at most the corrupt row is missing
            picked = {c: v[mine] for c, v in cols.items()}
            samples[share.epoch] += _as_samples(picked)
            stream[share.epoch] += [(rank, j, s) for j, s in zip(picked[ORDER_COLUMN], _as_samples(picked))]
    for epoch in (0, 1):  # every good sample exactly once across the workers, with this epoch's crop and flip
        assert sorted(samples[epoch]) == sorted(_expected(good, 11, epoch, center=False, flip=True))
    orders = [[t[:2] for _, _, (_, t) in sorted(stream[e])] for e in (0, 1)]
    assert orders[0] != orders[1]  # each epoch has its own order


def test_on_error_raise_names_the_row(ray_local, dataset_dir, tokenizer_dir):
    ds = build_datasets(_spec(dataset_dir, val_fraction=0.0, on_error="raise"), tokenizer_dir)["train"]
    with pytest.raises(Exception, match=CORRUPT_PATH) as info:
        _collect(ds)
    assert "cannot preprocess source row " in str(info.value)
