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
import pyarrow.csv as pcsv
import pyarrow.fs as pafs
import pyarrow.json as pjson
import pyarrow.parquet as pq

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


def _folder_rows(batch: pa.Table | pa.RecordBatch, meta: str, image_column: str, caption_column: str) -> pa.Table:
    """Metadata rows → image structs holding the path (next to the metadata file) and no bytes yet."""
    if "file_name" not in batch.schema.names:
        raise KeyError(f"column 'file_name' not in image-folder metadata {meta}; available: {batch.schema.names}")
    names = batch.column("file_name").to_pylist()
    paths = [posixpath.join(posixpath.dirname(meta), str(n)) if n else None for n in names]
    has_caption = caption_column in batch.schema.names
    caption = batch.column(caption_column) if has_caption else pa.nulls(len(batch), pa.string())
    return pa.table({
        image_column: pa.array([{"bytes": None, "path": p} for p in paths], type=IMAGE_TYPE),
        caption_column: caption.cast(pa.string()),
        FILE_COLUMN: pa.array([meta] * len(batch), type=pa.string()),
    })


def _metadata_batches(fs: pafs.FileSystem, path: str) -> Iterator[pa.RecordBatch]:
    """A metadata.jsonl / metadata.csv file in record batches, streamed (never whole in memory)."""
    with fs.open_input_stream(path) as f:
        if path.lower().endswith(".csv"):
            reader = pcsv.open_csv(f, convert_options=pcsv.ConvertOptions(column_types={"file_name": pa.string()}))
        else:
            reader = pjson.open_json(f)
        yield from reader


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


_FOOTERS: dict[tuple[str, str], pq.FileMetaData] = {}  # this process's parquet footers: read once per file


def _row_group(fs: pafs.FileSystem, path: str, group: int, columns: list[str] | None = None) -> pa.Table:
    """One row group; the file's footer is read once per process, not once per read task."""
    key = (fs.type_name, path)
    with fs.open_input_file(path) as f:
        reader = pq.ParquetFile(f, metadata=_FOOTERS.get(key))
        if len(_FOOTERS) > 4096:  # a long run over many files: forget the oldest
            _FOOTERS.pop(next(iter(_FOOTERS)))
        _FOOTERS[key] = reader.metadata
        return reader.read_row_group(group, columns=columns)


def _read_parquet_rows(fs: pafs.FileSystem, path: str, group: int, rows: list[int], image_column: str,
                       caption_column: str) -> pa.Table:
    table = _row_group(fs, path, group, [image_column, caption_column])
    table = table.take(pa.array(rows, type=pa.int64()))
    return table.append_column(FILE_COLUMN, pa.array([path] * len(rows), type=pa.string()))


def read_unit_rows(fs: pafs.FileSystem, fmt: str, path: str, part: int, rows: list[int], image_column: str,
                   caption_column: str) -> pa.Table:
    """Rows ``rows`` of one unit as (image, caption, ``_file``); only that unit's bytes are read."""
    if fmt == "webdataset":
        return _read_tar(fs, path, rows, image_column, caption_column)
    if fmt == "imagefolder":  # the listing: its rows already hold (image struct with a path, caption, _file)
        return _row_group(fs, path, part).take(pa.array(rows, type=pa.int64()))
    table = _read_parquet_rows(fs, path, part, rows, image_column, caption_column)
    return table.set_column(0, image_column, image_struct(table[image_column]))


def image_struct(column: pa.ChunkedArray | pa.Array) -> pa.StructArray:
    """An HF image struct, a binary column or a path column → struct {bytes, path}, so units concatenate."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
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
    metadata file. Streamed file by file through this process; returns the listing file (a path in ``out_dir``'s
    filesystem)."""
    out_fs, out_path = storage.filesystem(out_dir)
    out_fs.create_dir(out_path, recursive=True)
    target = f"{out_path}/listing.parquet"
    schema = pa.schema([(image_column, IMAGE_TYPE), (caption_column, pa.string()), (FILE_COLUMN, pa.string())])
    with out_fs.open_output_stream(target) as f, pq.ParquetWriter(f, schema) as writer:
        pending: list[pa.Table] = []
        for meta in src.files:
            for batch in _metadata_batches(src.filesystem, meta):
                pending.append(_folder_rows(batch, meta, image_column, caption_column).cast(schema))
                if sum(len(t) for t in pending) >= LISTING_ROWS:
                    table = pa.concat_tables(pending)
                    writer.write_table(table, row_group_size=LISTING_ROWS)
                    pending = []
        if pending:
            writer.write_table(pa.concat_tables(pending), row_group_size=LISTING_ROWS)
    return [target]
