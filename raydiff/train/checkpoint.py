"""What a Ray checkpoint of a run holds, how it gets to storage, and how a restart reads it back.

One checkpoint directory = every rank's DeepSpeed shards (tag ``deepspeed``: UNet, optimizer, LR scheduler, step)
+ ``trainer_state.json`` (step, epoch, the data stream position) + the EMA (``ema_rank{r}.pt`` per rank, or one
``ema_unet.pt`` in older checkpoints) + ``rng_rank{r}.pt`` (torch, numpy and Python RNG states of each rank)
+ ``manifest_rank{r}.json`` (name and size of every file that rank wrote, written last and uploaded last). A checkpoint
is complete when every rank's manifest is there and every file it lists has its size; a torn one (a copy cut short, a
lost upload) is passed over for the previous complete one, with a warning.

At real size (SDXL, ZeRO-2: ~36 GB a checkpoint) three things matter, all here:
- Saving: each rank writes to a local staging directory and hands it to ``ray.train.report`` with an asynchronous
  upload (`report`): training goes on while Ray's upload thread copies it (a rename when the storage is on the same
  local filesystem); the staging directory is deleted once uploaded; at most one upload is in flight per rank.
- Resuming: each rank copies only the files it reads (`rank_files`: DeepSpeed's layout, fenced by version) into a
  directory shared by the ranks of its node (`resume_dir`); a checkpoint on a local/NFS path is read in place.
- A new world size: rank 0 alone converts the checkpoint to DeepSpeed's universal format, once, into
  ``<checkpoint>/universal/`` on the storage (reused by a later attempt); the other ranks wait for it and load it.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import logging
import os
import posixpath
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import pyarrow.fs as pafs
import ray.train
import torch
from ray.train import Checkpoint

from raydiff import storage
from raydiff.compat import DEEPSPEED_CHECKED, checkpoint_snapshot_name, deepspeed_checked, train_storage

logger = logging.getLogger(__name__)

DS_TAG = "deepspeed"  # one DeepSpeed tag per Ray checkpoint directory
STATE_FILE = "trainer_state.json"
EMA_FILE = "ema_unet.pt"  # a whole fp32 EMA shadow written by rank 0 (checkpoints from before the sharded EMA)
EMA_SHARD = "ema_rank{}.pt"  # each rank's slices of the EMA (raydiff.train.ema)
MANIFEST = "manifest_rank{}.json"
RNG_FILE = "rng_rank{}.pt"
UNIVERSAL = "universal"  # <checkpoint>/universal/: the checkpoint in DeepSpeed's universal format, made once
UNIVERSAL_MANIFEST = "universal/manifest.json"  # its file sizes, written last
_UNIVERSAL_MANIFEST_NAME = "manifest.json"
STAGING_PREFIX = "raydiff-ckpt-"  # local staging directories: raydiff-ckpt-<pid>-XXXX
RESUME_PREFIX = "raydiff-resume-"  # node-local copies of a checkpoint's files for a resume
COPY_CHUNK = 64 * 1024 * 1024  # large copy chunks for multi-GB shards (as Ray's own checkpoint upload uses)


class IncompleteCheckpoint(RuntimeError):
    pass


# ---------------------------------------------------------------- writing (each rank into its own local directory)


def save_rng_state(ckpt_dir: str, rank: int) -> None:
    torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
               os.path.join(ckpt_dir, RNG_FILE.format(rank)))


def load_rng_state(ckpt_dir: str, rank: int) -> bool:
    path = os.path.join(ckpt_dir, RNG_FILE.format(rank))
    if not os.path.exists(path):
        return False
    state = torch.load(path, weights_only=False)
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    return True


def write_manifest(ckpt_dir: str, rank: int) -> None:
    """List what this rank wrote; written last, so its presence means the rank's part is whole."""
    files = {}
    for root, _, names in os.walk(ckpt_dir):
        for name in names:
            path = os.path.join(root, name)
            files[os.path.relpath(path, ckpt_dir).replace(os.sep, "/")] = os.path.getsize(path)
    with open(os.path.join(ckpt_dir, MANIFEST.format(rank)), "w") as f:
        json.dump({"rank": rank, "files": files}, f)


# ---------------------------------------------------------------- uploading (Ray's upload thread, training goes on)


@dataclass
class Uploaded:
    """What one rank's upload did (the benchmark and the tests read it)."""

    path: str  # the checkpoint directory on the storage
    nbytes: int  # bytes this rank put there
    seconds: float
    renamed: bool  # moved on the same local filesystem instead of copied
    thread: str  # the thread that ran it: Ray's upload thread under CheckpointUploadMode.ASYNC


_in_flight: Future | None = None  # this process's last upload (Ray Train runs one worker per process)


def staging_dir() -> str:
    """A fresh local directory to save the next checkpoint into. Waits for the previous upload first, so a rank holds
    at most two checkpoints on local disk (one uploading, one being written) however slow the storage is."""
    wait_for_upload()
    _sweep_staging()
    return tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-")


def _sweep_staging() -> None:
    """Delete staging directories left by dead processes (a worker killed mid-upload); live ones are in use."""
    root = tempfile.gettempdir()
    for name in os.listdir(root):
        m = re.fullmatch(re.escape(STAGING_PREFIX) + r"(\d+)-.+", name)
        if m and int(m[1]) != os.getpid() and not _alive(int(m[1])):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def report(metrics: dict, local_dir: str, *, mode=None, wait: bool = False) -> None:
    """``ray.train.report`` with this rank's staged checkpoint. By default the upload is asynchronous
    (``CheckpointUploadMode.ASYNC``): Ray's upload thread runs `upload` and then deletes ``local_dir``
    (``delete_local_checkpoint_after_upload``), and Ray registers the checkpoint once every rank's upload is done, so
    a run that dies mid-upload resumes from the previous one. ``wait``: return only once uploaded (the last
    checkpoint of a run, before the export)."""
    global _in_flight
    mode = ray.train.CheckpointUploadMode.ASYNC if mode is None else mode
    fs, base = train_storage()  # where checkpoint_upload_fn must write: Ray's DeveloperAPI (raydiff.compat)
    done: Future = Future()

    def upload_fn(checkpoint, dir_name: str):
        done.set_result(upload(checkpoint.path, fs, posixpath.join(base, dir_name)))
        return ray.train.Checkpoint(posixpath.join(base, dir_name), filesystem=fs)

    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(local_dir), checkpoint_upload_mode=mode,
                     delete_local_checkpoint_after_upload=True, checkpoint_upload_fn=upload_fn)
    _in_flight = done
    if mode == ray.train.CheckpointUploadMode.SYNC and not done.done():  # Ray skipped it (a worker failed meanwhile)
        _in_flight = None
        shutil.rmtree(local_dir, ignore_errors=True)
    if wait:
        wait_for_upload()


def wait_for_upload() -> Uploaded | None:
    """Block until this process's last checkpoint upload is done (None when there was none). A failed upload is
    raised by Ray into the training loop and ends the attempt; this wait does not outlive it."""
    if _in_flight is None:
        return None
    start = time.monotonic()
    while True:
        try:
            return _in_flight.result(timeout=60)
        except TimeoutError:
            logger.info("waiting for the previous checkpoint upload (%.0f s): the storage is slower than "
                        "checkpoint.every_n_steps allows", time.monotonic() - start)


def upload(local_dir: str, fs: pafs.FileSystem, dest: str) -> Uploaded:
    """Put the files of ``local_dir`` at ``(fs, dest)``, each rank's manifest last: a rename when ``dest`` is on the
    same local filesystem (a one-node run's disk: no second 36 GB write), else a copy (NFS, another disk, S3, GCS)."""
    start = time.perf_counter()
    names = sorted(_local_files(local_dir), key=lambda n: (_is_manifest(n) or n == _UNIVERSAL_MANIFEST_NAME, n))
    fs.create_dir(dest, recursive=True)
    renamed = isinstance(fs, pafs.LocalFileSystem) and os.stat(local_dir).st_dev == os.stat(dest).st_dev
    nbytes = 0
    for name in names:
        src, target = os.path.join(local_dir, name), posixpath.join(dest, name)
        nbytes += os.path.getsize(src)
        if renamed:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(src, target)
        else:
            _copy(src, pafs.LocalFileSystem(), target, fs)
    return Uploaded(dest, nbytes, time.perf_counter() - start, renamed, threading.current_thread().name)


def _local_files(root: str) -> list[str]:
    return [os.path.relpath(os.path.join(d, n), root).replace(os.sep, "/") for d, _, names in os.walk(root)
            for n in names]


def _is_manifest(name: str) -> bool:
    return re.fullmatch(MANIFEST.format(r"\d+"), name) is not None or name == UNIVERSAL_MANIFEST


def _copy(src: str, src_fs: pafs.FileSystem, dst: str, dst_fs: pafs.FileSystem) -> None:
    # pyarrow's multi-threaded copy is unsafe for S3 uploads (apache/arrow#32372); one file at a time anyway.
    dst_fs.create_dir(posixpath.dirname(dst), recursive=True)
    pafs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs, chunk_size=COPY_CHUNK,
                    use_threads=not isinstance(dst_fs, pafs.S3FileSystem))


# ---------------------------------------------------------------- checking (on the checkpoint's own filesystem)


def _sizes(fs: pafs.FileSystem, path: str) -> dict[str, int]:
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return {posixpath.relpath(i.path, path): i.size for i in infos if i.is_file}


def check_complete(fs: pafs.FileSystem, path: str) -> None:
    """Raise IncompleteCheckpoint naming what is missing or cut short."""
    sizes = _sizes(fs, path)
    if STATE_FILE not in sizes:
        raise IncompleteCheckpoint(f"{path}: no {STATE_FILE}")
    with fs.open_input_stream(posixpath.join(path, STATE_FILE)) as f:
        world = json.loads(f.read()).get("stream", {}).get("world", 1) or 1
    for rank in range(world):
        name = MANIFEST.format(rank)
        if name not in sizes:
            raise IncompleteCheckpoint(f"{path}: rank {rank} of {world} has no {name}")
        with fs.open_input_stream(posixpath.join(path, name)) as f:
            listed = json.loads(f.read())["files"]
        for file, size in listed.items():
            if sizes.get(file) != size:
                raise IncompleteCheckpoint(f"{path}: {file} of rank {rank} is {sizes.get(file, 'missing')} "
                                           f"bytes, expected {size}")


def latest_complete(checkpoint, announce: bool = True):
    """``checkpoint`` if complete, else the newest complete checkpoint beside it (a warning names each one passed
    over, printed when ``announce``: one rank is enough); raises IncompleteCheckpoint when none is."""
    fs, parent = checkpoint.filesystem, posixpath.dirname(checkpoint.path.rstrip("/"))
    candidates = [checkpoint.path] + [p for p in _checkpoint_dirs(fs, parent) if p < checkpoint.path]
    path, problems = _first_complete(fs, candidates, announce)
    if path is None:
        raise IncompleteCheckpoint("no complete checkpoint to resume from: " + "; ".join(problems) +
                                   ". Remove the run directory's checkpoint_* folders to start over.")
    return checkpoint if path == checkpoint.path else Checkpoint(path, filesystem=fs)


def _checkpoint_dirs(fs: pafs.FileSystem, run_path: str) -> list[str]:
    """The run's checkpoint directories, newest first (Ray names them checkpoint_<time>)."""
    infos = fs.get_file_info(pafs.FileSelector(run_path, allow_not_found=True))
    return sorted((i.path for i in infos if i.type == pafs.FileType.Directory
                   and posixpath.basename(i.path).startswith("checkpoint_")), reverse=True)


def _first_complete(fs: pafs.FileSystem, candidates: list[str], announce: bool) -> tuple[str | None, list[str]]:
    problems = []
    for path in candidates:
        try:
            check_complete(fs, path)
        except IncompleteCheckpoint as err:
            problems.append(str(err))
            if announce:
                logger.warning("checkpoint %s is incomplete (%s); trying the previous one", path, err)
            continue
        return path, problems
    return None, problems


def resume_without_ray_list(run_path: str) -> str | None:
    """The checkpoint to resume from when Ray Train has no usable list of the run's checkpoints (None when it has one,
    or no checkpoint is complete). Ray rewrites that list in place at every report: a stop mid-write leaves it empty
    or cut short, and Ray then refuses to start the relaunch; without a list (set aside here by an earlier relaunch,
    or a stop before the first checkpoint was registered) Ray would start over beside complete checkpoints. A torn
    list is moved aside and, either way, the newest complete checkpoint is returned, with a warning naming each."""
    name = checkpoint_snapshot_name()
    if name is None:
        return None
    fs, base = storage.filesystem(run_path)
    snapshot = posixpath.join(base, name)
    if fs.get_file_info(snapshot).type == pafs.FileType.File:
        if _readable_json(fs, snapshot):
            return None  # Ray's to read
        aside = f"{snapshot}.torn-{time.strftime('%Y%m%d-%H%M%S')}"
        fs.move(snapshot, aside)
        logger.warning("Ray Train's checkpoint list %s is unreadable (the run was stopped while Ray rewrote it); "
                       "moved it to %s", storage.join(run_path, name), posixpath.basename(aside))
    found = _checkpoint_dirs(fs, base)
    path, _ = _first_complete(fs, found, announce=True)
    if path is None:
        if found:
            logger.warning("no complete checkpoint in %s: the run starts over", run_path)
        return None
    logger.warning("Ray Train has no list of this run's checkpoints: resuming from %s, the newest complete one. "
                   "checkpoint.keep no longer deletes the checkpoints written before it.", posixpath.basename(path))
    # A local path is made absolute (storage.filesystem): the workers may not share the driver's working directory.
    return storage.join(run_path, posixpath.basename(path)) if storage.is_uri(run_path) else path


def _readable_json(fs: pafs.FileSystem, path: str) -> bool:
    with fs.open_input_stream(path) as f:
        text = f.read()
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError both are
        return False


def handed_over(resume_from: str | None):
    """The checkpoint the driver found when Ray Train had no usable checkpoint list (resume_without_ray_list)."""
    if resume_from is None:
        return None
    fs, path = storage.filesystem(resume_from)
    return Checkpoint(path, filesystem=fs)


def saved_trainer_state(checkpoint) -> dict:
    """``checkpoint``'s trainer_state.json (step, epoch, samples seen, data position), read where it is stored."""
    with checkpoint.filesystem.open_input_stream(posixpath.join(checkpoint.path, STATE_FILE)) as f:
        return json.loads(f.read())


def to_universal(ckpt_dir: str, out_dir: str) -> str:
    """Convert the DeepSpeed part of a checkpoint to DeepSpeed's universal format (optimizer state merged per
    parameter, loadable at any world size); returns the directory to pass to ``load_checkpoint(tag=DS_TAG)``."""
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
           os.path.join(ckpt_dir, DS_TAG), "--output_folder", os.path.join(out_dir, DS_TAG),
           "--inject_missing_state", "--num_extract_workers", "1", "--num_merge_workers", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"converting checkpoint {ckpt_dir} to DeepSpeed's universal format failed:\n"
                           f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return out_dir


# ---------------------------------------------------------------- which files a rank reads (DeepSpeed's layout)

# (bf16_)zero_pp_rank_{r}_mp_rank_{m}_optim_states.pt (ZeRO 1-3, and the older "..._{m}optim_states.pt"), and
# ZeRO-3's zero_pp_rank_{r}_mp_rank_{m}_model_states.pt: data-parallel rank r's shard.
_DP_SHARD = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_?(optim|model)_states\.pt")
# Written but never read by a load with an explicit tag: DeepSpeed's tag pointers and its offline conversion scripts.
_NOT_READ = {"latest", "latest_universal", "zero_to_fp32.py", "zero_to_torch.py"}


def rank_files(names, rank: int, same_world: bool = True, elastic: bool = False) -> list[str]:
    """The files of a checkpoint (paths relative to it) that ``rank`` reads to resume: ``engine.load_checkpoint(dir,
    tag=DS_TAG)``, trainer_state.json, the EMA and its RNG state.

    Same world size (``same_world``), per DeepSpeed's load path: ZeRO 0-2 every rank reads
    ``mp_rank_00_model_states.pt`` (module, LR scheduler, step; ZeRO-0 also the optimizer); ZeRO 1-2 only its own
    ``(bf16_)zero_pp_rank_{r}_mp_rank_00_optim_states.pt`` (all of them with ``zero_optimization.elastic_checkpoint``);
    ZeRO-3 its own ``zero_pp_rank_{r}_mp_rank_00_model_states.pt`` and optimizer shard. Of raydiff's files: its own
    ``rng_rank{r}.pt`` and ``ema_rank{r}.pt``, or the whole ``ema_unet.pt`` of an older checkpoint.
    Another world size: the ``universal/`` conversion instead of ``deepspeed/`` (every parameter's merged state, read by
    every rank; ZeRO-3 model states of partition 0 only), every EMA shard (a rank's new slice spans old ones), no RNG.
    A file it does not recognise is read (never a missing file); manifests are read on the storage, not copied."""
    names = list(names)
    if not deepspeed_checked():  # outside the checked layouts a rank reads the whole checkpoint: slower, never wrong
        _warn_layout_once()
        return [n for n in names if not _is_manifest(posixpath.basename(n)) and not _is_manifest(n)]
    return [n for n in names if _reads(n, rank, same_world, elastic)]


def _reads(name: str, rank: int, same_world: bool, elastic: bool) -> bool:
    base = posixpath.basename(name)
    if _is_manifest(name) or _is_manifest(base) or base in _NOT_READ:
        return False
    shard = _DP_SHARD.fullmatch(base)
    if name.startswith(UNIVERSAL + "."):  # universal.partial-<pid>/: a conversion cut short
        return False
    if name.startswith(UNIVERSAL + "/"):  # universal loads read partition 0's model states (engine._get_all_ckpt_names)
        return not same_world and not (shard and shard[2] == "model" and int(shard[1]) != 0)
    if name.startswith(DS_TAG + "/"):
        if not same_world:
            return False
        return shard is None or int(shard[1]) == rank or (elastic and shard[2] == "optim")
    own = re.fullmatch(r"(?:rng|ema)_rank(\d+)\.pt", name)
    if own and name.startswith("rng_"):
        return same_world and int(own[1]) == rank
    if own:
        return not same_world or int(own[1]) == rank
    return True  # trainer_state.json, ema_unet.pt, anything unknown


_warned: set[str] = set()


def _warn_layout_once() -> None:
    import deepspeed  # here: only for its version, in the rare warning

    if "layout" not in _warned:
        _warned.add("layout")
        logger.warning("DeepSpeed %s is outside the versions whose checkpoint layout raydiff knows (%s): each rank "
                       "reads the whole checkpoint on resume. Run tests/test_checkpoint.py against it and widen "
                       "raydiff.compat.DEEPSPEED_CHECKED.", deepspeed.__version__, DEEPSPEED_CHECKED)


# ---------------------------------------------------------------- resuming: per-rank copies, convert once


@contextlib.contextmanager
def resume_dir(checkpoint, rank: int, world: int, *, universal: bool, barrier, elastic: bool = False,
               poll_s: float = 5.0):
    """``(ckpt_dir, load_dir)``: a local directory with the files of ``checkpoint`` this rank reads, and the one to
    pass to ``engine.load_checkpoint(load_dir, tag=DS_TAG)`` (``ckpt_dir``, or its ``universal/`` conversion when
    ``universal``: the checkpoint was written by another number of workers). Collective: every rank enters it.

    A checkpoint on a local (or NFS) path is read in place. Otherwise the files are copied from the checkpoint's
    filesystem into one directory per node (each file once per node, whichever local rank needs it first), deleted
    after every rank has loaded (``barrier``); an attempt that fails while loading leaves it for the next attempt."""
    fs, path = checkpoint.filesystem, checkpoint.path.rstrip("/")
    in_place = _is_local(fs)
    root = path if in_place else os.path.join(tempfile.gettempdir(), RESUME_PREFIX + _key(fs, path))
    if universal:
        if rank == 0:
            convert_once(fs, path, root)
        else:
            _wait_for_universal(fs, path, poll_s)
    sizes = _sizes(fs, path)
    wanted = {n: sizes[n] for n in rank_files(sizes, rank, same_world=not universal, elastic=elastic)}
    if not in_place:
        fetch(fs, path, wanted, root)
    load_dir = os.path.join(root, UNIVERSAL) if universal else root
    yield root, load_dir
    if not in_place:  # not reached when loading raised: the copies stay for the next attempt
        barrier()
        shutil.rmtree(root, ignore_errors=True)


def _is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


def _key(fs: pafs.FileSystem, path: str) -> str:
    return hashlib.sha1(f"{fs.type_name}:{path}".encode()).hexdigest()[:16]


def fetch(fs: pafs.FileSystem, path: str, files: dict[str, int], root: str) -> int:
    """Copy ``files`` ({relative name: size}) from ``(fs, path)`` to ``root``, skipping those already there with their
    size (another local rank, an earlier attempt); a lock per file lets the ranks of a node share one copy. Returns
    the bytes this process copied."""
    copied = 0
    work = os.path.join(root, ".fetch")  # locks and partial copies: kept out of the directories DeepSpeed globs
    os.makedirs(work, exist_ok=True)
    for name, size in sorted(files.items()):
        dst = os.path.join(root, name)
        if _local_size(dst) == size:
            continue
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        slug = hashlib.sha1(name.encode()).hexdigest()[:16]
        with open(os.path.join(work, slug + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if _local_size(dst) == size:
                continue
            part = os.path.join(work, f"{slug}.part-{os.getpid()}")
            _copy(posixpath.join(path, name), fs, part, pafs.LocalFileSystem())
            if _local_size(part) != size:
                raise IncompleteCheckpoint(f"{posixpath.join(path, name)}: read {_local_size(part)} bytes, "
                                           f"expected {size}")
            os.replace(part, dst)
            copied += size
    return copied


def _local_size(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def convert_once(fs: pafs.FileSystem, path: str, root: str) -> bool:
    """Rank 0: make ``<path>/universal/`` unless a complete one is there (an earlier attempt made it). ``root``: where
    the checkpoint's files are read (the checkpoint itself when local, else a node directory they are copied into).
    Returns whether it converted."""
    if _universal_done(fs, path):
        logger.info("reusing %s/%s, converted by an earlier attempt", path, UNIVERSAL)
        return False
    start = time.perf_counter()
    sizes = _sizes(fs, path)
    if not _is_local(fs):  # the conversion reads every rank's DeepSpeed files
        fetch(fs, path, {n: s for n, s in sizes.items() if n.startswith(DS_TAG + "/")}, root)
    for stale in glob.glob(os.path.join(root, f"{UNIVERSAL}.partial-*")):  # conversions cut short
        shutil.rmtree(stale, ignore_errors=True)
    partial = os.path.join(root, f"{UNIVERSAL}.partial-{os.getpid()}")
    to_universal(root, partial)
    out = {os.path.relpath(p, partial).replace(os.sep, "/"): os.path.getsize(p)
           for p in (os.path.join(d, n) for d, _, ns in os.walk(partial) for n in ns)}
    with open(os.path.join(partial, _UNIVERSAL_MANIFEST_NAME), "w") as f:
        json.dump({"files": out}, f)
    final = os.path.join(root, UNIVERSAL)
    shutil.rmtree(final, ignore_errors=True)  # a torn one from an attempt that died converting
    os.replace(partial, final)
    if not _is_local(fs):
        if fs.get_file_info(posixpath.join(path, UNIVERSAL)).type != pafs.FileType.NotFound:
            fs.delete_dir(posixpath.join(path, UNIVERSAL))
        upload(final, fs, posixpath.join(path, UNIVERSAL))
    logger.info("converted %s to DeepSpeed's universal format once, into %s/%s (%.0f s); the other ranks load it",
                path, path, UNIVERSAL, time.perf_counter() - start)
    return True


def _universal_done(fs: pafs.FileSystem, path: str) -> bool:
    if fs.get_file_info(posixpath.join(path, UNIVERSAL_MANIFEST)).type != pafs.FileType.File:
        return False  # (one request per poll; the full listing only once it is there)
    sizes = _sizes(fs, posixpath.join(path, UNIVERSAL))
    with fs.open_input_stream(posixpath.join(path, UNIVERSAL_MANIFEST)) as f:
        listed = json.loads(f.read())["files"]
    return all(sizes.get(n) == s for n, s in listed.items())


def _wait_for_universal(fs: pafs.FileSystem, path: str, poll_s: float) -> None:
    """Other ranks: wait for rank 0's conversion by polling the storage, not a collective, whose timeout (30 min by
    default) a 31 GB conversion can outlast. If rank 0 fails, Ray Train ends the whole worker group."""
    while not _universal_done(fs, path):
        time.sleep(poll_s)
