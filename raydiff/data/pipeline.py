"""Ray Data pipeline: a dataset source (see ``sources``) → SDXL training rows (pixels, input_ids, input_ids_2,
time_ids).

Start-up reads metadata only (``build_manifest``: listing, parquet footers, tar headers): the read units, their row
counts and the held-out validation rows (``raydiff.data.manifest``). Training reads each worker's seeded stream
(``raydiff.data.loader``; the arithmetic is in ``raydiff.data.stream``): read chunks of whole units, each read once
per epoch across workers, then preprocessed by Ray Data tasks in the stream's order. One Ray Data execution serves a
worker's whole run, so there is no start-up at an epoch boundary.

Seeding: each sample's crop/flip rng is ``SeedSequence([seed, epoch, crc32(image bytes)])`` — identical on any
worker, batch size or read order.
"""

from __future__ import annotations

import functools
import logging
import os
import pickle
import tarfile
from dataclasses import dataclass, replace
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import ray

from raydiff import tokens
from raydiff.config import DataSection
from raydiff.data import manifest as manifests
from raydiff.data import sources, stats
from raydiff.data.buckets import BUCKET_COLUMN, closest_bucket, parse_buckets
from raydiff.data.manifest import Manifest
from raydiff.data.sources import FILE_COLUMN
from raydiff.data.stream import (
    EPOCH_COLUMN,
    ORDER_COLUMN,
    ROW_COLUMN,
    SHUFFLE_WINDOW,
    EpochShare,
    StreamPosition,
    Units,
    epoch_of,
    epoch_share,
)
from raydiff.data.transforms import (
    ImageDecodeError,
    apply_crop,
    decode_image,
    flip_pair,
    plan_crop,
    sample_key,
    sample_rng,
    time_ids,
)

logger = logging.getLogger(__name__)

OUTPUT_COLUMNS = ("pixels", "input_ids", "input_ids_2", "time_ids")
KEY_COLUMN = "_key"  # crc32 sample key (int64)
STREAM_COLUMNS = (ORDER_COLUMN, EPOCH_COLUMN, ROW_COLUMN)  # a row's place in the training stream: not model inputs
FLIPPED_SUFFIX = "_flipped"  # a cache row's columns for the mirrored crop
PREPROCESS_TASKS = 2  # concurrent preprocessing tasks per training worker's stream (and per split)
MAX_LOGGED_SKIPS = 5  # per preprocessing process and settings; every skip is counted, only the first few are logged


@dataclass
class DataSpec:
    """A run's data: the config's data section, passed as it is (raydiff.config validates it; the driver sets
    ``data.source`` to the demo dataset's path when unset), and what the run adds once: the seed, the counter actor,
    a precompute's encoder or cache."""

    data: DataSection
    seed: int = 0  # train.seed
    stats_actor: str | None = None  # name of the run's DataStats actor (raydiff.data.stats.create)
    batch_size: int = 32  # rows per preprocessing call
    concurrency: int = PREPROCESS_TASKS  # concurrent preprocessing tasks
    encoder: dict | None = None  # streamed precompute: a raydiff.data.precompute.EncoderSpec for each epoch stream
    cache: str | None = None  # cached precompute: the cache's data directory, read instead of the source

    @property
    def buckets(self) -> list[tuple[int, int]]:
        """(width, height) aspect-ratio buckets of ``data.buckets``; [] = square crops."""
        return parse_buckets(self.data.buckets, self.data.resolution)


class RowError(ValueError):
    """A row could not be turned into a training sample (raised when on_error='raise')."""


# ---------------------------------------------------------------- row helpers (pure)


def image_parts(column: pa.ChunkedArray | pa.Array) -> tuple[list[bytes | None], list[str | None]]:
    """(bytes, path) per row from an HF image struct {bytes, path}, a binary column, or a path column."""
    arr = sources.image_struct(column)
    return arr.field("bytes").to_pylist(), arr.field("path").to_pylist()


def row_keys(table: pa.Table, image_column: str) -> np.ndarray:
    """crc32 sample keys (int64) of a batch; reuses the key column when an earlier stage added it."""
    if KEY_COLUMN in table.column_names:
        return table[KEY_COLUMN].to_numpy()
    data, paths = image_parts(table[image_column])
    return np.array([sample_key(d, p) for d, p in zip(data, paths)], dtype=np.int64)


def describe_row(row: int, key: int, path: str | None, file: str | None) -> str:
    place = f"source row {row}" if row >= 0 else "row"
    return f"{place} key={key:#010x} image_path={path!r} file={file!r}"


def load_bytes(data: bytes | None, path: str | None, filesystem: Any = None) -> bytes:
    """The row's image bytes; without bytes, reads ``path`` through ``filesystem`` (image folders) or, with no
    filesystem, from local disk when that file exists (parquet rows whose struct holds only a path)."""
    if data:
        return data
    if path and filesystem is not None:
        with filesystem.open_input_file(path) as f:
            return f.read()
    if path and os.path.isfile(path):
        with open(path, "rb") as f:
            return f.read()
    raise ImageDecodeError("row has no image bytes and its path is not a readable file")


def caption_text(value: Any) -> str:
    """Null → "" (an unconditional sample); a list of captions → its first; anything else → str()."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return caption_text(value[0]) if value else ""
    return value if isinstance(value, str) else str(value)


def drop_caption(seed: int, epoch: int, key: int, p: float) -> bool:
    """Whether this sample trains on the empty prompt this epoch: seeded like the crop, on its own stream."""
    if p <= 0:
        return False
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), int(key), 0xCAF]))
    return bool(rng.random() < p)


# ---------------------------------------------------------------- the source's manifest and read chunks


def build_manifest(spec: DataSpec, workdir: str | None = None, filesystem: Any = None) -> Manifest:
    """Units, row counts and held-out rows of ``data.source``, from metadata (raydiff.data.manifest)."""
    d = spec.data
    return manifests.build(d.source, d.format, d.image_column, d.caption_column, d.val_fraction, d.val_max_samples,
                           workdir, filesystem)


def read_chunk(batch: pa.Table, *, manifest: Manifest, stats_actor: str | None = None) -> pa.Table:
    """A Ray Data task: one read chunk ({epoch, first local row, global rows}) → its rows in stream order, each
    with its local row, epoch and identity. Reads each unit the chunk touches once. Rows the run already found
    unusable are left out here, before any decode: preprocessing would drop them, so the stream is the same."""
    (epoch,), (first,), (rows,) = (batch[c].to_pylist() for c in ("epoch", "first", "rows"))
    g = np.asarray(rows, dtype=np.int64)
    orders = first + np.arange(len(g))
    usable = ~np.isin(g, stats.known_skipped(stats_actor, g))
    if usable.any():  # (a chunk of known-bad rows only is read as it is: an empty block would need a schema)
        g, orders = g[usable], orders[usable]
    unit, row = manifest.locate(g)
    parts, places = [], []
    for u in np.unique(unit):
        at = np.flatnonzero(unit == u)
        path, part = manifest.files[int(manifest.unit_file[u])], int(manifest.unit_part[u])
        try:
            parts.append(sources.read_unit_rows(manifest.unit_filesystem, manifest.format, path, part,
                                                row[at].tolist(), manifest.image_column, manifest.caption_column))
        except (OSError, ValueError, tarfile.TarError) as err:  # the file changed or broke after start-up
            raise RuntimeError(f"cannot read {manifest.format} unit {part} of {path}: {err}") from err
        places.append(at)
    table = pa.concat_tables(parts, promote_options="permissive") if len(parts) > 1 else parts[0]
    table = table.take(pa.array(np.argsort(np.concatenate(places), kind="stable"), type=pa.int64()))
    return (table.append_column(ORDER_COLUMN, pa.array(orders, type=pa.int64()))
            .append_column(EPOCH_COLUMN, pa.array(np.full(len(g), epoch), type=pa.int64()))
            .append_column(ROW_COLUMN, pa.array(g, type=pa.int64())))


def chunk_items(chunks: list[dict]) -> ray.data.Dataset:
    """The read chunks as a dataset of one chunk per block, so each becomes one read task, in chunk order."""
    items = [{"epoch": int(c["epoch"]), "first": int(c["first"]), "rows": np.asarray(c["rows"]).tolist()}
             for c in chunks]
    ds = ray.data.from_items(items or [{"epoch": 0, "first": 0, "rows": [0]}], override_num_blocks=max(len(items), 1))
    return ds if items else ds.limit(0)  # an empty split (no held-out rows): no rows, the same stages


def chunk_dataset(manifest: Manifest, chunks: list[dict], stats_actor: str | None = None) -> ray.data.Dataset:
    """Raw source rows of these read chunks, one read task per chunk, in chunk order."""
    return chunk_items(chunks).map_batches(read_chunk, batch_size=1, batch_format="pyarrow",
                                           fn_kwargs={"manifest": manifest, "stats_actor": stats_actor})


def unit_chunks(manifest: Manifest, rows: np.ndarray, epoch: int) -> list[dict]:
    """Global ``rows`` in listing order, one chunk per unit (validation, cache builds, previews)."""
    unit, _ = manifest.locate(rows)
    cuts = np.flatnonzero(np.diff(unit)) + 1
    return [{"epoch": epoch, "first": int(part[0]) if len(part) else 0, "rows": part}
            for part in np.split(rows, cuts) if len(part)]


def training_rows(manifest: Manifest) -> np.ndarray:
    return manifest.global_rows(np.arange(manifest.num_train))


class Preprocessor:
    """Callable class for ``map_batches``: decode → plan/apply crop → time_ids → tokenize with both tokenizers.
    Crops, flips and caption dropout are seeded by (seed, ``epoch``, sample)."""

    def __init__(self, tokenizer_path: str, data: DataSection | None = None, *, seed: int = 0, epoch: int = 0,
                 filesystem: Any = None, stats_actor: str | None = None, cache_rows: bool = False) -> None:
        """``data``: the config's data section (columns, resolution, crops, flips, buckets, on_error, caption
        dropout; default: its defaults). ``cache_rows``: rows for a precompute cache — both flips of the crop
        (``*_flipped`` columns), no caption dropout (drawn per epoch when the cache is read), and the sample's key
        and identity."""
        d = data or DataSection()
        self.tokenizers = _tokenizers(tokenizer_path)
        self.image_column, self.caption_column = d.image_column, d.caption_column
        self.resolution, self.center_crop, self.random_flip = d.resolution, d.center_crop, d.random_flip
        self.seed, self.epoch, self.on_error = seed, epoch, d.on_error
        self.caption_dropout = 0.0 if cache_rows else d.caption_dropout
        self.both_flips, self.identities = cache_rows and d.random_flip, cache_rows
        self.max_aspect_ratio, self.filesystem, self.stats_actor = d.max_aspect_ratio, filesystem, stats_actor
        self.buckets = parse_buckets(d.buckets, d.resolution)
        self.num_skipped = 0
        self._row = -1  # the row being preprocessed (its global row in the source; -1 when unknown)
        self._counts: dict[str, list[int]] = {}  # this batch's counted rows, flushed to the stats actor per batch
        self._examples: list[dict] = []  # this batch's skipped rows

    def _sample(self, data: bytes | None, path: str | None, key: int, epoch: int):
        """([(pixels, time_ids)] — the drawn crop, or both flips of it for a cache —, bucket index)."""
        img = decode_image(load_bytes(data, path, self.filesystem), self.max_aspect_ratio)
        w, h = img.size
        bucket = closest_bucket(w, h, self.buckets) if self.buckets else -1
        size = self.buckets[bucket] if self.buckets else self.resolution
        plan = plan_crop(w, h, size, self.center_crop, self.random_flip, sample_rng(self.seed, epoch, key))
        if plan.resized_w > w:
            self._count("data_upscaled")
        plans = flip_pair(plan, size) if self.both_flips else (plan,)
        return [(apply_crop(img, p, size), time_ids(h, w, p, size)) for p in plans], bucket

    def _skip_or_raise(self, what: str, err: Exception) -> None:
        if self.on_error == "raise":
            raise RowError(f"cannot preprocess {what}: {err}") from err
        self.num_skipped += 1
        self._count("data_skipped")
        if self.num_skipped <= MAX_LOGGED_SKIPS:
            logger.warning("skipping %s: %s (%d skipped by this process)", what, err, self.num_skipped)
        self._examples.append({"row": self._row, "what": what, "reason": str(err)})

    def _count(self, name: str) -> None:
        self._counts.setdefault(name, []).append(self._row)

    def _flush_counts(self) -> None:
        stats.record(self.stats_actor, self._counts, self._examples)
        self._counts, self._examples = {}, []

    def _tokenize(self, captions: list[str]) -> tuple[np.ndarray, ...]:
        return tokens.tokenize(self.tokenizers, captions)

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        data, paths = image_parts(batch[self.image_column])
        captions = batch[self.caption_column].to_pylist()
        files = batch[FILE_COLUMN].to_pylist() if FILE_COLUMN in batch.column_names else [None] * len(data)
        keys = row_keys(batch, self.image_column)
        n = len(data)
        ids_in = batch[ROW_COLUMN].to_numpy() if ROW_COLUMN in batch.column_names else np.full(n, -1, np.int64)
        epochs = batch[EPOCH_COLUMN].to_numpy() if EPOCH_COLUMN in batch.column_names else np.full(n, self.epoch)
        variants: list[list[tuple[np.ndarray, tuple]]] = []
        kept, buckets, rows = [], [], []
        for i, (d, p, f, k, c) in enumerate(zip(data, paths, files, keys, captions)):
            self._row, epoch = int(ids_in[i]), int(epochs[i])
            try:
                crops, b = self._sample(d, p, int(k), epoch)
            except (ValueError, OSError) as e:  # ImageDecodeError is a ValueError; OSError: unreadable path
                self._skip_or_raise(describe_row(self._row, int(k), p, f), e)
                continue
            rows.append(i)
            variants.append(crops)
            buckets.append(b)
            if c is None:
                self._count("data_null_captions")
            dropped = drop_caption(self.seed, epoch, int(k), self.caption_dropout)
            kept.append("" if dropped else caption_text(c))
        self._flush_counts()
        ids, ids_2 = self._tokenize(kept)
        out = {"input_ids": ids, "input_ids_2": ids_2}
        for v, suffix in enumerate(("", FLIPPED_SUFFIX)[: 2 if self.both_flips else 1]):
            out["pixels" + suffix] = self._pixels([crops[v][0] for crops in variants])
            out["time_ids" + suffix] = np.asarray([crops[v][1] for crops in variants], dtype=np.float32).reshape(-1, 6)
        kept_rows = np.asarray(rows, dtype=np.int64)
        if self.buckets:  # batches are regrouped by this column on the training workers (stream.rebatch)
            out[BUCKET_COLUMN] = np.asarray(buckets, dtype=np.int64)
        # The stream's place, epoch and source row of each kept row (the row: data.record_rows and the cache).
        for column in (ORDER_COLUMN, EPOCH_COLUMN, ROW_COLUMN):
            if column in batch.column_names:
                out[column] = batch[column].to_numpy()[kept_rows]
        if self.identities:  # a cache row carries what the stream and the per-epoch draws need
            out[KEY_COLUMN] = keys[kept_rows]
            out[ROW_COLUMN] = ids_in[kept_rows]
        return out

    def _pixels(self, arrays: list[np.ndarray]) -> np.ndarray:
        r = self.resolution
        return _stack(arrays) if arrays else np.zeros((0, 3, r, r), dtype=np.uint8)


def _stack(arrays: list[np.ndarray]) -> np.ndarray:
    """One array when all shapes agree; else an object array, which Ray stores as a variable-shaped tensor."""
    if len({a.shape for a in arrays}) == 1:
        return np.stack(arrays)
    out = np.empty(len(arrays), dtype=object)
    out[:] = arrays
    return out


@functools.lru_cache(maxsize=4)
def _tokenizers(tokenizer_path: str) -> tuple:
    """This process's copy of both tokenizers of the model ``tokenizer_path`` names (raydiff.tokens)."""
    return tokens.load_tokenizers(tokenizer_path)


_PREPROCESSORS: dict[bytes, Preprocessor] = {}  # this process's, by pickled settings (one per epoch and split)


def _preprocess(batch: pa.Table, *, tokenizer_path: str, settings: dict) -> dict[str, np.ndarray]:
    """A Ray Data task: ``batch`` through this process's Preprocessor for these settings. Tasks run in Ray's warm
    worker processes, so an epoch's execution starts at once; an actor pool per epoch and worker had to be created
    (and import transformers) first: seconds at every epoch boundary, and a core-worker error line per actor."""
    key = pickle.dumps((tokenizer_path, sorted(settings.items())))
    if key not in _PREPROCESSORS:
        if len(_PREPROCESSORS) >= 8:  # a long run's past epochs
            _PREPROCESSORS.pop(next(iter(_PREPROCESSORS)))
        _PREPROCESSORS[key] = Preprocessor(tokenizer_path, **settings)
    return _PREPROCESSORS[key](batch)


def _preprocessed(ds: ray.data.Dataset, manifest: Manifest, spec: DataSpec, tokenizer_path: str,
                  epoch: int = 0, cache_rows: bool = False) -> ray.data.Dataset:
    return ds.map_batches(_preprocess, batch_size=spec.batch_size, batch_format="pyarrow",
                          compute=ray.data.TaskPoolStrategy(size=spec.concurrency),
                          fn_kwargs={"tokenizer_path": tokenizer_path,
                                     "settings": _settings(manifest, spec, epoch, cache_rows)})


def _settings(manifest: Manifest, spec: DataSpec, epoch: int = 0, cache_rows: bool = False) -> dict:
    return {
        "data": spec.data,
        "seed": spec.seed,
        "epoch": epoch,  # rows of the training stream carry their own (EPOCH_COLUMN)
        # Only image-folder rows are paths to read; parquet structs' paths are labels (or local files).
        "filesystem": manifest.filesystem if manifest.format == "imagefolder" else None,
        "stats_actor": spec.stats_actor,
        "cache_rows": cache_rows,
    }


def build_datasets(spec: DataSpec, tokenizer_path: str, epoch: int = 0,
                   manifest: Manifest | None = None) -> dict[str, ray.data.Dataset]:
    """{"train", "val"} datasets of preprocessed rows (OUTPUT_COLUMNS and the stream's bookkeeping columns).

    Builds the manifest now unless given (metadata only); everything else is lazy. Train reads every training row
    once in listing order with ``epoch``'s crops (previews, benchmarks, cache builds); training itself reads the
    seeded, resumable per-worker stream of ``planned_batches``. Val uses center crop, no flip, every caption and
    preserved order, so each evaluation sees identical inputs in identical order (Ray Train's DataConfig replaces
    a dataset's execution options: pass ``preserve_order=True`` for "val" there).
    """
    manifest = manifest or build_manifest(spec)
    out = {}
    for split, rows, split_spec, split_epoch in (("train", training_rows(manifest), spec, epoch),
                                                 ("val", manifest.val_rows, _held_out_spec(spec), 0)):
        ds = chunk_dataset(manifest, unit_chunks(manifest, rows, split_epoch), spec.stats_actor)
        out[split] = _preprocessed(ds, manifest, split_spec, tokenizer_path, split_epoch).drop_columns(
            list(STREAM_COLUMNS))
    out["val"].context.execution_options.preserve_order = True
    return out


def _held_out_spec(spec: DataSpec) -> DataSpec:
    """Validation inputs: center crop, no flip, every caption, one size."""
    return replace(spec, data=replace(spec.data, center_crop=True, random_flip=False, caption_dropout=0.0, buckets=[]))


def held_out_rows(spec: DataSpec, tokenizer_path: str, manifest: Manifest) -> list[dict[str, np.ndarray]]:
    """The rows of build_datasets' "val", in its order, read and preprocessed in this process: a few rows
    (data.val_max_samples) for which a Ray Data execution would first start and warm up task processes."""
    val = _held_out_spec(spec)
    settings = _settings(manifest, val)
    rows = []
    for chunk in unit_chunks(manifest, manifest.val_rows, 0):
        items = pa.table({"epoch": [0], "first": [chunk["first"]], "rows": [np.asarray(chunk["rows"]).tolist()]})
        table = read_chunk(items, manifest=manifest, stats_actor=spec.stats_actor)
        for start in range(0, table.num_rows, spec.batch_size):
            batch = _preprocess(table.slice(start, spec.batch_size), tokenizer_path=tokenizer_path, settings=settings)
            kept = {k: v for k, v in batch.items() if k not in STREAM_COLUMNS}
            rows += [{k: v[i] for k, v in kept.items()} for i in range(len(next(iter(kept.values()), [])))]
    return rows


def share_chunks(manifest: Manifest, share: EpochShare) -> list[dict]:
    """An epoch share's read chunks: {epoch, first local row, global rows}."""
    rows = manifest.global_rows(share.rows)
    bounds = np.concatenate([[0], np.cumsum(share.chunks)]).astype(np.int64)
    return [{"epoch": share.epoch, "first": share.first + int(a), "rows": rows[a:b]}
            for a, b in zip(bounds[:-1], bounds[1:])]


def stream_legs(manifest: Manifest, seed: int, pos: StreamPosition, rank: int, rows_per_leg: int,
                window: int = SHUFFLE_WINDOW) -> Iterator[list[dict]]:
    """Rank ``rank``'s read chunks from its row ``pos.consumed[rank]`` on, epoch after epoch, in legs of at least
    ``rows_per_leg`` rows (one Ray Data execution each). Ends only if the stream holds no row at all."""
    units = Units(manifest.unit_train_rows)
    n = units.total
    if n == 0:
        return
    j = pos.consumed[rank]
    epoch = epoch_of(n, pos, rank, j)
    while True:
        chunks, planned, empty_epochs = [], 0, 0
        while planned < rows_per_leg:
            share = epoch_share(units, seed, pos, rank, epoch, window).from_row(j)
            chunks += share_chunks(manifest, share)
            planned += len(share.rows)
            empty_epochs = 0 if len(share.rows) else empty_epochs + 1
            if empty_epochs > pos.world * pos.batch:  # cannot happen while n > 0; a guard against a silent spin
                raise RuntimeError(f"rank {rank} has no rows in {empty_epochs} epochs of {n} training rows")
            j = max(j, share.end)
            epoch += 1
        yield chunks
