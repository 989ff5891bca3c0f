"""Ray Data pipeline: a dataset source (see ``sources``) → SDXL training rows (pixels, input_ids, input_ids_2, time_ids).

Split: a row is in "val" iff crc32(image bytes) <= a cutoff; the cutoff is the largest hash that keeps at most
``val_max_samples`` rows among those with hash < ``val_fraction``·2³². It depends only on the data (not on the
seed or row order), so every trial of a sweep validates on the same images, and duplicates never straddle the split.

Seeding: each sample's crop/flip rng is ``SeedSequence([seed, epoch, crc32(image bytes)])`` — identical on any
worker, batch size or read order.

Training order: each worker reads its own seeded stream (``planned_train_dataset`` / ``planned_batches``; the
arithmetic is in ``raydiff.data.stream``), found from one index pass over the source (``index_source``).
"""

from __future__ import annotations

import bisect
import functools
import logging
import os
import pickle
from dataclasses import dataclass, replace
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from raydiff.data import sources, stats
from raydiff.data.buckets import BUCKET_COLUMN, closest_bucket
from raydiff.data.sources import FILE_COLUMN
from raydiff.data.stream import (
    ORDER_COLUMN,
    UID_COLUMN,
    EpochShare,
    StreamPosition,
    assign_rows,
    epoch_of,
    epoch_share,
    rebatch,
    sample_uid,
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
FLIPPED_SUFFIX = "_flipped"  # a cache row's columns for the mirrored crop
_HASH_SPACE = 2**32
PREPROCESS_TASKS = 2  # concurrent preprocessing tasks per training worker's stream (and per split)
MAX_LOGGED_SKIPS = 5  # per preprocessing process and settings; every skip is counted, only the first few are logged


@dataclass
class DataSpec:
    """What to read and how to preprocess it; filled by the caller from the config."""

    source: str  # local file / dir / glob, or an s3:// / gs:// URI
    format: str | None = None  # parquet | imagefolder | webdataset; None: detected from the files
    image_column: str = "image"
    caption_column: str = "text"
    resolution: int = 64
    center_crop: bool = False
    random_flip: bool = True
    val_fraction: float = 0.05
    val_max_samples: int = 16
    seed: int = 0
    on_error: str = "skip"  # skip | raise
    caption_dropout: float = 0.0  # train split only: probability of the empty caption
    max_aspect_ratio: float = 4.0  # long/short side above this: skipped
    stats_actor: str | None = None  # name of the run's DataStats actor (raydiff.data.stats.create)
    buckets: tuple[tuple[int, int], ...] = ()  # (width, height) aspect-ratio buckets; () = square crops
    batch_size: int = 32  # rows per preprocessing call
    concurrency: int = PREPROCESS_TASKS  # concurrent preprocessing tasks
    encoder: dict | None = None  # streamed precompute: a raydiff.data.precompute.EncoderSpec for each epoch stream
    cache: str | None = None  # cached precompute: the cache's data directory, read instead of the source

    def __post_init__(self) -> None:
        if self.on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {self.on_error!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.resolution <= 0 or self.batch_size <= 0 or self.val_max_samples < 0:
            raise ValueError("resolution and batch_size must be > 0, val_max_samples >= 0")
        if self.max_aspect_ratio < 1:
            raise ValueError(f"max_aspect_ratio must be >= 1, got {self.max_aspect_ratio}")


class RowError(ValueError):
    """A row could not be turned into a training sample (raised when on_error='raise')."""


# ---------------------------------------------------------------- reading


def read_source(spec: DataSpec) -> ray.data.Dataset:
    """Read the source as rows of (image column, caption column, source file label)."""
    return sources.read(spec.source, spec.format, spec.image_column, spec.caption_column)[0]


# ---------------------------------------------------------------- row helpers (pure)


def image_parts(column: pa.ChunkedArray | pa.Array) -> tuple[list[bytes | None], list[str | None]]:
    """(bytes, path) per row from an HF image struct {bytes, path}, a binary column, or a path column."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(arr)
    if pa.types.is_struct(arr.type):
        fields = {arr.type.field(i).name for i in range(arr.type.num_fields)}
        data = pc.struct_field(arr, "bytes").to_pylist() if "bytes" in fields else [None] * n
        paths = pc.struct_field(arr, "path").to_pylist() if "path" in fields else [None] * n
        return data, paths
    if pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type):
        return arr.to_pylist(), [None] * n
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        return [None] * n, arr.to_pylist()
    raise TypeError(f"unsupported image column type {arr.type} (want struct<bytes, path>, binary or string)")


def row_keys(table: pa.Table, image_column: str) -> np.ndarray:
    """crc32 sample keys (int64) of a batch; reuses the key column when an earlier stage added it."""
    if KEY_COLUMN in table.column_names:
        return table[KEY_COLUMN].to_numpy()
    data, paths = image_parts(table[image_column])
    return np.array([sample_key(d, p) for d, p in zip(data, paths)], dtype=np.int64)


def describe_row(key: int, path: str | None, file: str | None) -> str:
    return f"row key={key:#010x} image_path={path!r} file={file!r}"


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


def val_cutoff(candidate_keys: list[int], max_samples: int) -> int:
    """Largest key k such that at most ``max_samples`` candidates are <= k (-1: empty val).

    Cutting between distinct keys keeps duplicate images on one side of the split.
    """
    keys = sorted(candidate_keys)
    if max_samples <= 0 or not keys:
        return -1
    if len(keys) <= max_samples:
        return keys[-1]
    first_over = bisect.bisect_left(keys, keys[max_samples])
    return keys[first_over - 1] if first_over > 0 else -1


# ---------------------------------------------------------------- Ray stages


def _add_keys(batch: pa.Table, *, image_column: str) -> pa.Table:
    if KEY_COLUMN in batch.column_names:
        return batch
    return batch.append_column(KEY_COLUMN, pa.array(row_keys(batch, image_column), type=pa.int64()))


def _index_rows(batch: pa.Table, *, image_column: str, caption_column: str) -> pa.Table:
    data, paths = image_parts(batch[image_column])
    captions = batch[caption_column].to_pylist()
    keys = np.array([sample_key(d, p) for d, p in zip(data, paths)], dtype=np.int64)
    uids = np.array([sample_uid(d, p, c) for d, p, c in zip(data, paths, captions)], dtype=np.int64)
    return pa.table({KEY_COLUMN: keys, UID_COLUMN: uids})


def _select_split(batch: pa.Table, *, image_column: str, cutoff: int, val: bool) -> pa.Table:
    batch = _add_keys(batch, image_column=image_column)
    keys = batch[KEY_COLUMN]
    mask = pc.less_equal(keys, cutoff) if val else pc.greater(keys, cutoff)
    return batch.filter(mask)


@dataclass(frozen=True)
class DataIndex:
    """What one cheap pass over the source (hashes only, no decode) tells: the split and the training samples."""

    val_cutoff: int  # rows whose key is <= this are validation rows (-1: none)
    train_uids: np.ndarray  # identities of the training rows, sorted (raydiff.data.stream)
    num_val: int = 0  # validation rows


def index_source(spec: DataSpec) -> DataIndex:
    """The val/train split and the sorted identities of the training rows: 16 bytes per row on the driver."""
    ds = read_source(spec)
    ds = ds.map_batches(_index_rows, batch_format="pyarrow",
                        fn_kwargs={"image_column": spec.image_column, "caption_column": spec.caption_column})
    parts = [(b[KEY_COLUMN].to_numpy(), b[UID_COLUMN].to_numpy())
             for b in ds.iter_batches(batch_size=None, batch_format="pyarrow") if b.num_rows]
    keys = np.concatenate([k for k, _ in parts]) if parts else np.zeros(0, np.int64)
    uids = np.concatenate([u for _, u in parts]) if parts else np.zeros(0, np.int64)
    cutoff = -1
    if spec.val_fraction > 0 and spec.val_max_samples > 0:
        cutoff = val_cutoff(keys[keys < int(spec.val_fraction * _HASH_SPACE)].tolist(), spec.val_max_samples)
    num_val = int((keys <= cutoff).sum())
    logger.info("val split: %d of %d rows", num_val, len(keys))
    return DataIndex(cutoff, np.sort(uids[keys > cutoff]), num_val)


def _max_length(tokenizer: Any) -> int:
    # Tokenizers saved without a config report a huge sentinel; CLIP's context is 77.
    n = getattr(tokenizer, "model_max_length", None)
    return int(n) if isinstance(n, int) and 0 < n <= 4096 else 77


class Preprocessor:
    """Callable class for ``map_batches``: decode → plan/apply crop → time_ids → tokenize with both tokenizers.
    Crops, flips and caption dropout are seeded by (seed, ``epoch``, sample)."""

    def __init__(
        self,
        tokenizer_path: str,
        *,
        image_column: str = "image",
        caption_column: str = "text",
        resolution: int = 64,
        center_crop: bool = False,
        random_flip: bool = True,
        seed: int = 0,
        epoch: int = 0,
        on_error: str = "skip",
        caption_dropout: float = 0.0,
        max_aspect_ratio: float | None = None,
        filesystem: Any = None,
        stats_actor: str | None = None,
        buckets: tuple[tuple[int, int], ...] = (),
        cache_rows: bool = False,
    ) -> None:
        """``cache_rows``: rows for a precompute cache — both flips of the crop (``*_flipped`` columns), no caption
        dropout (drawn per epoch when the cache is read), and the sample's key and identity."""
        self.tokenizers = _tokenizers(tokenizer_path)
        self.image_column, self.caption_column = image_column, caption_column
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.seed, self.epoch, self.on_error = seed, epoch, on_error
        self.caption_dropout = 0.0 if cache_rows else caption_dropout
        self.both_flips, self.identities = cache_rows and random_flip, cache_rows
        self.max_aspect_ratio, self.filesystem, self.stats_actor = max_aspect_ratio, filesystem, stats_actor
        self.buckets = [tuple(b) for b in buckets]
        self.num_skipped = 0
        self._counts: dict[str, int] = {}  # this batch's counters, flushed to the stats actor per batch
        self._examples: list[str] = []

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
            logger.warning("skipping %s: %s (%d skipped by this worker)", what, err, self.num_skipped)
            self._examples.append(f"{what}: {err}")

    def _count(self, name: str) -> None:
        self._counts[name] = self._counts.get(name, 0) + 1

    def _flush_counts(self) -> None:
        stats.record(self.stats_actor, self._counts, self._examples)
        self._counts, self._examples = {}, []

    def _tokenize(self, captions: list[str]) -> list[np.ndarray]:
        out = []
        for tok in self.tokenizers:
            n = _max_length(tok)
            if not captions:
                out.append(np.zeros((0, n), dtype=np.int64))
                continue
            ids = tok(captions, padding="max_length", max_length=n, truncation=True, return_tensors="np")
            out.append(np.asarray(ids["input_ids"], dtype=np.int64))
        return out

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        data, paths = image_parts(batch[self.image_column])
        captions = batch[self.caption_column].to_pylist()
        files = batch[FILE_COLUMN].to_pylist() if FILE_COLUMN in batch.column_names else [None] * len(data)
        keys = row_keys(batch, self.image_column)
        variants: list[list[tuple[np.ndarray, tuple]]] = []
        kept, buckets, rows = [], [], []
        for i, (d, p, f, k, c) in enumerate(zip(data, paths, files, keys, captions)):
            try:
                crops, b = self._sample(d, p, int(k), self.epoch)
            except (ValueError, OSError) as e:  # ImageDecodeError is a ValueError; OSError: unreadable path
                self._skip_or_raise(describe_row(int(k), p, f), e)
                continue
            rows.append(i)
            variants.append(crops)
            buckets.append(b)
            if c is None:
                self._count("data_null_captions")
            dropped = drop_caption(self.seed, self.epoch, int(k), self.caption_dropout)
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
        if ORDER_COLUMN in batch.column_names:  # the planned stream's place of each kept row (raydiff.data.stream)
            out[ORDER_COLUMN] = batch[ORDER_COLUMN].to_numpy()[kept_rows]
        if self.identities:  # a cache row carries what the stream and the per-epoch draws need
            out[KEY_COLUMN] = keys[kept_rows]
            out[UID_COLUMN] = np.array([sample_uid(data[i], paths[i], captions[i]) for i in rows], dtype=np.int64)
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
    from transformers import CLIPTokenizer  # imported here: only the processes that preprocess pay for it

    return tuple(CLIPTokenizer.from_pretrained(tokenizer_path, subfolder=sub) for sub in ("tokenizer", "tokenizer_2"))


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


def _preprocessed(ds: ray.data.Dataset, src: sources.Source, spec: DataSpec, tokenizer_path: str,
                  epoch: int, cache_rows: bool = False) -> ray.data.Dataset:
    settings = {
        "image_column": spec.image_column,
        "caption_column": spec.caption_column,
        "resolution": spec.resolution,
        "center_crop": spec.center_crop,
        "random_flip": spec.random_flip,
        "seed": spec.seed,
        "epoch": epoch,
        "on_error": spec.on_error,
        "caption_dropout": spec.caption_dropout,
        "max_aspect_ratio": spec.max_aspect_ratio,
        # Only image-folder rows are paths to read; parquet structs' paths are labels (or local files).
        "filesystem": src.filesystem if src.format == "imagefolder" else None,
        "stats_actor": spec.stats_actor,
        "buckets": spec.buckets,
        "cache_rows": cache_rows,
    }
    return ds.map_batches(_preprocess, batch_size=spec.batch_size, batch_format="pyarrow",
                          compute=ray.data.TaskPoolStrategy(size=spec.concurrency),
                          fn_kwargs={"tokenizer_path": tokenizer_path, "settings": settings})


def _split_dataset(spec: DataSpec, tokenizer_path: str, epoch: int, cutoff: int, val: bool):
    # A fresh read per split: each gets its own DataContext, so val's preserve_order doesn't leak into train.
    ds, src = sources.read(spec.source, spec.format, spec.image_column, spec.caption_column)
    ds = ds.map_batches(
        _select_split,
        batch_format="pyarrow",
        fn_kwargs={"image_column": spec.image_column, "cutoff": cutoff, "val": val},
    )
    return _preprocessed(ds, src, spec, tokenizer_path, epoch)


def planned_train_dataset(spec: DataSpec, tokenizer_path: str, share: EpochShare) -> ray.data.Dataset:
    """One worker's rows of one epoch in its stream order (raydiff.data.stream): pick the rows of the share (before
    any decode), sort them by their place, then preprocess in order with that epoch's crops and flips (and, with a
    streamed precompute, encode them). With a precompute cache the rows come from the cache instead."""
    from raydiff.data import precompute

    if spec.cache:
        return precompute.cached_train_dataset(spec, share)
    ds, src = sources.read(spec.source, spec.format, spec.image_column, spec.caption_column)
    ds = ds.map_batches(assign_rows, batch_format="pyarrow",
                        fn_kwargs={"image_column": spec.image_column, "caption_column": spec.caption_column,
                                   "uids": share.uids, "orders": share.orders})
    ds = _preprocessed(ds.sort(ORDER_COLUMN), src, spec, tokenizer_path, share.epoch)
    if spec.encoder:
        ds = precompute.encode_stage(ds, precompute.EncoderSpec(**spec.encoder), spec.batch_size)
    ds.context.execution_options.preserve_order = True
    return ds


def build_datasets(spec: DataSpec, tokenizer_path: str, epoch: int = 0,
                   index: DataIndex | None = None) -> dict[str, ray.data.Dataset]:
    """{"train", "val"} datasets with exactly the columns OUTPUT_COLUMNS.

    Runs one light pass over the data now (the split cutoff) unless ``index`` is given; everything else is lazy.
    Val uses center crop, no flip and preserved order, so each evaluation sees identical inputs in identical order.
    (Ray Train's DataConfig replaces a dataset's execution options: pass ``preserve_order=True`` for "val" there.)

    ``epoch`` seeds the train crops. This train dataset streams in no fixed order (previews, benchmarks); training
    reads the seeded, resumable per-worker stream of ``planned_train_dataset``.
    """
    cutoff = (index or index_source(spec)).val_cutoff
    train = _split_dataset(spec, tokenizer_path, epoch, cutoff, val=False)
    # Val stays square (center crop at data.resolution) and keeps every caption: its batches are encoded once, in a
    # fixed order.
    val_spec = replace(spec, center_crop=True, random_flip=False, caption_dropout=0.0, buckets=())
    val = _split_dataset(val_spec, tokenizer_path, 0, cutoff, val=True)
    val.context.execution_options.preserve_order = True
    return {"train": train, "val": val}


def planned_batches(spec: DataSpec, tokenizer_path: str, uids: np.ndarray, pos: StreamPosition, rank: int,
                    batch_size: int, prefetch_batches: int = 2) -> Iterator[tuple[dict[str, np.ndarray], int, int]]:
    """Rank ``rank``'s training batches from its row ``pos.consumed[rank]`` on, epoch after epoch:
    (numpy batch of ``batch_size`` rows, local rows consumed, epoch of the last row). Ends if an epoch yields no
    usable row (every row of the share was skipped), so the caller can stop with the data error."""
    n = len(uids)
    if n == 0:
        return
    start_row = pos.consumed[rank]

    def rows() -> Iterator[dict[str, np.ndarray]]:
        epoch = epoch_of(n, pos, rank, start_row)
        while True:
            share = epoch_share(uids, spec.seed, pos, rank, epoch, start_row)
            got = 0
            if share.end > share.first:
                it = _outside_placement_group(planned_train_dataset(spec, tokenizer_path, share))
                try:
                    for block in it.iter_batches(batch_size=None, batch_format="numpy",
                                                 prefetch_batches=prefetch_batches):
                        got += len(block[ORDER_COLUMN])
                        yield block
                finally:
                    _stop(it)
                if not got:
                    return
            epoch += 1

    for batch, consumed in rebatch(rows(), batch_size, BUCKET_COLUMN if spec.buckets else None):
        yield batch, consumed, epoch_of(n, pos, rank, consumed - 1)


@ray.remote(num_cpus=0)
class _SplitLauncher:
    def split(self, ds: ray.data.Dataset):
        return ds.streaming_split(1)[0]


def _outside_placement_group(ds: ray.data.Dataset):
    """An iterator over ``ds`` whose execution (read, sort, preprocessing) is scheduled outside the caller's placement
    group: a training worker's group can capture the tasks it launches (it does inside Tune trials), and they could
    never fit the worker's bundle. A launcher actor placed with the default strategy creates the split coordinator
    that runs the execution; the launcher stays alive as long as the iterator."""
    launcher = _SplitLauncher.options(scheduling_strategy="DEFAULT").remote()
    it = ray.get(launcher.split.remote(ds))
    it._raydiff_launcher = launcher  # keeps the coordinator's owner alive
    return it


def _stop(it) -> None:
    """End an epoch's execution at once. Left to Ray, the coordinator gets SIGTERM when its owner (the launcher) goes;
    landing inside a Ray Data finalizer, that printed a SystemExit traceback per epoch per worker. ray.kill ends the
    process without running Python handlers. `_coord_actor` is Ray Data's (2.60) handle on the split coordinator:
    without it, only the launcher is killed and Ray stops the coordinator as before."""
    for actor in (getattr(it, "_coord_actor", None), getattr(it, "_raydiff_launcher", None)):
        if actor is not None:
            ray.kill(actor)

