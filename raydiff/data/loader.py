"""A training worker's batches: its stream's read chunks (``raydiff.data.pipeline.stream_legs``) → rows from the
source, preprocessed (and, with a streamed precompute, encoded) or read from a precompute cache → batches in stream
order (``raydiff.data.stream.rebatch``). One Ray Data execution serves a worker's whole run.

Above ``pipeline`` (preprocessing) and ``precompute`` (encoders, cache): it picks between them per run.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator

import numpy as np
import ray

from raydiff import compat
from raydiff.data import precompute
from raydiff.data.buckets import BUCKET_COLUMN
from raydiff.data.manifest import Manifest
from raydiff.data.pipeline import DataSpec, _preprocessed, chunk_dataset, stream_legs
from raydiff.data.stream import EPOCH_COLUMN, ORDER_COLUMN, StreamPosition, rebatch


def planned_train_dataset(spec: DataSpec, tokenizer_path: str, manifest: Manifest,
                          chunks: list[dict]) -> ray.data.Dataset:
    """A worker's read chunks (raydiff.data.stream) as training rows in its stream order: read, then preprocessed
    with each row's epoch's crop and flip (and, with a streamed precompute, encoded). With a precompute cache the
    chunks' rows come from the cache instead."""
    if spec.cache:
        return precompute.cached_train_dataset(spec, chunks)
    ds = _preprocessed(chunk_dataset(manifest, chunks, spec.stats_actor), manifest, spec, tokenizer_path)
    if spec.encoder:
        ds = precompute.encode_stage(ds, precompute.EncoderSpec(**spec.encoder), spec.batch_size)
    ds.context.execution_options.preserve_order = True
    return ds


def planned_batches(spec: DataSpec, tokenizer_path: str, manifest: Manifest, pos: StreamPosition, rank: int,
                    batch_size: int, prefetch_batches: int = 2,
                    rows_needed: int | None = None) -> Iterator[tuple[dict[str, np.ndarray], tuple[int, list], int]]:
    """Rank ``rank``'s training batches from its row ``pos.consumed[rank]`` on, epoch after epoch:
    (numpy batch of ``batch_size`` rows, (resume row, rows emitted after it), epoch of the batch's last row).

    ``rows_needed`` (the rows the run still trains on) sizes the first Ray Data execution, so a whole run is one
    execution; bad rows use up more and a further one follows. Ends if a whole execution yields no usable row
    (every row was skipped), so the caller can stop with the data error."""
    n = manifest.num_train
    if n == 0:
        return
    leg = max(rows_needed or 0, n // max(pos.world, 1) + 1)

    def rows() -> Iterator[dict[str, np.ndarray]]:
        for chunks in stream_legs(manifest, spec.seed, pos, rank, leg, spec.data.shuffle_window):
            got = 0
            it = _stream_iterator(planned_train_dataset(spec, tokenizer_path, manifest, chunks))
            try:
                for block in it.iter_batches(batch_size=None, batch_format="numpy",
                                             prefetch_batches=prefetch_batches):
                    got += len(block[ORDER_COLUMN])
                    yield block
            finally:
                _stop(it)
            if not got:
                return

    group = BUCKET_COLUMN if spec.buckets else None
    for batch, resume, emitted in rebatch(rows(), batch_size, group, pos.emitted[rank]):
        epoch = int(batch[EPOCH_COLUMN].max())  # the column stays: data.record_rows records each row's epoch
        yield batch, (resume, emitted), epoch


class Prefetched:
    """Items of an iterator produced by a background thread, up to ``depth`` ahead of the consumer.

    A worker starts its training stream this way before it builds the model: the stream's first Ray Data execution
    (read and preprocessing tasks starting up) overlaps the model load, the engine build and the step-0 validation
    instead of following them, and later batches are assembled while the step runs. Errors reach the consumer at the
    item where they happened; ``close`` ends the iterator in its thread (its cleanup runs there)."""

    _END = object()

    def __init__(self, items: Iterator, depth: int = 1):
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(items,), name="raydiff-batches", daemon=True)
        self._thread.start()

    def _fill(self, items: Iterator) -> None:
        end = (self._END, None)
        try:
            for item in items:
                if not self._put((item, None)):
                    break
        except BaseException as err:  # handed to the consumer, raised there
            end = (self._END, err)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()
        self._put(end)

    def _put(self, entry) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator:
        while True:
            item, err = self._queue.get()
            if item is self._END:
                self._closed.set()
                if err is not None:
                    raise err
                return
            yield item

    def close(self, timeout: float = 10) -> None:
        self._closed.set()
        self._thread.join(timeout)


def held_out_batches(rows: list[dict[str, np.ndarray]], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """The driver's few held-out rows (pipeline.held_out_rows) in batches of ``batch_size``, in order: what
    ``ray.data.from_items(rows).iter_batches(batch_size=batch_size)`` gives, without a Ray Data execution per worker."""
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        yield {column: np.stack([row[column] for row in chunk]) for column in chunk[0]}


@ray.remote(num_cpus=0)
class _SplitLauncher:
    def split(self, ds: ray.data.Dataset):
        return ds.streaming_split(1)[0]


def _stream_iterator(ds: ray.data.Dataset):
    """An iterator over ``ds`` whose execution runs in this process, unless tasks launched here would be captured by
    this worker's placement group (inside Tune trials), where it runs outside the group."""
    if ray.get_runtime_context().should_capture_child_tasks_in_placement_group:
        return _outside_placement_group(ds)
    # The execution's scheduling thread runs here: no launcher and split-coordinator processes to start (seconds
    # before the first batch on a small node), no block hops through another actor.
    return ds.iterator()


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
    process without running Python handlers. Without the coordinator's handle (raydiff.compat.split_coordinator),
    only the launcher is killed and Ray stops the coordinator as before. An execution in this process (no launcher)
    ends with its iterator."""
    launcher = getattr(it, "_raydiff_launcher", None)
    if launcher is None:
        return
    for actor in (compat.split_coordinator(it), launcher):
        if actor is not None:
            ray.kill(actor)
