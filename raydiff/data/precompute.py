"""Precompute (``data.precompute``: text | latents): the frozen encoders run in a Ray Data actor pool instead of in
the training step.

Two ways to use it:

- **streamed** (no ``data.cache_dir``): each worker's epoch stream gets an ``Encoder`` stage after preprocessing.
  Every epoch still draws its own crops, flips and caption dropout; the training step skips the encoders.
- **cached** (``data.cache_dir`` set): the training split is preprocessed and encoded once into parquet under
  ``<cache_dir>/<fingerprint>/``, and every later run with the same fingerprint (model files, encoder dtype,
  preprocessing config, seed, the source files and the held-out rows) reads it instead of the source.
  Trade-off: the random crop is drawn once (epoch 0's draw) and frozen. Flips stay random per epoch — both mirror
  images of the crop are encoded, each with its own ``time_ids`` — and so does caption dropout (the empty prompt is
  encoded once and stored with the cache). Epoch 0 of a cached run trains on exactly what an online run trains on.

Latents are stored as the VAE's distribution parameters (mean ‖ logvar), so each step still draws a fresh latent
sample, as online encoding does. Validation rows are always encoded by the workers (once per run).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import uuid
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from raydiff import hub, storage, tokens
from raydiff.data import stats
from raydiff.data.columns import EMBED_COLUMNS, LATENT_COLUMN, TOKEN_COLUMNS
from raydiff.data.pipeline import (
    FLIPPED_SUFFIX,
    KEY_COLUMN,
    DataSpec,
    _preprocessed,
    chunk_dataset,
    chunk_items,
    drop_caption,
    training_rows,
    unit_chunks,
)
from raydiff.data.stream import EPOCH_COLUMN, ORDER_COLUMN, ROW_COLUMN
from raydiff.data.transforms import plan_crop, sample_rng

logger = logging.getLogger(__name__)

MANIFEST = "cache.json"  # written last: a cache directory without it is incomplete and ignored
EMPTY_PROMPT = "empty_prompt.npz"
ROW_INDEX = "row_index.json"  # per cache row group: file, group, first and last source row (from the footers)
CACHE_VERSION = 3  # bump when the cache layout or its meaning changes


@dataclass
class EncoderSpec:
    """Which frozen encoders to run and where (one actor = one copy of the encoders)."""

    pretrained: str
    mode: str = "latents"  # text | latents
    vae: str | None = None
    revision: str | None = None
    variant: str | None = None
    text_dtype: str = "float32"  # the training precision's dtype, as the workers' own text encoders use
    zero_empty_prompt: bool = True  # an empty (dropped) caption encodes to zeros (models.encode_prompt)
    concurrency: int = 1
    num_gpus: float = 0.0


# ---------------------------------------------------------------- the encoder stage


class Encoder:
    """Callable class for ``map_batches``: preprocessed rows (pixels, token ids) → text embeddings and, in latents
    mode, latent moments. Every pixel column (``pixels``, ``pixels_flipped``) gets its latent column."""

    def __init__(self, spec: dict) -> None:
        import torch

        from raydiff import models  # here, not at import: the per-epoch cache tasks need no torch or diffusers

        self.spec = EncoderSpec(**spec)
        # As many torch threads as the actor holds CPUs (Ray's OMP_NUM_THREADS is read only if torch was not yet
        # imported in this pooled process).
        torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
        self.device = torch.device("cuda" if self.spec.num_gpus > 0 and torch.cuda.is_available() else "cpu")
        enc = models.load_encoders(self.spec.pretrained, vae=self.spec.vae, revision=self.spec.revision,
                                   variant=self.spec.variant, text_encoder_dtype=getattr(torch, self.spec.text_dtype),
                                   vae_dtype=torch.float32)
        self.vae = enc.vae.to(self.device)
        self.text_encoder, self.text_encoder_2 = enc.text_encoder.to(self.device), enc.text_encoder_2.to(self.device)

    def encode_text(self, ids: np.ndarray, ids_2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        from raydiff import models  # (as in __init__)

        with torch.no_grad():
            embeds, pooled = models.encode_prompt(self.text_encoder, self.text_encoder_2, ids, ids_2,
                                                  self.spec.zero_empty_prompt)
        return _numpy(embeds), _numpy(pooled)

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Latent moments per row; rows of different sizes (aspect-ratio buckets) are encoded per size."""
        import torch

        from raydiff import models  # (as in __init__)

        if pixels.dtype != object:  # one size: one VAE call
            with torch.no_grad():
                return _numpy(models.latent_moments(self.vae, torch.from_numpy(np.ascontiguousarray(pixels))))
        out = np.empty(len(pixels), dtype=object)
        for shape in {p.shape for p in pixels}:
            idx = [i for i, p in enumerate(pixels) if p.shape == shape]
            for i, moments in zip(idx, self.encode_pixels(np.stack([pixels[i] for i in idx]))):
                out[i] = moments
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {k: v for k, v in batch.items() if k not in TOKEN_COLUMNS}
        out["prompt_embeds"], out["pooled"] = self.encode_text(batch["input_ids"], batch["input_ids_2"])
        if self.spec.mode == "latents":
            for column in [c for c in batch if c.startswith("pixels")]:
                out[column.replace("pixels", LATENT_COLUMN, 1)] = self.encode_pixels(out.pop(column))
        return out


def _numpy(t) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def encode_stage(ds: ray.data.Dataset, spec: EncoderSpec, batch_size: int) -> ray.data.Dataset:
    """``ds`` (Preprocessor rows) with the encoders applied by a pool of ``spec.concurrency`` actors."""
    return ds.map_batches(Encoder, fn_constructor_args=(asdict(spec),), batch_size=batch_size,
                          batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=spec.concurrency),
                          num_cpus=1, num_gpus=spec.num_gpus or None)


# ---------------------------------------------------------------- per-epoch draws on cached rows


def choose_epoch_variant(batch: dict[str, np.ndarray], *, seed: int, random_flip: bool, center_crop: bool,
                         caption_dropout: float, empty: dict[str, np.ndarray], epoch: int = 0) -> dict:
    """Cache rows → training rows of their epoch (``_epoch``, else ``epoch``): the flip the online path would draw
    (from the same per-sample generator) and the seeded caption dropout (the stored empty-prompt encoding)."""
    keys = batch[KEY_COLUMN]
    epochs = batch[EPOCH_COLUMN] if EPOCH_COLUMN in batch else np.full(len(keys), epoch)
    flips = np.zeros(len(keys), dtype=bool)
    if random_flip:
        for i, (key, t, e) in enumerate(zip(keys, batch["time_ids"], epochs)):
            orig_h, orig_w, target_h, target_w = int(t[0]), int(t[1]), int(t[4]), int(t[5])
            flips[i] = plan_crop(orig_w, orig_h, (target_w, target_h), center_crop, True,
                                 sample_rng(seed, int(e), int(key))).flipped
    out = {}
    for column in batch:
        if column.endswith(FLIPPED_SUFFIX) or column == KEY_COLUMN:  # ROW_COLUMN stays: data.record_rows
            continue
        flipped = batch.get(column + FLIPPED_SUFFIX)
        out[column] = batch[column] if flipped is None else _pick(batch[column], flipped, flips)
    dropped = np.array([drop_caption(seed, int(e), int(k), caption_dropout) for k, e in zip(keys, epochs)],
                       dtype=bool)
    for column in EMBED_COLUMNS:
        if dropped.any():
            out[column] = out[column].copy()
            out[column][dropped] = empty[column]
    return out


def _pick(plain: np.ndarray, flipped: np.ndarray, flips: np.ndarray) -> np.ndarray:
    if plain.dtype != object:
        return np.where(flips.reshape(-1, *[1] * (plain.ndim - 1)), flipped, plain)
    out = np.empty(len(plain), dtype=object)
    out[:] = [f if flip else p for p, f, flip in zip(plain, flipped, flips)]
    return out


def read_cached_chunk(batch, *, filesystem: pafs.FileSystem, root: str, index: dict[str, list]) -> pa.Table:
    """A Ray Data task: one read chunk's rows from the cache, in stream order. Reads only the cache row groups that
    hold them; a row the cache build skipped (a bad image) is left out, as a decode failure would be online."""
    (epoch,), (first,), (rows,) = (batch[c].to_pylist() for c in ("epoch", "first", "rows"))
    g = np.asarray(rows, dtype=np.int64)
    entry = np.searchsorted(np.asarray(index["first"]), g, "right") - 1
    parts, places = [], []
    for e in np.unique(entry[entry >= 0]):
        at = np.flatnonzero(entry == e)
        with filesystem.open_input_file(f"{root}/{index['file'][e]}") as f:
            table = pq.ParquetFile(f).read_row_group(int(index["group"][e]))
        stored = table[ROW_COLUMN].to_numpy()
        by_row = np.argsort(stored, kind="stable")
        where = np.minimum(np.searchsorted(stored[by_row], g[at]), len(stored) - 1)
        found = stored[by_row][where] == g[at]
        parts.append(table.take(pa.array(by_row[where[found]], type=pa.int64())))
        places.append(at[found])
    if not parts:
        return pa.table({ORDER_COLUMN: pa.array([], pa.int64())})
    table = pa.concat_tables(parts)
    place = np.concatenate(places)
    by_place = np.argsort(place, kind="stable")
    return (table.take(pa.array(by_place, type=pa.int64()))
            .append_column(ORDER_COLUMN, pa.array(first + place[by_place], type=pa.int64()))
            .append_column(EPOCH_COLUMN, pa.array(np.full(len(place), epoch), type=pa.int64())))


def cached_train_dataset(spec, chunks: list[dict]) -> ray.data.Dataset:
    """A worker's read chunks (raydiff.data.stream) from the cache (``spec.cache``), in its stream order."""
    index = json.loads(storage.read_text(storage.join(spec.cache, ROW_INDEX)))
    ds = chunk_items(chunks)
    # The filesystem travels pickled, with the endpoint and credentials resolved here (raydiff.storage).
    fs, root = storage.filesystem(spec.cache)
    ds = ds.map_batches(read_cached_chunk, batch_size=1, batch_format="pyarrow",
                        fn_kwargs={"filesystem": fs, "root": root, "index": index})
    d = spec.data
    ds = ds.map_batches(choose_epoch_variant, batch_format="numpy", batch_size=spec.batch_size,
                        fn_kwargs={"seed": spec.seed, "random_flip": d.random_flip, "center_crop": d.center_crop,
                                   "caption_dropout": d.caption_dropout, "empty": read_empty_prompt(spec.cache)})
    ds.context.execution_options.preserve_order = True
    return ds


# ---------------------------------------------------------------- the cache


def fingerprint(spec, encoder: EncoderSpec, manifest) -> str:
    """What the cached rows depend on: the encoders' files, their dtype, the preprocessing, the seed (epoch 0's
    crops), the source's files (names, sizes, modification times) and the held-out rows: a changed dataset or
    split misses the cache."""
    assert isinstance(spec, DataSpec)
    preprocessing = {k: getattr(spec.data, k) for k in ("format", "image_column", "caption_column", "resolution",
                                                         "center_crop", "random_flip", "max_aspect_ratio", "on_error",
                                                         "val_fraction", "val_max_samples")}
    preprocessing |= {"seed": spec.seed, "buckets": spec.buckets}  # bucket sizes, however data.buckets names them
    enc = {k: v for k, v in asdict(encoder).items() if k not in ("concurrency", "num_gpus")}
    key = {"version": CACHE_VERSION, "encoder": enc, "preprocessing": preprocessing,
           "model_files": _model_files(encoder), "source": manifest.fingerprint,
           "val_rows": hashlib.sha256(np.ascontiguousarray(manifest.val_rows, dtype=np.int64).tobytes()).hexdigest()}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _model_files(encoder: EncoderSpec) -> list:
    """(file, size, mtime) of the local encoder and tokenizer files: re-saving a model there changes the key.
    Hub ids are identified by their id and revision (part of the encoder spec)."""
    out = []
    for name, subs in ((encoder.pretrained, ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")),
                       (encoder.vae, ("",))):
        # "tiny" is built here if absent (importing diffusers only then); hub ids have no local files to stat
        path = hub.local_pretrained(hub.TINY, parts=()) if name == hub.TINY else name
        if not path or not os.path.isdir(path):
            continue
        for sub in subs:
            for root, _, files in sorted(os.walk(os.path.join(path, sub))):
                for f in sorted(files):
                    st = os.stat(os.path.join(root, f))
                    out.append([os.path.relpath(os.path.join(root, f), path), st.st_size, st.st_mtime_ns])
    return out


def ensure_cache(spec, encoder: EncoderSpec, tokenizer_path: str, manifest, cache_dir: str) -> str:
    """The cache's data directory for this fingerprint, built now if no complete one exists.

    A build writes into a fresh directory and commits by writing the manifest last, so an interrupted build is
    never read and concurrent builders (Tune trials) cannot corrupt each other: the last manifest wins.
    """
    root = storage.join(cache_dir, fingerprint(spec, encoder, manifest))
    manifest_path = storage.join(root, MANIFEST)
    if storage.exists(manifest_path):
        manifest = json.loads(storage.read_text(manifest_path))
        stats.record(spec.stats_actor, manifest["counts"], [])  # the skips of the build count in this run too
        logger.info("precompute cache hit: %s (%d rows)", root, manifest["rows"])
        return storage.join(root, manifest["data"])
    return _build_cache(spec, encoder, tokenizer_path, manifest, root)


def _build_cache(spec, encoder: EncoderSpec, tokenizer_path: str, manifest, root: str) -> str:
    logger.info("precompute cache miss: encoding the training split into %s", root)
    before = stats.metrics(spec.stats_actor)
    ds = chunk_dataset(manifest, unit_chunks(manifest, training_rows(manifest), 0))
    ds = encode_stage(_preprocessed(ds, manifest, spec, tokenizer_path, cache_rows=True), encoder, spec.batch_size)
    ds = ds.drop_columns([ORDER_COLUMN, EPOCH_COLUMN])
    ds.context.execution_options.preserve_order = True  # row groups hold ascending runs of source rows
    data_dir = uuid.uuid4().hex[:12]
    fs, path = storage.filesystem(storage.join(root, data_dir))
    ds.write_parquet(path, filesystem=fs)
    index = _row_index(fs, path)
    rows = int(sum(index.pop("rows")))
    if rows == 0:
        raise stats.no_data_error(spec.stats_actor, "train")
    storage.write_text(storage.join(root, data_dir, ROW_INDEX), json.dumps(index))
    # DEFAULT: inside a Tune trial the task must not be captured by the trial's placement group (no room there).
    encode = _encode_empty_prompt.options(num_gpus=encoder.num_gpus or None, scheduling_strategy="DEFAULT")
    empty = ray.get(encode.remote(asdict(encoder), tokenizer_path))
    buf = io.BytesIO()
    np.savez(buf, **empty)
    storage.write_bytes(storage.join(root, data_dir, EMPTY_PROMPT), buf.getvalue())
    after = stats.metrics(spec.stats_actor)
    manifest = {"data": data_dir, "rows": rows, "counts": {k: after[k] - before[k] for k in after},
                "version": CACHE_VERSION}
    storage.write_text(storage.join(root, MANIFEST), json.dumps(manifest, indent=1))
    logger.info("precompute cache written: %s (%d rows)", root, rows)
    return storage.join(root, data_dir)


@ray.remote(num_cpus=1)
def _encode_empty_prompt(encoder: dict, tokenizer_path: str) -> dict[str, np.ndarray]:
    """The empty prompt's encoding, which caption dropout substitutes for a caption at training time."""
    ids, ids_2 = tokens.tokenize(tokens.load_tokenizers(tokenizer_path), [""])  # as a dropped caption online
    embeds, pooled = Encoder(encoder).encode_text(ids, ids_2)
    return {"prompt_embeds": embeds[0], "pooled": pooled[0]}


def read_empty_prompt(cache_data_dir: str) -> dict[str, np.ndarray]:
    fs, path = storage.filesystem(storage.join(cache_data_dir, EMPTY_PROMPT))
    with fs.open_input_file(path) as f:
        with np.load(io.BytesIO(f.read())) as z:
            return {k: z[k] for k in z.files}


def _row_index(fs: pafs.FileSystem, path: str) -> dict[str, list]:
    """Where each source row is in the cache, from the footers: per row group its file, number and first row."""
    entries = []
    for file in _parquet_files(fs, path):
        with fs.open_input_file(file) as f:
            meta = pq.ParquetFile(f).metadata
        column = meta.schema.to_arrow_schema().get_field_index(ROW_COLUMN)
        for group in range(meta.num_row_groups):
            rg = meta.row_group(group)
            if rg.num_rows:
                st = rg.column(column).statistics
                entries.append((int(st.min), int(st.max), file.rsplit("/", 1)[-1], group, rg.num_rows))
    entries.sort()
    for (_, last, *_), (nxt, *_) in zip(entries, entries[1:]):
        if nxt <= last:
            raise RuntimeError(f"precompute cache under {path} holds overlapping row ranges; delete it and rebuild")
    return {"first": [e[0] for e in entries], "file": [e[2] for e in entries], "group": [e[3] for e in entries],
            "rows": [e[4] for e in entries]}


def _parquet_files(fs: pafs.FileSystem, path: str) -> list[str]:
    return sorted(f.path for f in fs.get_file_info(pafs.FileSelector(path)) if f.path.endswith(".parquet"))
