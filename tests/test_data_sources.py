"""Dataset sources (parquet / image folder / WebDataset; local and on a real S3-API server) and hostile input."""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raydiff import storage
from raydiff.config import DataSection
from raydiff.data import sources, stats
from raydiff.data.pipeline import DataSpec, build_datasets

R = 16
N = 6  # images per dataset; image i is (24 + 2i) x 20 px, so its original width identifies it


def _png(w: int, h: int, mode: str = "RGB", color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def _samples() -> list[tuple[str, bytes, str]]:
    return [(f"img{i}.png", _png(24 + 2 * i, 20), f"a red box number {i}") for i in range(N)]


def write_variant(root: str, variant: str) -> str:
    """Write the N samples in one on-disk layout; returns the data.source (relative to ``root``)."""
    os.makedirs(root, exist_ok=True)
    s = _samples()
    if variant == "parquet_struct_dir":
        for k, part in enumerate((s[:3], s[3:])):
            pq.write_table(pa.table({"image": [{"bytes": b, "path": n} for n, b, _ in part],
                                     "text": [c for *_, c in part]}), os.path.join(root, f"train-{k}.parquet"))
        return ""
    if variant == "parquet_binary_glob":  # binary image column, custom column names, a glob
        for k, part in enumerate((s[:2], s[2:])):
            pq.write_table(pa.table({"jpg": pa.array([b for _, b, _ in part], pa.binary()),
                                     "caption": [c for *_, c in part]}), os.path.join(root, f"shard-{k}.parquet"))
        with open(os.path.join(root, "notes.txt"), "w") as f:
            f.write("not data")
        return "shard-*.parquet"
    if variant.startswith("imagefolder"):
        os.makedirs(os.path.join(root, "images"))
        for n, b, _ in s:
            with open(os.path.join(root, "images", n), "wb") as f:
                f.write(b)
        if variant == "imagefolder_jsonl":
            with open(os.path.join(root, "metadata.jsonl"), "w") as f:
                f.writelines(json.dumps({"file_name": f"images/{n}", "text": c}) + "\n" for n, _, c in s)
        else:
            with open(os.path.join(root, "metadata.csv"), "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["file_name", "text"])
                w.writerows([f"images/{n}", c] for n, _, c in s)
        return ""
    assert variant == "webdataset"  # two shards, one with .txt captions and one with .json captions
    for k, part in enumerate((s[:3], s[3:])):
        with tarfile.open(os.path.join(root, f"shard-{k:04d}.tar"), "w") as tar:
            for n, b, c in part:
                key = n.split(".")[0]
                cap = c.encode() if k == 0 else json.dumps({"text": c}).encode()
                for name, data in ((f"{key}.png", b), (f"{key}.{'txt' if k == 0 else 'json'}", cap)):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return ""


VARIANTS = ["parquet_struct_dir", "parquet_binary_glob", "imagefolder_jsonl", "imagefolder_csv", "webdataset"]
COLUMNS = {"parquet_binary_glob": {"image_column": "jpg", "caption_column": "caption"}}
FORMAT = {"parquet_struct_dir": "parquet", "parquet_binary_glob": "parquet", "imagefolder_jsonl": "imagefolder",
          "imagefolder_csv": "imagefolder", "webdataset": "webdataset"}


# ------------------------------------------------------------------------------------------------ S3 server


def upload(local_dir: str, uri: str) -> None:
    storage.upload_dir(local_dir, uri)


# ------------------------------------------------------------------------------------------------ helpers


def _collect(ds) -> dict[str, np.ndarray]:
    batches = [b for b in ds.iter_batches(batch_size=None, batch_format="numpy") if len(b["time_ids"])]
    return {c: np.concatenate([b[c] for b in batches]) for c in batches[0]} if batches else {}


def _train(spec: DataSpec, tokenizer: str) -> dict[str, np.ndarray]:
    return _collect(build_datasets(spec, tokenizer, epoch=0)["train"])


def _spec(source: str, stats_actor: str | None = None, **data) -> DataSpec:
    section = DataSection(**{"source": source, "resolution": R, "val_fraction": 0.0, **data})
    return DataSpec(section, batch_size=4, stats_actor=stats_actor)


def _check_all_samples(cols: dict[str, np.ndarray], tokenizer: str) -> None:
    """Every sample exactly once, each with its own caption (original width ↔ caption number)."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tokenizer, subfolder="tokenizer")
    widths = sorted(int(t[1]) for t in cols["time_ids"])
    assert widths == [24 + 2 * i for i in range(N)]
    for t, ids in zip(cols["time_ids"], cols["input_ids"]):
        i = (int(t[1]) - 24) // 2
        assert ids.tolist() == tok([f"a red box number {i}"], padding="max_length", max_length=77).input_ids[0]


# ------------------------------------------------------------------------------------------------ sources


@pytest.mark.parametrize("variant", VARIANTS)
def test_format_detection(tmp_path, variant):
    rel = write_variant(str(tmp_path), variant)
    src = sources.resolve(os.path.join(str(tmp_path), rel) if rel else str(tmp_path))
    assert src.format == FORMAT[variant]


def _rows(spec: DataSpec) -> dict[int, str]:
    """{original width: caption} of what the read stage yields for every row (bytes fetched like the preprocessor)."""
    from raydiff.data.pipeline import build_manifest, chunk_dataset, image_parts, load_bytes, unit_chunks
    from raydiff.data.transforms import decode_image

    manifest = build_manifest(spec)
    fs = manifest.filesystem if manifest.format == "imagefolder" else None
    out: dict[int, str] = {}
    ds = chunk_dataset(manifest, unit_chunks(manifest, np.arange(manifest.num_rows), 0))
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        data, paths = image_parts(batch[spec.data.image_column])
        for d, p, c in zip(data, paths, batch[spec.data.caption_column].to_pylist()):
            w = decode_image(load_bytes(d, p, fs)).size[0]
            assert w not in out
            out[w] = c
    assert len(out) == manifest.num_rows
    return out


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_source_formats(ray_local, tmp_path, request, variant, where):
    rel = write_variant(str(tmp_path / "d"), variant)
    base = str(tmp_path / "d")
    if where == "s3":
        base = f"{request.getfixturevalue('s3_bucket')}/{variant}"
        upload(str(tmp_path / "d"), base)
    source = f"{base}/{rel}" if rel else base
    rows = _rows(_spec(source, **COLUMNS.get(variant, {})))
    assert rows == {24 + 2 * i: f"a red box number {i}" for i in range(N)}


@pytest.mark.parametrize("variant", ["parquet_struct_dir", "imagefolder_jsonl", "webdataset"])
def test_source_end_to_end_from_s3(ray_local, tiny_sdxl, tmp_path, s3_bucket, variant):
    """Through the preprocessing actors, which read image-folder files from the bucket themselves."""
    write_variant(str(tmp_path / "d"), variant)
    upload(str(tmp_path / "d"), f"{s3_bucket}/e2e-{variant}")
    _check_all_samples(_train(_spec(f"{s3_bucket}/e2e-{variant}"), tiny_sdxl), tiny_sdxl)


def test_s3_filesystem_carries_endpoint_and_credentials(s3_bucket, monkeypatch):
    import pickle

    fs, path = storage.filesystem(f"{s3_bucket}/x")
    assert isinstance(fs, pafs.S3FileSystem) and path == "raydiff-data/x"
    storage.write_text(f"{s3_bucket}/x/a.txt", "hi")
    blob = pickle.dumps(fs)
    # Settings are explicit, so they survive pickling into Ray workers that never saw the AWS_* variables.
    for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    with pickle.loads(blob).open_input_stream("raydiff-data/x/a.txt") as f:
        assert f.read() == b"hi"


def test_missing_columns_and_unknown_layout_are_clear(tmp_path):
    from raydiff.data.pipeline import build_manifest

    write_variant(str(tmp_path / "p"), "parquet_struct_dir")
    with pytest.raises(KeyError, match=r"'caption'.*train-0\.parquet"):
        build_manifest(_spec(str(tmp_path / "p"), caption_column="caption"))
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="data.format"):
        sources.resolve(str(tmp_path / "q"))


# ------------------------------------------------------------------------------------------------ hostile input


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def hostile_rows() -> tuple[list[dict], dict[str, int]]:
    """Rows covering every hostile case, and the counts the data path must report for them."""
    ok = _png(24, 20)
    rows = [
        ("truncated.png", ok[: len(ok) // 2], "cut off"),
        ("garbage.png", b"not an image at all", "garbage"),
        ("panorama.png", _png(100, 20), "5:1 is over the default 4"),
        ("wide_ok.png", _png(80, 20), "exactly 4:1 is kept"),
        ("cmyk.jpg", _encode(Image.new("CMYK", (20, 20), (0, 255, 255, 0)), "JPEG"), "cmyk"),
        ("grey.png", _png(20, 20, "L", 90), "grey"),
        ("grey_alpha.png", _png(20, 20, "LA", (90, 128)), "grey alpha"),
        ("palette.png", _encode(Image.new("P", (20, 20), 3), "PNG"), "palette"),
        ("rgba.png", _png(20, 21, "RGBA", (0, 0, 255, 0)), "transparent blue"),
        ("deep.png", _encode(Image.fromarray(np.full((23, 20), 40000, np.uint16)), "PNG"), "16 bit"),
        ("tiny.png", _png(6, 5), "smaller than the resolution"),
        ("nocaption.png", _png(20, 22), None),
    ]
    table = [{"image": {"bytes": b, "path": n}, "text": c} for n, b, c in rows]
    return table, {"data_skipped": 3, "data_upscaled": 1, "data_null_captions": 1}


def _write_hostile(d: str) -> str:
    rows, _ = hostile_rows()
    os.makedirs(d, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(d, "hostile.parquet"))
    return d


def test_hostile_rows_are_converted_skipped_and_counted(ray_local, tiny_sdxl, tmp_path):
    name = stats.create()
    cols = _train(_spec(_write_hostile(str(tmp_path / "h")), stats_actor=name), tiny_sdxl)
    _, want = hostile_rows()
    assert len(cols["pixels"]) == 12 - want["data_skipped"]
    snap = stats.snapshot(name)
    assert {k: snap[k] for k in want} == want
    reasons = " | ".join(snap["examples"])
    for label in ("truncated.png", "garbage.png", "panorama.png", "max_aspect_ratio"):
        assert label in reasons
    by_size = {(int(t[0]), int(t[1])): px for t, px in zip(cols["time_ids"], cols["pixels"])}
    assert (by_size[(21, 20)] == 255).all()  # transparent blue composites to white, not blue or black
    assert (by_size[(23, 20)] == 156).all()  # 16-bit 40000/65535 rescaled, not clipped to 255


def test_max_aspect_ratio_is_configurable_and_raise_names_the_row(ray_local, tiny_sdxl, tmp_path):
    d = _write_hostile(str(tmp_path / "h"))
    name = stats.create()
    cols = _train(_spec(d, max_aspect_ratio=6.0, stats_actor=name), tiny_sdxl)
    assert len(cols["pixels"]) == 10 and stats.snapshot(name)["data_skipped"] == 2  # the panorama is kept now
    with pytest.raises(Exception, match=r"truncated\.png.*cannot decode image"):
        _train(_spec(d, on_error="raise"), tiny_sdxl)


def test_every_row_bad_gives_a_clear_error():
    from raydiff.data.stats import no_data_error

    err = no_data_error(None, "train")
    assert "no samples" in str(err) and "data.source" in str(err)


def test_rows_found_bad_are_not_read_again_and_keep_their_place(ray_local, tmp_path):
    """Once a row is recorded as skipped, read tasks leave it out before decoding; the others keep their places."""
    from raydiff.data.pipeline import build_manifest, read_chunk
    from raydiff.data.stream import ORDER_COLUMN, ROW_COLUMN

    manifest = build_manifest(_spec(_write_hostile(str(tmp_path / "h"))))
    name = stats.create(manifest.num_rows)
    chunk = pa.Table.from_pylist([{"epoch": 0, "first": 10, "rows": [3, 1, 7, 0]}])
    assert read_chunk(chunk, manifest=manifest, stats_actor=name)[ROW_COLUMN].to_pylist() == [3, 1, 7, 0]
    stats.record(name, {"data_skipped": [1, 0]}, [{"row": 1, "what": "garbage.png", "reason": "no image"},
                                                  {"row": 0, "what": "truncated.png", "reason": "cut off"}])
    again = read_chunk(chunk, manifest=manifest, stats_actor=name)
    assert again[ROW_COLUMN].to_pylist() == [3, 7] and again[ORDER_COLUMN].to_pylist() == [10, 12]
    assert stats.metrics(name)["data_skipped"] == 2
    stats.record(name, {"data_skipped": [1]}, [{"row": 1, "what": "garbage.png", "reason": "no image"}])
    assert stats.metrics(name)["data_skipped"] == 2  # distinct rows
