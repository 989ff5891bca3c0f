"""A worker's checkpoints: when to save one, what it holds, and how a worker resumes from one.

A checkpoint holds everything an unbroken run would have at its step: every rank's DeepSpeed shards, the trainer state
(step, epoch, samples seen and every rank's data position), the EMA shards, every rank's RNG state, and a manifest per
rank written last (raydiff.train.checkpoint has the file-level helpers). How many are kept is Ray's
CheckpointConfig(num_to_keep=checkpoint.keep), set by the driver: Ray deletes the older ones.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field

import ray.train
import torch.distributed as dist

from raydiff.data.stream import StreamPosition
from raydiff.train import checkpoint as ckpt
from raydiff.train.checkpoint import DS_TAG, STATE_FILE
from raydiff.train.ema import ShardedEMA

logger = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Resume state kept outside DeepSpeed's own files."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch of the last sample trained on
    samples_seen: int = 0  # global, across workers
    stream: dict = field(default_factory=dict)  # the data position: a raydiff.data.stream.StreamPosition


class Checkpointer:
    """Saves every `every_n_steps` optimizer steps and at `max_steps`; resumes from the checkpoint Ray hands over."""

    def __init__(self, every_n_steps: int, max_steps: int, rank: int, world: int):
        self.every_n_steps, self.max_steps = every_n_steps, max_steps
        self.rank, self.world = rank, world
        self.checkpoint: ray.train.Checkpoint | None = None  # the one to resume from (find)
        self.universal = False  # it was written by another number of workers
        self.saved = TrainState()  # its trainer state (find)
        self.saved_step: int | None = None  # of this attempt's last checkpoint
        self.write_s = self.upload_s = 0.0  # how long this rank's last checkpoint took to write, to upload

    @property
    def resumed(self) -> bool:
        return self.checkpoint is not None

    def due(self, step: int) -> bool:
        return step % self.every_n_steps == 0 or step >= self.max_steps

    def find(self, checkpoint: ray.train.Checkpoint | None, resume_from: str | None = None) -> None:
        """From Ray's latest checkpoint (ray.train.get_checkpoint()), else the one the driver found when Ray had no
        usable checkpoint list (`resume_from`, ckpt.resume_without_ray_list), the newest complete one, and whether it
        was written by another number of workers (then DeepSpeed must load it as a universal checkpoint)."""
        checkpoint = checkpoint or ckpt.handed_over(resume_from)
        self.checkpoint = ckpt.latest_complete(checkpoint, self.rank == 0) if checkpoint is not None else None
        self.saved = TrainState(**ckpt.saved_trainer_state(self.checkpoint)) if self.checkpoint else TrainState()
        saved_world = int(self.saved.stream.get("world", 0) or 0)
        self.universal = saved_world not in (0, self.world)
        if self.universal and self.rank == 0:
            logger.info("checkpoint written by %s workers, resuming on %s: converting it to DeepSpeed's universal "
                        "format (once, on rank 0)", saved_world, self.world)

    def position(self, batch_size: int) -> StreamPosition:
        """This world's data position in the stream after the checkpoint found (the start without one): known
        before the engine is built, so the data stream can start first."""
        saved = StreamPosition(**self.saved.stream) if self.saved.stream else StreamPosition()
        return saved.continue_with(self.world, batch_size)

    def restore(self, engine, ema: ShardedEMA | None, batch_size: int) -> tuple[TrainState, StreamPosition]:
        """Loads weights, optimizer, LR schedule, EMA and RNGs into place; returns the trainer state and this world's
        data position (so the next batch is the one the unbroken run would train on). Collective."""
        state, checkpoint = copy.deepcopy(self.saved), self.checkpoint
        if checkpoint is not None:
            # Only the files this rank reads; another world size is converted once, by rank 0 (train/checkpoint.py).
            with ckpt.resume_dir(checkpoint, self.rank, self.world, universal=self.universal, barrier=dist.barrier,
                                 elastic=engine.zero_elastic_checkpoint()) as (ckpt_dir, load_dir):
                engine.load_checkpoint(load_dir, tag=DS_TAG)
                if ema is not None:
                    ema.load(ckpt_dir)
                if state.stream.get("world") == self.world:
                    ckpt.load_rng_state(ckpt_dir, self.rank)
        self.saved_step = state.step if checkpoint is not None else None
        stream = self.position(batch_size)
        if checkpoint is not None and self.rank == 0:
            logger.info("resumed from %s at step %s (epoch %s, data position %s)", checkpoint.path, state.step,
                        state.epoch, stream.samples_consumed())
        return state, stream

    @property
    def save_s(self) -> float:
        """How long a checkpoint takes this rank to write and upload, as last measured (0 before the first)."""
        return self.write_s + self.upload_s

    def save(self, metrics: dict, engine, ema: ShardedEMA | None, state: TrainState, stream: StreamPosition,
             wait: bool = False) -> None:
        """Reports `metrics` to Ray with a checkpoint. Every rank saves its part to local disk, uploaded in the
        background (raydiff.train.checkpoint.report) unless `wait`; `state.stream` becomes every rank's data
        position. Collective."""
        places = [None] * self.world  # every rank's data position goes into rank 0's trainer_state.json
        dist.all_gather_object(places, (stream.consumed[self.rank], stream.emitted[self.rank]))
        state.stream = dataclasses.asdict(dataclasses.replace(
            stream, consumed=[c for c, _ in places], emitted=[list(e) for _, e in places]))
        previous = ckpt.wait_for_upload()  # one upload in flight at most (staging_dir waits too)
        self.upload_s = previous.seconds if previous is not None else self.upload_s
        start = time.perf_counter()
        tmp = ckpt.staging_dir()
        try:
            engine.save_checkpoint(tmp, tag=DS_TAG)
            if self.rank == 0:
                with open(os.path.join(tmp, STATE_FILE), "w") as f:
                    json.dump(dataclasses.asdict(state), f)
            if ema is not None:
                ema.save(tmp)
            ckpt.save_rng_state(tmp, self.rank)
            ckpt.write_manifest(tmp, self.rank)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        # Ray's upload thread uploads and deletes it while training goes on; the run's last checkpoint is waited for,
        # so that nothing after it (the export) can fail before it is safe.
        self.write_s, self.saved_step = time.perf_counter() - start, state.step
        ckpt.report(metrics, tmp, wait=wait or state.step >= self.max_steps)
        if wait:  # done by now: its duration
            uploaded = ckpt.wait_for_upload()
            self.upload_s = uploaded.seconds if uploaded is not None else self.upload_s
