"""What start-up knows about a source, from metadata only: its read units (parquet row groups, tar shards, row
groups of an image folder's listing) with their row counts, the held-out validation rows, and a fingerprint.

A row is identified by its place: global row ``g`` counts rows unit after unit in listing order. Training rows are
the rows that are not held out, numbered ``t`` in the same order, so each unit's training rows are one range of t.

The validation split depends on the rows' places only (file relative to the source root and row in it), not on the
seed: every trial of a sweep holds out the same rows, and choosing them reads no image. Each row gets a 64-bit hash;
rows whose hash is below ``val_fraction`` of the hash space are candidates, and the ``val_max_samples`` lowest are
held out. Identical images stored twice may land on both sides (a content split would have to read every image).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow.fs as pafs

from raydiff import storage
from raydiff.data import sources

MANIFEST_FILE = "data_manifest.json"  # in the run directory
FOOTER_THREADS = 16  # concurrent footer / tar-header reads at start-up
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


@dataclass
class Manifest:
    format: str
    filesystem: pafs.FileSystem  # the source's (image-folder rows are read from it by path)
    unit_filesystem: pafs.FileSystem  # where the unit files are (the run's listing for an image folder)
    files: list[str]  # unit files
    unit_file: np.ndarray  # int64 [U]: index into files
    unit_part: np.ndarray  # int64 [U]: row group (0 for a tar shard)
    unit_rows: np.ndarray  # int64 [U]
    val_rows: np.ndarray  # int64, sorted global rows held out for validation
    fingerprint: str  # of the source files' names, sizes and modification times
    file_stats: dict = field(default_factory=dict)  # relative name -> [size, mtime_ns]
    image_column: str = "image"
    caption_column: str = "text"

    def __post_init__(self) -> None:
        self.unit_start = np.concatenate([[0], np.cumsum(self.unit_rows)]).astype(np.int64)
        val_units = np.searchsorted(self.unit_start, self.val_rows, "right") - 1
        self.unit_train_rows = self.unit_rows - np.bincount(val_units, minlength=len(self.unit_rows))
        self.unit_train_start = np.concatenate([[0], np.cumsum(self.unit_train_rows)]).astype(np.int64)

    @property
    def num_rows(self) -> int:
        return int(self.unit_start[-1])

    @property
    def num_val(self) -> int:
        return len(self.val_rows)

    @property
    def num_train(self) -> int:
        return self.num_rows - self.num_val

    def global_rows(self, t: np.ndarray) -> np.ndarray:
        """Training rows t → global rows g (skipping the held-out rows)."""
        t = np.asarray(t, dtype=np.int64)
        shifted = self.val_rows - np.arange(len(self.val_rows))  # g - t is the number of held-out rows before g
        return t + np.searchsorted(shifted, t, "right")

    def locate(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global rows → (unit, row within the unit)."""
        unit = np.searchsorted(self.unit_start, g, "right") - 1
        return unit, g - self.unit_start[unit]

    # ------------------------------------------------------------ persistence (the run directory)

    def to_json(self) -> str:
        return json.dumps({"format": self.format, "files": self.files, "unit_file": self.unit_file.tolist(),
                           "unit_part": self.unit_part.tolist(), "unit_rows": self.unit_rows.tolist(),
                           "val_rows": self.val_rows.tolist(), "fingerprint": self.fingerprint,
                           "file_stats": self.file_stats, "image_column": self.image_column,
                           "caption_column": self.caption_column})

    @classmethod
    def from_json(cls, text: str, filesystem: pafs.FileSystem, unit_filesystem: pafs.FileSystem) -> Manifest:
        d = json.loads(text)
        arrays = {k: np.asarray(d.pop(k), dtype=np.int64) for k in ("unit_file", "unit_part", "unit_rows", "val_rows")}
        return cls(filesystem=filesystem, unit_filesystem=unit_filesystem, **arrays, **d)


# ---------------------------------------------------------------- building one


def _root(files: list[str]) -> str:
    return posixpath.dirname(files[0]) if len(files) == 1 else posixpath.commonpath(files)


def file_stats(fs: pafs.FileSystem, files: list[str]) -> dict[str, list[int]]:
    """relative name -> [size, mtime_ns]: what a changed source changes."""
    root = _root(files)
    return {posixpath.relpath(i.path, root): [int(i.size or 0), int(i.mtime_ns or 0)] for i in fs.get_file_info(files)}


def fingerprint(stats: dict[str, list[int]], fmt: str) -> str:
    return hashlib.sha256(json.dumps([fmt, sorted(stats.items())]).encode()).hexdigest()[:20]


def _units_per_file(fs: pafs.FileSystem, files: list[str], fmt: str) -> list[list[int]]:
    count = sources.parquet_units if fmt in ("parquet", "imagefolder") else (lambda f, p: [sources.tar_samples(f, p)])

    def units(path: str) -> list[int]:
        try:
            return count(fs, path)
        except (OSError, ValueError, tarfile.TarError) as err:  # ArrowInvalid is a ValueError
            raise ValueError(f"cannot read the {fmt} metadata of {path}: {err}") from err

    with ThreadPoolExecutor(FOOTER_THREADS) as pool:
        return list(pool.map(units, files))


def _row_hashes(file_key: int, first_row: int, n: int) -> np.ndarray:
    """A 64-bit mix (splitmix64) of (file, row in file): uniform, and fixed by the row's place alone."""
    with np.errstate(over="ignore"):
        z = (np.uint64(file_key) + np.arange(first_row, first_row + n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9) & _MASK64
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB) & _MASK64
        return z ^ (z >> np.uint64(31))


def choose_val_rows(names: list[str], rows_per_unit: list[list[int]], fraction: float, max_samples: int) -> np.ndarray:
    """The held-out global rows: of the rows whose hash is below ``fraction``, the ``max_samples`` lowest."""
    if fraction <= 0 or max_samples <= 0:
        return np.zeros(0, np.int64)
    threshold = np.uint64(min(int(fraction * 2.0**64), 2**64 - 1))
    best_h, best_g = np.zeros(0, np.uint64), np.zeros(0, np.int64)
    g = 0
    for name, units in zip(names, rows_per_unit):
        key = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")
        n = sum(units)
        h = _row_hashes(key, 0, n)
        pick = np.flatnonzero(h < threshold)
        best_h = np.concatenate([best_h, h[pick]])
        best_g = np.concatenate([best_g, pick.astype(np.int64) + g])
        if len(best_h) > max_samples:
            keep = np.argsort(best_h, kind="stable")[:max_samples]
            best_h, best_g = best_h[keep], best_g[keep]
        g += n
    return np.sort(best_g)


def build(source: str, fmt: str | None, image_column: str, caption_column: str, val_fraction: float,
          val_max_samples: int, workdir: str | None = None, filesystem: pafs.FileSystem | None = None) -> Manifest:
    """List the source, read its footers / tar headers (concurrently) and choose the held-out rows.

    An image folder's metadata is re-laid out once into ``workdir`` (the run directory; a temporary directory
    when None) as its read units. ``filesystem`` replaces the source's own (e.g. a byte-counting wrapper)."""
    src = sources.resolve(source, fmt, filesystem)
    stats = file_stats(src.filesystem, src.files)
    unit_fs, files = src.filesystem, src.files
    if src.format == "parquet":
        names = set(sources.parquet_columns(src.filesystem, src.files[0]))
        missing = [c for c in (image_column, caption_column) if c not in names]
        if missing:
            raise KeyError(f"column(s) {missing} not in parquet file {src.files[0]}; available: {sorted(names)}")
    if src.format == "imagefolder":
        if workdir is None:
            workdir = tempfile.mkdtemp(prefix="raydiff-listing-")
        files = sources.write_listing(src, image_column, caption_column,
                                      storage.join(workdir, f"listing-{fingerprint(stats, src.format)}"))
        unit_fs = storage.filesystem(workdir)[0]
    per_file = _units_per_file(unit_fs, files, src.format)
    root = _root(files)
    names = [posixpath.relpath(f, root) for f in files]
    none = [np.zeros(0, np.int64)]
    unit_file = np.concatenate([np.full(len(u), i, np.int64) for i, u in enumerate(per_file)] or none)
    unit_part = np.concatenate([np.arange(len(u), dtype=np.int64) for u in per_file] or none)
    unit_rows = np.concatenate([np.asarray(u, np.int64) for u in per_file] or none)
    keep = unit_rows > 0  # empty row groups and shards read nothing
    return Manifest(src.format, src.filesystem, unit_fs, files, unit_file[keep], unit_part[keep], unit_rows[keep],
                    choose_val_rows(names, per_file, val_fraction, val_max_samples), fingerprint(stats, src.format),
                    stats, image_column, caption_column)


def describe_change(old: Manifest, new_stats: dict[str, list[int]]) -> str:
    """What differs between the files a run started on and the files there now, with the rows it had in them."""
    added = sorted(set(new_stats) - set(old.file_stats))
    removed = sorted(set(old.file_stats) - set(new_stats))
    changed = sorted(k for k in set(new_stats) & set(old.file_stats) if new_stats[k] != old.file_stats[k])
    parts = [f"{len(x)} file(s) {what} ({', '.join(x[:3])}{', ...' if len(x) > 3 else ''})"
             for x, what in ((added, "added"), (removed, "removed"), (changed, "rewritten")) if x]
    if old.format != "imagefolder":  # unit files are the source files: count the rows the run knew in them
        root = _root(old.files)
        gone = {i for i, f in enumerate(old.files) if posixpath.relpath(f, root) in set(removed) | set(changed)}
        rows = int(old.unit_rows[np.isin(old.unit_file, list(gone))].sum()) if gone else 0
        parts.append(f"{rows} of the run's {old.num_rows} rows are in removed or rewritten files")
    return "; ".join(parts) or "the file list differs"
