"""Dataset sources → one Ray dataset shape: ``image`` (struct {bytes, path}), caption, ``_file``.

Formats: HF-style parquet (file, directory or glob; image as a struct or a binary column), image folders with a
``metadata.jsonl`` / ``metadata.csv`` (``file_name`` + caption column), WebDataset tar shards (image + ``.txt`` or
``.json`` caption). Local paths and s3:// / gs:// URIs all go through a pyarrow filesystem that is handed to Ray
explicitly (see ``raydiff.storage.filesystem``).

Image-folder rows carry only the image's path; its bytes are read by the preprocessing actors, so listing and the
val-split pass never download images and a missing file is a counted, skippable row like any other bad image.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import posixpath
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import ray

from raydiff import storage

FORMATS = ("parquet", "imagefolder", "webdataset")
FILE_COLUMN = "_file"  # where a row came from, only to name bad rows in messages
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Source:
    filesystem: pafs.FileSystem
    files: list[str]  # paths inside ``filesystem``
    format: str


def _list_files(fs: pafs.FileSystem, path: str) -> list[str]:
    """The file itself, every file under a directory, or the files matching a glob (``**`` included)."""
    if _GLOB_CHARS & set(path):
        base = path[: min(path.index(c) for c in _GLOB_CHARS if c in path)].rsplit("/", 1)[0] or "/"
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        files = [i.path for i in infos if i.is_file and fnmatch.fnmatch(i.path, path)]
    else:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            files = [path]
        elif info.type == pafs.FileType.Directory:
            files = [i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if i.is_file]
        else:
            files = []
    # Hidden and underscore files (_SUCCESS, .crc, temp files of writers) are never data.
    files = [f for f in files if not posixpath.basename(f).startswith((".", "_"))]
    if not files:
        raise FileNotFoundError(f"data source {path!r} has no files")
    return sorted(files)


def detect_format(files: list[str]) -> str:
    names = [posixpath.basename(f).lower() for f in files]
    if any(n in METADATA_FILES for n in names):
        return "imagefolder"
    if any(n.endswith(".tar") for n in names):
        return "webdataset"
    if any(n.endswith(".parquet") for n in names):
        return "parquet"
    raise ValueError(f"cannot tell the format of {files[:3]}...: set data.format to one of {list(FORMATS)}")


def resolve(source: str, fmt: str | None = None) -> Source:
    fs, path = storage.filesystem(source)
    files = _list_files(fs, path)
    fmt = fmt or detect_format(files)
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; use one of {list(FORMATS)}")
    wanted = {"parquet": (".parquet",), "webdataset": (".tar",), "imagefolder": METADATA_FILES}[fmt]
    picked = [f for f in files if posixpath.basename(f).lower().endswith(wanted)]
    if not picked:
        raise FileNotFoundError(f"no {' / '.join(wanted)} files in {source!r} (format {fmt})")
    return Source(fs, picked, fmt)


@contextlib.contextmanager
def _parquet_v1() -> Iterator[None]:
    """Use Ray's V1 parquet reader, local or remote.

    Ray Data 2.60's default (V2) reader starts 32 footer-reading actors for every pass over the data; here that
    costs seconds and GBs of worker RAM per epoch. V1 reads the footers of the (already listed) files on the
    driver instead, which suits datasets of up to thousands of files. The flag is restored after the lazy read.
    """
    ctx = ray.data.DataContext.get_current()
    if not hasattr(ctx, "use_datasource_v2"):
        yield
        return
    previous = ctx.use_datasource_v2
    ctx.use_datasource_v2 = False
    try:
        yield
    finally:
        ctx.use_datasource_v2 = previous


def _check_columns(ds: ray.data.Dataset, wanted: list[str], what: str) -> None:
    names = ds.schema().names
    missing = [c for c in wanted if c not in names]
    if missing:
        raise KeyError(f"column(s) {missing} not in {what}; available: {names}")


def read_parquet(src: Source, image_column: str, caption_column: str) -> ray.data.Dataset:
    with _parquet_v1():
        ds = ray.data.read_parquet(src.files, filesystem=src.filesystem, include_paths=True)
    _check_columns(ds, [image_column, caption_column], f"parquet files {src.files[:3]}")
    # include_paths adds "path" unless the data already has one; either way it only labels rows in messages.
    return ds.select_columns([image_column, caption_column, "path"]).rename_columns({"path": FILE_COLUMN})


def _folder_rows(batch: pa.Table, *, image_column: str, caption_column: str) -> pa.Table:
    """Metadata rows → image structs holding the path (next to the metadata file) and no bytes yet."""
    names = batch["file_name"].to_pylist()
    meta = batch["path"].to_pylist()
    paths = [posixpath.join(posixpath.dirname(m), n) if n else None for m, n in zip(meta, names)]
    caption = batch[caption_column] if caption_column in batch.column_names else pa.nulls(len(batch), pa.string())
    return pa.table({
        image_column: pa.array([{"bytes": None, "path": p} for p in paths], type=IMAGE_TYPE),
        caption_column: caption.cast(pa.string()),
        FILE_COLUMN: pa.array(meta, type=pa.string()),
    })


def read_imagefolder(src: Source, image_column: str, caption_column: str) -> ray.data.Dataset:
    parts = []
    for ext, reader in (("metadata.jsonl", ray.data.read_json), ("metadata.csv", ray.data.read_csv)):
        files = [f for f in src.files if f.lower().endswith(ext)]
        if files:
            ds = reader(files, filesystem=src.filesystem, include_paths=True)
            _check_columns(ds, ["file_name"], f"{ext} files {files[:3]}")
            parts.append(ds)
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    return ds.map_batches(_folder_rows, batch_format="pyarrow", batch_size=None,
                          fn_kwargs={"image_column": image_column, "caption_column": caption_column})


def _wds_caption(sample: dict, caption_column: str) -> str | None:
    text = sample.get("txt")
    if isinstance(text, bytes):
        return text.decode("utf-8", errors="replace").strip()
    raw = sample.get("json")
    if isinstance(raw, bytes):
        try:
            value = json.loads(raw)
        except ValueError:
            return None
        return value.get(caption_column) if isinstance(value, dict) else None
    return None


def _wds_rows(batch, *, image_column: str, caption_column: str) -> pa.Table:
    """Grouped tar members (one column per extension) → image struct, caption, file label."""
    images, captions, files = [], [], []
    for sample in batch.to_dict("records"):
        sample = {k: v for k, v in sample.items() if isinstance(v, (bytes, str))}
        data = next((sample[e] for e in IMAGE_EXTENSIONS if isinstance(sample.get(e), bytes)), None)
        label = f"{sample.get('__url__')}#{sample.get('__key__')}"
        images.append({"bytes": data, "path": label})
        captions.append(_wds_caption(sample, caption_column))
        files.append(sample.get("__url__"))
    return pa.table({image_column: pa.array(images, type=IMAGE_TYPE),
                     caption_column: pa.array(captions, type=pa.string()),
                     FILE_COLUMN: pa.array(files, type=pa.string())})


def read_webdataset(src: Source, image_column: str, caption_column: str) -> ray.data.Dataset:
    # decoder=None keeps raw member bytes: decoding is the preprocessor's job (and where bad images are counted).
    ds = ray.data.read_webdataset(src.files, filesystem=src.filesystem, decoder=None)
    # batch_size=None: one block at a time, so shards with different member extensions are never concatenated.
    return ds.map_batches(_wds_rows, batch_format="pandas", batch_size=None,
                          fn_kwargs={"image_column": image_column, "caption_column": caption_column})


READERS = {"parquet": read_parquet, "imagefolder": read_imagefolder, "webdataset": read_webdataset}


def read(source: str, fmt: str | None, image_column: str, caption_column: str) -> tuple[ray.data.Dataset, Source]:
    src = resolve(source, fmt)
    return READERS[src.format](src, image_column, caption_column), src
