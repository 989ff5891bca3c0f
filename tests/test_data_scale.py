"""The data path at cluster scale, on real files through a byte-counting filesystem: each epoch reads every training
row exactly once across W workers and each unit about once (read amplification), start-up reads metadata only, and
a source changed under a run is refused on resume. Read tasks are called in this process (no Ray needed)."""

from __future__ import annotations

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

from raydiff.data import manifest as manifests
from raydiff.data.iostats import bytes_read, counting_filesystem, reset
from raydiff.data.pipeline import read_chunk, share_chunks
from raydiff.data.stream import EPOCH_COLUMN, ORDER_COLUMN, ROW_COLUMN, StreamPosition, Units, epoch_share

FILES, GROUPS, PER_GROUP = 4, 8, 6  # parquet: 32 read units of 6 rows
SHARDS, PER_SHARD = 12, 16  # webdataset: 12 read units of 16 rows


def _noise_png(i: int) -> bytes:
    """An incompressible image (~19 KB), so data bytes dwarf footers and headers as they do at scale."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(i).integers(0, 256, (80, 80, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_source(root: str, fmt: str) -> str:
    os.makedirs(root, exist_ok=True)
    if fmt == "parquet":
        for k in range(FILES):
            ids = range(k * GROUPS * PER_GROUP, (k + 1) * GROUPS * PER_GROUP)
            table = pa.table({"image": [{"bytes": _noise_png(i), "path": f"{i}.png"} for i in ids],
                              "text": [f"caption {i}" for i in ids]})
            pq.write_table(table, os.path.join(root, f"part-{k}.parquet"), row_group_size=PER_GROUP)
    elif fmt == "webdataset":
        for k in range(SHARDS):
            with tarfile.open(os.path.join(root, f"shard-{k:03d}.tar"), "w") as tar:
                for i in range(k * PER_SHARD, (k + 1) * PER_SHARD):
                    for name, data in ((f"s{i:05d}.png", _noise_png(i)), (f"s{i:05d}.txt", f"caption {i}".encode())):
                        info = tarfile.TarInfo(name)
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
    else:  # an image folder: images plus a metadata.jsonl
        os.makedirs(os.path.join(root, "img"))
        with open(os.path.join(root, "metadata.jsonl"), "w") as meta:
            for i in range(40):
                with open(os.path.join(root, "img", f"{i}.png"), "wb") as f:
                    f.write(_noise_png(i))
                meta.write(json.dumps({"file_name": f"img/{i}.png", "text": f"caption {i}"}) + "\n")
    return root


@pytest.fixture(scope="module", params=["parquet", "webdataset", "imagefolder"])
def source(request, tmp_path_factory) -> tuple[str, str]:
    return request.param, write_source(str(tmp_path_factory.mktemp(request.param)), request.param)


def _split_bytes(root: str, fmt: str) -> int:
    ext = {"parquet": ".parquet", "webdataset": ".tar"}[fmt]
    return sum(os.path.getsize(os.path.join(root, f)) for f in os.listdir(root) if f.endswith(ext))


def _read_epochs(m: manifests.Manifest, world: int, epochs: int, window: int = 12) -> dict[int, list[tuple]]:
    """{epoch: [(rank, local row, global row, caption)]} as the workers' read tasks produce them."""
    pos = StreamPosition(0, world, 4, [0] * world)
    out: dict[int, list[tuple]] = {e: [] for e in range(epochs)}
    for rank in range(world):
        for epoch in range(epochs):
            share = epoch_share(Units(m.unit_train_rows), 3, pos, rank, epoch, window)
            for chunk in share_chunks(m, share):
                t = read_chunk(pa.Table.from_pylist([{**chunk, "rows": chunk["rows"].tolist()}]), manifest=m)
                assert set(t[EPOCH_COLUMN].to_pylist()) <= {epoch}
                out[epoch] += list(zip([rank] * len(t), t[ORDER_COLUMN].to_pylist(), t[ROW_COLUMN].to_pylist(),
                                       t["text"].to_pylist()))
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_row_once_per_epoch_in_a_fresh_order_for_every_format(source, world, tmp_path):
    fmt, root = source
    m = manifests.build(root, None, "image", "text", 0.1, 4, workdir=str(tmp_path / "run"))
    assert m.format == fmt and m.num_val == 4
    seen = _read_epochs(m, world, 2)
    held_out = set(m.val_rows.tolist())
    for rows in seen.values():
        got = sorted(g for _, _, g, _ in rows)
        assert got == sorted(set(range(m.num_rows)) - held_out)  # every training row once, no held-out row
        assert all(c == f"caption {int(c.split()[1])}" for *_, c in rows)  # rows come with their own captions
    order = [[g for *_, g, _ in sorted(seen[e])] for e in (0, 1)]
    assert order[0] != order[1]  # each epoch its own order
    if world == 1:  # the order owes nothing to the listing order: correlation with it ~ 0 over epochs
        share = [epoch_share(Units(m.unit_train_rows), 3, StreamPosition(0, 1, 4, [0]), 0, e, 12).rows
                 for e in range(8)]
        assert abs(np.mean([np.corrcoef(r, np.arange(len(r)))[0, 1] for r in share])) < 0.3


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_an_epoch_reads_the_split_about_once_and_start_up_reads_metadata_only(fmt, world, tmp_path):
    root = write_source(str(tmp_path / "src"), fmt)
    sink = str(tmp_path / "reads")
    fs = counting_filesystem(pafs.LocalFileSystem(), sink)
    m = manifests.build(root, None, "image", "text", 0.0, 0, filesystem=fs)
    split = _split_bytes(root, fmt)
    start_up = bytes_read(sink)
    assert start_up < 0.1 * split  # footers / tar headers, not images
    reset(sink)
    epochs = 2
    _read_epochs(m, world, epochs)
    amplification = bytes_read(sink) / (split * epochs)
    units = len(m.unit_rows)
    # Each span boundary may cut a unit, read by both neighbours; the rest is footers (each file once per process).
    bound = 1 + (world - 1) / units + (0.04 if fmt == "parquet" else 0.01)
    assert amplification <= bound, f"read {amplification:.3f}x the split per epoch at W={world}"
    if world == 2:
        assert amplification <= 1.10


def test_a_source_changed_under_a_run_is_named_on_resume(tmp_path):
    root = write_source(str(tmp_path / "src"), "parquet")
    m = manifests.build(root, None, "image", "text", 0.0, 0)
    again = manifests.Manifest.from_json(m.to_json(), m.filesystem, m.unit_filesystem)
    assert again.fingerprint == m.fingerprint and again.unit_rows.tolist() == m.unit_rows.tolist()
    files = sorted(os.path.join(root, f) for f in os.listdir(root))
    pq.write_table(pq.read_table(files[1]).slice(0, 10), files[1])  # rewritten with fewer rows
    os.remove(files[2])
    now = manifests.file_stats(pafs.LocalFileSystem(), sorted(set(files) - {files[2]}))
    assert manifests.fingerprint(now, "parquet") != m.fingerprint
    message = manifests.describe_change(m, now)
    assert "1 file(s) removed (part-2.parquet)" in message and "1 file(s) rewritten (part-1.parquet)" in message
    assert f"{2 * GROUPS * PER_GROUP} of the run's {m.num_rows} rows" in message


def test_a_corrupt_file_is_named_at_start_up(tmp_path):
    root = write_source(str(tmp_path / "src"), "parquet")
    with open(os.path.join(root, "part-9.parquet"), "wb") as f:
        f.write(b"not parquet")
    with pytest.raises(ValueError, match=r"cannot read the parquet metadata of .*part-9\.parquet"):
        manifests.build(root, None, "image", "text", 0.0, 0)
