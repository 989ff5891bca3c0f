"""Dataset sources → one row shape: ``image`` (struct {bytes, path}), caption, ``_file``.

Formats: HF-style parquet (file, directory or glob; image as a struct or a binary column), image folders with a
``metadata.jsonl`` / ``metadata.csv`` (``file_name`` + caption column), WebDataset tar shards (image + ``.txt`` or
``.json`` caption). Local paths and s3:// / gs:// URIs all go through a pyarrow filesystem that is handed to Ray
explicitly (see ``raydiff.storage.filesystem``).

Image-folder rows carry only the image's path; its bytes are read by the preprocessing tasks, so start-up never
downloads images and a missing file is a counted, skippable row like any other bad image.
"""

from __future__ import annotations

import fnmatch
import json
import posixpath
import re
import tarfile
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
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


def resolve(source: str, fmt: str | None = None, filesystem: pafs.FileSystem | None = None) -> Source:
    """The source's files and format; ``filesystem`` replaces the one its URI names (same paths inside)."""
    fs, path = storage.filesystem(source)
    fs = filesystem or fs
    files = _list_files(fs, path)
    fmt = fmt or detect_format(files)
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; use one of {list(FORMATS)}")
    wanted = {"parquet": (".parquet",), "webdataset": (".tar",), "imagefolder": METADATA_FILES}[fmt]
    picked = [f for f in files if posixpath.basename(f).lower().endswith(wanted)]
    if not picked:
        raise FileNotFoundError(f"no {' / '.join(wanted)} files in {source!r} (format {fmt})")
    return Source(fs, picked, fmt)


def _check_columns(ds: ray.data.Dataset, wanted: list[str], what: str) -> None:
    names = ds.schema().names
    missing = [c for c in wanted if c not in names]
    if missing:
        raise KeyError(f"column(s) {missing} not in {what}; available: {names}")


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


def _wds_rows(samples: list[dict], image_column: str, caption_column: str) -> pa.Table:
    """Samples (member bytes by extension, ``__key__``, ``__url__``) → image struct, caption, file label."""
    images, captions, files = [], [], []
    for sample in samples:
        data = next((sample[e] for e in IMAGE_EXTENSIONS if isinstance(sample.get(e), bytes)), None)
        label = f"{sample.get('__url__')}#{sample.get('__key__')}"
        images.append({"bytes": data, "path": label})
        captions.append(_wds_caption(sample, caption_column))
        files.append(sample.get("__url__"))
    return pa.table({image_column: pa.array(images, type=IMAGE_TYPE),
                     caption_column: pa.array(captions, type=pa.string()),
                     FILE_COLUMN: pa.array(files, type=pa.string())})


# ---------------------------------------------------------------- units: what a read task reads whole
#
# A unit is the smallest piece of the source a reader can fetch on its own: a parquet row group, a WebDataset tar
# shard, or a row group of an image folder's listing (its metadata files re-laid out once, see ``write_listing``).
# Start-up learns each unit's row count from metadata only (footers, tar headers); the stream then reads every
# unit once per epoch in total (raydiff.data.stream).

LISTING_ROWS = 4096  # rows per row group of an image folder's listing: its read unit


def parquet_units(fs: pafs.FileSystem, path: str) -> list[int]:
    """Rows per row group, from the footer."""
    with fs.open_input_file(path) as f:
        meta = pq.ParquetFile(f).metadata
        return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


def parquet_columns(fs: pafs.FileSystem, path: str) -> list[str]:
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).schema_arrow.names


_WDS_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # WebDataset's sample key: the name up to its first dot


def _tar_members(fileobj) -> Iterator[tuple[str, str, tarfile.TarInfo, tarfile.TarFile]]:
    """(key, extension, member, tar) of each file member, in archive order."""
    with tarfile.open(fileobj=fileobj, mode="r:") as tar:
        for info in tar:
            match = _WDS_KEY.match(info.name) if info.isfile() else None
            if match:
                yield match.group(1), match.group(2).lower(), info, tar


def tar_samples(fs: pafs.FileSystem, path: str) -> int:
    """Samples in a tar shard, from its headers: a seekable read skips over every member's data."""
    with fs.open_input_file(path) as f:
        keys = [key for key, *_ in _tar_members(f)]
    return sum(1 for i, k in enumerate(keys) if i == 0 or k != keys[i - 1])


def _read_tar(fs: pafs.FileSystem, path: str, rows: list[int], image_column: str,
              caption_column: str) -> pa.Table:
    """Samples ``rows`` (indexes in archive order) of one shard; members of other samples are skipped unread."""
    wanted = set(rows)
    samples: dict[int, dict] = {}
    index, last = -1, None
    with fs.open_input_file(path) as f:
        for key, ext, info, tar in _tar_members(f):
            if key != last:
                index, last = index + 1, key
            if index in wanted:
                sample = samples.setdefault(index, {"__key__": key, "__url__": path})
                sample[ext] = tar.extractfile(info).read()
    return _wds_rows([samples.get(r, {"__url__": path}) for r in rows], image_column, caption_column)


def _read_parquet_rows(fs: pafs.FileSystem, path: str, group: int, rows: list[int], image_column: str,
                       caption_column: str) -> pa.Table:
    with fs.open_input_file(path) as f:
        table = pq.ParquetFile(f).read_row_group(group, columns=[image_column, caption_column])
    table = table.take(pa.array(rows, type=pa.int64()))
    return table.append_column(FILE_COLUMN, pa.array([path] * len(rows), type=pa.string()))


def read_unit_rows(fs: pafs.FileSystem, fmt: str, path: str, part: int, rows: list[int], image_column: str,
                   caption_column: str) -> pa.Table:
    """Rows ``rows`` of one unit as (image, caption, ``_file``); only that unit's bytes are read."""
    if fmt == "webdataset":
        return _read_tar(fs, path, rows, image_column, caption_column)
    if fmt == "imagefolder":  # the listing: its rows already hold (image struct with a path, caption, _file)
        with fs.open_input_file(path) as f:
            return pq.ParquetFile(f).read_row_group(part).take(pa.array(rows, type=pa.int64()))
    table = _read_parquet_rows(fs, path, part, rows, image_column, caption_column)
    return table.set_column(0, image_column, _as_image_struct(table[image_column]))


def _as_image_struct(column: pa.ChunkedArray) -> pa.Array:
    """An HF image struct, a binary column or a path column → struct {bytes, path}, so units concatenate."""
    arr = column.combine_chunks()
    if pa.types.is_struct(arr.type):
        names = {arr.type.field(i).name for i in range(arr.type.num_fields)}
        data = pc.struct_field(arr, "bytes") if "bytes" in names else pa.nulls(len(arr), pa.binary())
        path = pc.struct_field(arr, "path") if "path" in names else pa.nulls(len(arr), pa.string())
    elif pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type):
        data, path = arr, pa.nulls(len(arr), pa.string())
    elif pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        data, path = pa.nulls(len(arr), pa.binary()), arr
    else:
        raise TypeError(f"unsupported image column type {arr.type} (want struct<bytes, path>, binary or string)")
    return pa.StructArray.from_arrays([data.cast(pa.binary()), path.cast(pa.string())], fields=list(IMAGE_TYPE))


def write_listing(src: Source, image_column: str, caption_column: str, out_dir: str) -> list[str]:
    """An image folder's metadata files re-laid out once as parquet (image path, caption, metadata file) in row
    groups of LISTING_ROWS: a read task then reads its rows' listing group and their images, never a whole
    metadata file. Streams through the driver in batches; returns the listing files (paths in ``out_fs``)."""
    out_fs, out_path = storage.filesystem(out_dir)
    out_fs.create_dir(out_path, recursive=True)
    target = f"{out_path}/listing.parquet"
    ds = read_imagefolder(src, image_column, caption_column)
    schema = pa.schema([(image_column, IMAGE_TYPE), (caption_column, pa.string()), (FILE_COLUMN, pa.string())])
    with out_fs.open_output_stream(target) as f, pq.ParquetWriter(f, schema) as writer:
        for batch in ds.iter_batches(batch_size=LISTING_ROWS, batch_format="pyarrow"):
            writer.write_table(batch.select(schema.names).cast(schema), row_group_size=LISTING_ROWS)
    return [target]
