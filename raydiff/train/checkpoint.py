"""What a Ray checkpoint of a run holds, and how a restart finds the newest complete one.

One checkpoint directory = every rank's DeepSpeed shards (tag ``deepspeed``: UNet, optimizer, LR scheduler, step)
+ ``trainer_state.json`` (step, epoch, the data stream position) + ``ema_unet.pt`` + ``rng_rank{r}.pt`` (torch, numpy
and Python RNG states of each rank) + ``manifest_rank{r}.json`` (name and size of every file that rank wrote,
written last). A checkpoint is complete when every rank's manifest is there and every file it lists has its size;
a torn one (a copy cut short, a lost upload) is passed over for the previous complete one, with a warning.
"""

from __future__ import annotations

import json
import os
import posixpath
import random

import numpy as np
import pyarrow.fs as pafs
import torch

DS_TAG = "deepspeed"  # one DeepSpeed tag per Ray checkpoint directory
STATE_FILE = "trainer_state.json"
EMA_FILE = "ema_unet.pt"  # fp32 EMA shadow of the UNet (rank 0 writes it; identical on every rank under ZeRO 0-2)
MANIFEST = "manifest_rank{}.json"
RNG_FILE = "rng_rank{}.pt"


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
    from ray.train import Checkpoint

    fs, parent = checkpoint.filesystem, posixpath.dirname(checkpoint.path.rstrip("/"))
    siblings = fs.get_file_info(pafs.FileSelector(parent, allow_not_found=True))
    names = sorted((i.path for i in siblings if i.type == pafs.FileType.Directory
                    and posixpath.basename(i.path).startswith("checkpoint_")), reverse=True)
    candidates = [checkpoint.path] + [p for p in names if p < checkpoint.path]
    problems = []
    for path in candidates:
        try:
            check_complete(fs, path)
        except IncompleteCheckpoint as err:
            problems.append(str(err))
            if announce:
                print(f"[raydiff] WARNING: checkpoint {path} is incomplete ({err}); trying the previous one", flush=True)
            continue
        return checkpoint if path == checkpoint.path else Checkpoint(path, filesystem=fs)
    raise IncompleteCheckpoint("no complete checkpoint to resume from: " + "; ".join(problems) +
                               ". Remove the run directory's checkpoint_* folders to start over.")


def saved_world_size(checkpoint) -> int:
    """How many workers wrote ``checkpoint`` (from its trainer_state.json; 0 when it does not say)."""
    with checkpoint.filesystem.open_input_stream(posixpath.join(checkpoint.path, STATE_FILE)) as f:
        return int(json.loads(f.read()).get("stream", {}).get("world", 0) or 0)


def to_universal(ckpt_dir: str, out_dir: str) -> str:
    """Convert the DeepSpeed part of a checkpoint to DeepSpeed's universal format (optimizer state merged per
    parameter, loadable at any world size); returns the directory to pass to ``load_checkpoint(tag=DS_TAG)``."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
           os.path.join(ckpt_dir, DS_TAG), "--output_folder", os.path.join(out_dir, DS_TAG),
           "--inject_missing_state", "--num_extract_workers", "1", "--num_merge_workers", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"converting checkpoint {ckpt_dir} to DeepSpeed's universal format failed:\n"
                           f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return out_dir
