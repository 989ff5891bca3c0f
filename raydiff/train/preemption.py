"""A just-in-time checkpoint when a node of the worker group is about to be preempted (`checkpoint.on_preemption`).

Ray Train 2.60 watches the group's nodes: one actor asks the GCS every RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S seconds
which nodes are being drained (what the autoscaler does before it reclaims a spot node, and what `ray drain-node
--reason DRAIN_NODE_REASON_PREEMPTION` does by hand) and hands every worker the notice: a `ray.train.PreemptionInfo`
with the nodes, their ranks and the deadline. Workers get it at slightly different moments, so at each optimizer step
boundary the ranks agree on it with one all-reduce of three integers on the CPU (gloo: no GPU sync): the most drained
nodes any rank has seen, the earliest deadline, and the longest checkpoint any rank has measured. Each newly drained
node is acted on once, at the same step on every rank:

- the checkpoint fits before the deadline: every rank saves it, waits until it is on the storage, then holds. Ray
  Train restarts the group without the drained node once the deadline passes; steps trained meanwhile would be lost
  at that restart, so none are. The restarted group resumes from exactly this step.
- it does not fit: the log says so and training goes on; a restart resumes from the last periodic checkpoint.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from raydiff import compat

logger = logging.getLogger(__name__)

NO_DEADLINE_MS = 2**62  # a notice without a deadline, and the share of a rank that has no notice yet
MARGIN = 1.25  # a checkpoint is attempted when the time left exceeds its last measured duration times this
RAY_DEFAULT_DEADLINE_S = 120.0  # Ray Train's wait after a notice without a deadline (DEFAULT_PREEMPTION_DEADLINE_S)
HOLD_SLACK_S = 300.0  # past the deadline, a group still not restarted fails instead of holding forever


@dataclass(frozen=True)
class Notice:
    """A preemption notice as every rank agreed on it at one step boundary."""

    nodes: int  # drained nodes of the group (the most any rank has seen)
    deadline_ms: int | None  # UNIX ms; None: the drain gave none
    need_s: float  # the longest checkpoint (write + upload) any rank has measured; 0 before the first
    left_s: float | None  # until the deadline, by rank 0's clock

    @property
    def fits(self) -> bool:
        return self.left_s is None or self.left_s > self.need_s * MARGIN


class PreemptionWatch:
    """Decides at every optimizer step boundary whether to save a just-in-time checkpoint (collective)."""

    def __init__(self, rank: int, read_notice: Callable[[], Any] = compat.preemption_notice):
        """`read_notice`: this worker's latest `ray.train.PreemptionInfo` or None (Ray Train's, by default)."""
        self.rank, self.read_notice = rank, read_notice
        self.handled = 0  # drained nodes already acted on
        self.group: Any = False  # the CPU group of the flag all-reduce, made at the first check (a collective)
        self.info = None  # the last notice this rank read (for the log)

    def check(self, save_s: float) -> Notice | None:
        """The notice to act on at this step, or None; every rank calls it at every optimizer step boundary.
        `save_s`: how long this rank's last checkpoint took to write and upload (0: none yet)."""
        self.info = self.read_notice()
        nodes, deadline_ms, need_ms = self._agree(self.info, save_s)
        if nodes <= self.handled:
            return None
        self.handled = nodes
        deadline = deadline_ms if deadline_ms < NO_DEADLINE_MS else None
        return Notice(nodes, deadline, need_ms / 1000, self._left_s(deadline))

    def _cpu_group(self):
        """None (the default group) when it is gloo already; else one gloo group, so the flag never touches a GPU."""
        if self.group is False:
            self.group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        return self.group

    def _agree(self, info, save_s: float) -> tuple[int, int, int]:
        """(most drained nodes seen, earliest deadline in ms, longest checkpoint in ms) over the ranks."""
        nodes = len(info.preempted_node_ids) if info is not None else 0
        deadline = info.deadline_ms if info is not None and info.deadline_ms else NO_DEADLINE_MS
        flags = torch.tensor([nodes, -deadline, int(save_s * 1000)], dtype=torch.int64)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._cpu_group())
        return int(flags[0]), -int(flags[1]), int(flags[2])

    def _left_s(self, deadline_ms: int | None) -> float | None:
        """Seconds to the deadline by rank 0's clock, so every rank takes the same decision (a rare collective)."""
        if deadline_ms is None:
            return None
        now = torch.tensor([time.time() * 1000], dtype=torch.float64)
        dist.broadcast(now, src=0, group=self._cpu_group())
        return (deadline_ms - now.item()) / 1000

    # ------------------------------------------------------------ what rank 0 logs, and the hold

    def announce(self, notice: Notice, step: int, last_saved: int | None) -> None:
        if self.rank != 0:
            return
        ranks = sorted(self.info.preempted_ranks) if self.info is not None else "?"
        left = f"deadline in {notice.left_s:.0f} s" if notice.left_s is not None else "no deadline given"
        took = f"the last checkpoint took {notice.need_s:.1f} s" if notice.need_s else "no checkpoint timed yet"
        if notice.fits:
            logger.info("preemption notice: %d node(s) of the group (ranks %s) are being drained, %s: saving a "
                        "checkpoint at step %d (%s)", notice.nodes, ranks, left, step, took)
        else:
            since = f"the checkpoint at step {last_saved}" if last_saved else "the start"
            logger.warning("preemption notice: %d node(s) of the group (ranks %s) are being drained, %s, too short "
                           "for a checkpoint (%s): not saving; a restart resumes from %s", notice.nodes, ranks, left,
                           took, since)

    def hold(self, notice: Notice, step: int, durable_s: float) -> None:
        """After the just-in-time checkpoint: train no further (those steps would be lost), let Ray Train restart
        the group once the drained node is gone (at the deadline), and fail if that never comes."""
        if self.rank == 0:
            logger.info("checkpoint at step %d is on the storage %.1f s after the notice was acted on; waiting for "
                        "Ray Train to restart the group without the drained node(s)", step, durable_s)
        limit = time.monotonic() + (notice.left_s if notice.left_s is not None else RAY_DEFAULT_DEADLINE_S)
        while time.monotonic() < limit + HOLD_SLACK_S:
            time.sleep(1.0)
        raise RuntimeError(f"Ray Train did not restart the worker group within {HOLD_SLACK_S:.0f} s of the "
                           f"preemption deadline; the run resumes from the checkpoint at step {step}")
