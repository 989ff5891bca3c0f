"""A worker's step metrics and when to log and report them.

Every `train.log_every_n_steps` optimizer steps, rank 0 appends a row to metrics.jsonl (raydiff.train.metrics_log),
and prints a progress line if `train.progress_every_s` have passed since its last one; every
`train.report_every_n_steps` (and whenever a validation or a checkpoint is due) every rank reports the row to Ray
Train, whose controller mirrors it to TensorBoard and MLflow (raydiff.train.tracking.RunTracker).
"""

from __future__ import annotations

import logging
import time

import torch
import torch.distributed as dist

from raydiff import storage
from raydiff.config import TrainSection
from raydiff.data import stats
from raydiff.train.metrics_log import MetricsLog

logger = logging.getLogger(__name__)


class MetricsLogger:
    """The mean loss over the steps since the last row (across ranks), the learning rate, training samples/s over
    that window, gamma and the data counters; rank 0's metrics.jsonl rows and progress lines."""

    def __init__(self, t: TrainSection, run_dir: str, rank: int, world: int, device: torch.device,
                 stats_actor: str | None, gamma: float):
        self.max_steps, self.log_every, self.report_every = t.max_steps, t.log_every_n_steps, t.report_every_n_steps
        # Console lines by time, like a progress bar: at tens of steps/s a line per step costs the worker, Ray's log
        # monitor and the driver CPU time, and scrolls past unread.
        self.progress_every_s, self.last_line = t.progress_every_s, -float("inf")
        self.global_batch = t.batch_size * t.grad_accum * world  # samples per optimizer step, all ranks
        self.path = storage.join(run_dir, "metrics.jsonl")
        self.rank, self.world, self.device = rank, world, device
        self.stats_actor = stats_actor  # the run's data counter actor (raydiff.data.stats)
        self.data_counts: dict[str, int] = {}  # its counters as of the last report
        self.log: MetricsLog | None = None  # rank 0's, opened by start()
        self.loss_sum, self.loss_count = torch.zeros((), device=device), 0  # micro-steps since the last row
        self.gamma = gamma  # of the last micro-step (a tensor under random strength: read at log time, no sync)
        self.window_start, self.window_steps = time.perf_counter(), 0  # optimizer steps since the last row
        self.run_start, self.start_step = time.perf_counter(), 0  # for the ETA

    def start(self, step: int, resumed: bool) -> None:
        """Open metrics.jsonl and start the clocks. Rows up to the restored step stay; a start from scratch (also
        after a failure before any checkpoint) logs everything again, from the step-0 baseline."""
        self.log = MetricsLog(self.path, step if resumed else -1) if self.rank == 0 else None
        self.window_start, self.window_steps, self.start_step = time.perf_counter(), 0, step
        self.run_start = time.perf_counter()

    def due(self, step: int, must_report: bool) -> tuple[bool, bool]:
        """(log, report) at this optimizer step; `must_report`: a validation or checkpoint is due, which Ray must
        get. Every report is also logged."""
        report = step % self.report_every == 0 or must_report
        return report or step % self.log_every == 0, report

    def add(self, loss: torch.Tensor, gamma: float | torch.Tensor) -> None:
        """One micro-step's detached loss and gamma (no host sync)."""
        self.loss_sum += loss
        self.loss_count += 1
        self.gamma = gamma

    def step_done(self) -> None:
        self.window_steps += 1

    def collect(self, step: int, epoch: int, lr: float, refresh_data: bool) -> dict:
        """The step's metrics (collective: the loss is averaged over ranks); starts the next loss window.
        `refresh_data`: read the data counters again (an actor round trip: done when Ray gets a report)."""
        if refresh_data or not self.data_counts:
            self.data_counts = stats.metrics(self.stats_actor)
        loss = (self.loss_sum / max(self.loss_count, 1)).detach().clone()
        self.loss_sum, self.loss_count = torch.zeros((), device=self.device), 0
        dist.all_reduce(loss)
        elapsed = max(time.perf_counter() - self.window_start, 1e-9)
        return {"step": step, "epoch": epoch, "loss": loss.item() / self.world, "lr": lr,
                "samples_per_s": self.window_steps * self.global_batch / elapsed, "gamma": float(self.gamma),
                **self.layout(), "time": time.time(), **self.data_counts}

    def layout(self) -> dict:
        """Workers and global batch of the row's step: an elastic run's change with the cluster."""
        return {"world_size": self.world, "global_batch": self.global_batch}

    def restart_window(self) -> None:
        """samples_per_s measures training only: called after validation, logging and checkpointing."""
        self.window_start, self.window_steps = time.perf_counter(), 0

    def baseline(self, val_metrics: dict, gamma: float) -> dict:
        """The step-0 row of the untrained model (so every curve starts from the same point), written on rank 0."""
        row = {"step": 0, "epoch": 0, **val_metrics, "gamma": gamma, **self.layout(), "time": time.time()}
        if self.log is not None:
            self.log.append(row)
            logger.info("step 0/%d | val_loss %.4f (untrained)", self.max_steps, row["val_loss"])
        return row

    def write(self, metrics: dict) -> None:
        """Rank 0: the metrics.jsonl row and the progress line."""
        if self.log is None:
            return
        self.log.append(metrics)
        now = time.perf_counter()
        if "val_loss" in metrics or metrics["step"] >= self.max_steps or now - self.last_line >= self.progress_every_s:
            self.last_line = now
            logger.info("%s", self.progress_line(metrics))

    def progress_line(self, m: dict) -> str:
        """A logged step's line; val_loss only when just computed."""
        done = m["step"] - self.start_step
        per_step = (time.perf_counter() - self.run_start) / max(done, 1)
        eta = per_step * (self.max_steps - m["step"])
        val = f" | val_loss {m['val_loss']:.4f}" if "val_loss" in m else ""
        return (f"step {m['step']}/{self.max_steps} | loss {m['loss']:.4f}{val} | "
                f"{m['samples_per_s']:.1f} samples/s | lr {m['lr']:.2e} | ETA {eta:.0f}s")
