"""Every use of a library internal, in one place.

raydiff reads a few things that no public API offers. Each is an `Assumption` below: what is read, what for, the
versions it was checked on ([from, to), major.minor) and what happens without it. Its accessor checks the installed
version once per process (one warning outside the range) and, when the internal is gone, raises `BrokenAssumption`
naming it, or falls back where the feature is only a nicety. tests/test_compat.py proves every assumption on the
installed libraries. After an upgrade: run it, fix what it names, then widen the range here and in pyproject.toml.

Light on purpose: nothing heavy at import (Ray Data tasks and the Train controller import it). Each accessor imports
its library itself, so a moved internal breaks only its own use, with a message that says which.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from importlib import metadata
from typing import Any

logger = logging.getLogger(__name__)

Version = tuple[int, int]

RAY_CHECKED: tuple[Version, Version] = ((2, 60), (2, 61))  # pyproject pins ray==2.60.*, as the cluster images
# The ZeRO-1/2 fragment map (`param._hp_mapping`, raydiff.train.ema) and the checkpoint files each rank loads
# (raydiff.train.checkpoint.rank_files); tests/test_ema.py and tests/test_checkpoint.py check both on real engines.
DEEPSPEED_CHECKED: tuple[Version, Version] = ((0, 19), (0, 20))  # as pyproject: the version the tests ran on
DIFFUSERS_CHECKED: tuple[Version, Version] = ((0, 42), (0, 43))
TORCH_CHECKED: tuple[Version, Version] = ((2, 2), (2, 14))  # nn.Module.compile() exists from torch 2.2

# Ray loggers whose start-up notices raydiff.console drops (they are named after private modules).
RAY_WORKER_LOGGER = "ray._private.worker"
RAY_TOKEN_LOGGER = "ray._private.authentication.authentication_token_setup"


@dataclass(frozen=True)
class Assumption:
    library: str  # the distribution whose version is checked
    checked: tuple[Version, Version]  # [from, to)
    what: str  # the internal read
    why: str  # what raydiff needs it for, and what happens without it


ASSUMPTIONS = {
    "ray.bootstrap_address": Assumption(
        "ray", RAY_CHECKED, "ray._private.services.find_bootstrap_address",
        "the `ray start` cluster recorded on this machine, so a dead record is ignored instead of joined "
        "(raydiff.train.driver.init_ray)"),
    "ray.train_storage": Assumption(
        "ray", RAY_CHECKED, "ray.train.get_context().get_storage() (DeveloperAPI: ray.train.v2._internal's "
        "StorageContext) .storage_filesystem / .experiment_fs_path",
        "where the asynchronous checkpoint upload writes (raydiff.train.checkpoint.report)"),
    "ray.checkpoint_snapshot": Assumption(
        "ray", RAY_CHECKED, "ray.train.v2._internal.constants.CHECKPOINT_MANAGER_SNAPSHOT_FILENAME (Ray Train's list "
        "of a run's checkpoints, in the run directory, rewritten in place at every report)",
        "a list torn by a stop mid-write is set aside and the relaunch resumes from the newest complete checkpoint "
        "(raydiff.train.checkpoint.resume_without_ray_list); without the name Ray refuses to start such a run"),
    "ray.split_coordinator": Assumption(
        "ray", RAY_CHECKED, "Ray Data's StreamSplitDataIterator._coord_actor",
        "ends an epoch's execution at once (raydiff.data.loader); without it Ray stops the coordinator when its "
        "owner goes, printing a SystemExit traceback per worker"),
    "ray.preemption_notice": Assumption(
        "ray", RAY_CHECKED, "ray.train.v2._internal.execution.context.get_train_context().preemption_context"
        ".preemption_info (where Ray Train's preemption watcher puts each worker's notice)",
        "a check for a preemption notice at every optimizer step that costs one all-reduce "
        "(raydiff.train.preemption); without it, ray.train.get_preemption_info() (a barrier through an actor)"),
    "ray.asha": Assumption(
        "ray", RAY_CHECKED, "ASHAScheduler._brackets / ._trial_info / ._num_stopped and _Bracket._rungs",
        "ASHA's rungs saved and restored across an interrupted sweep (raydiff.tune.asha)"),
    "ray.logging": Assumption(
        "ray", RAY_CHECKED, f"the loggers {RAY_WORKER_LOGGER} and {RAY_TOKEN_LOGGER}, and Ray's private logging "
        "classes named in raydiff/ray_data_logging.yaml",
        "a quiet console (raydiff.console); a moved class fails Ray Data's logging set-up"),
    "deepspeed.op_table": Assumption(
        "deepspeed", DEEPSPEED_CHECKED, "deepspeed.ops.__compatible_ops__",
        "marks the CPU shared-memory comm op unusable, so a CPU run never JIT-builds it (minutes, and a build "
        "killed midway leaves a lock every later run waits on) (raydiff.train.deepspeed_setup)"),
    "deepspeed.zero_layouts": Assumption(
        "deepspeed", DEEPSPEED_CHECKED, "param._hp_mapping (the ZeRO-1/2 fragment map) and the checkpoint files "
        "each rank loads", "the sharded EMA (raydiff.train.ema) and per-rank resume reads (raydiff.train.checkpoint)"),
    "diffusers.dtype": Assumption(
        "diffusers", DIFFUSERS_CHECKED, "from_pretrained(dtype=...) (torch_dtype is deprecated)",
        "models load in the training precision; an ignored dtype would load fp32 silently"),
    "torch.compiled": Assumption(
        "torch", TORCH_CHECKED, "nn.Module._compiled_call_impl, set by Module.compile()",
        "tells whether train.compile took effect (raydiff.train.speed.is_compiled)"),
}


class BrokenAssumption(RuntimeError):
    """A library internal raydiff reads is gone or changed."""


def installed(library: str) -> Version | None:
    """major.minor of an installed distribution, without importing it (None when absent)."""
    try:
        parts = re.findall(r"\d+", metadata.version(library))
    except metadata.PackageNotFoundError:
        return None
    return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0


def in_checked_range(name: str) -> bool:
    a = ASSUMPTIONS[name]
    version = installed(a.library)
    return version is not None and a.checked[0] <= version < a.checked[1]


@functools.cache
def check(name: str) -> bool:
    """Whether the installed library is in the range ``name`` was checked on; outside it, one warning a process."""
    ok = in_checked_range(name)
    if not ok:
        a = ASSUMPTIONS[name]
        logger.warning("%s %s is outside the versions raydiff checked %s on [%s, %s): run tests/test_compat.py",
                       a.library, _fmt(installed(a.library)), a.what, _fmt(a.checked[0]), _fmt(a.checked[1]))
    return ok


def broken(name: str, err: BaseException | str) -> BrokenAssumption:
    a = ASSUMPTIONS[name]
    return BrokenAssumption(
        f"{a.what} is gone or changed in {a.library} {_fmt(installed(a.library))} ({err}); raydiff reads it for "
        f"{a.why}. Checked on {a.library} [{_fmt(a.checked[0])}, {_fmt(a.checked[1])}): run tests/test_compat.py "
        "and adapt raydiff/compat.py")


def _fmt(version: Version | None) -> str:
    return "(not installed)" if version is None else ".".join(map(str, version))


def _attr(name: str, obj: Any, attr: str) -> Any:
    check(name)
    try:
        return getattr(obj, attr)
    except AttributeError as err:
        raise broken(name, err) from err


# ---------------------------------------------------------------- Ray


def find_bootstrap_address(temp_dir: str | None) -> str | None:
    """The address of the cluster a `ray start` on this machine recorded (where ``ray.init()`` itself looks)."""
    check("ray.bootstrap_address")
    try:
        from ray._private.services import find_bootstrap_address as find
    except ImportError as err:
        raise broken("ray.bootstrap_address", err) from err
    return find(temp_dir)


def storage_paths(storage: Any) -> tuple[Any, str]:
    """(pyarrow filesystem, experiment directory) of a Ray Train StorageContext."""
    return (_attr("ray.train_storage", storage, "storage_filesystem"),
            _attr("ray.train_storage", storage, "experiment_fs_path"))


def train_storage() -> tuple[Any, str]:
    """(pyarrow filesystem, experiment directory) of the Ray Train run this worker belongs to."""
    import ray.train

    return storage_paths(ray.train.get_context().get_storage())


def checkpoint_snapshot_name() -> str | None:
    """The file name of Ray Train's checkpoint list in a run directory (None, with a warning, when it is gone)."""
    check("ray.checkpoint_snapshot")
    try:
        from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
    except ImportError as err:
        logger.warning("%s", broken("ray.checkpoint_snapshot", err))
        return None
    return CHECKPOINT_MANAGER_SNAPSHOT_FILENAME


def split_coordinator(iterator: Any) -> Any:
    """The split coordinator actor behind a ``Dataset.streaming_split`` iterator, or None when it cannot be found
    (then the caller stops only what it owns, and Ray ends the coordinator later)."""
    if check("ray.split_coordinator") and not hasattr(iterator, "_coord_actor"):
        logger.warning("%s", broken("ray.split_coordinator", f"{type(iterator).__name__} has no _coord_actor"))
    return getattr(iterator, "_coord_actor", None)


def preemption_notice() -> Any:
    """This worker's copy of Ray Train's preemption notice (a ``ray.train.PreemptionInfo``, or None when no node of
    the worker group is being drained), read without a barrier. Call it on every rank at the same points: where the
    internal is gone, the public ``ray.train.get_preemption_info()`` (a barrier across the workers) is used instead."""
    check("ray.preemption_notice")
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        return get_train_context().preemption_context.preemption_info
    except (ImportError, AttributeError) as err:
        _warn_once(str(broken("ray.preemption_notice", err)))
    import ray.train

    return ray.train.get_preemption_info()


@functools.cache
def _warn_once(message: str) -> None:
    logger.warning("%s", message)


def asha_brackets(scheduler: Any) -> list:
    return _attr("ray.asha", scheduler, "_brackets")


def asha_trial_brackets(scheduler: Any) -> dict:
    """{trial_id: bracket}, the live dict (assignments stick)."""
    return _attr("ray.asha", scheduler, "_trial_info")


def asha_rungs(bracket: Any) -> list:
    """[(milestone, {trial_id: recorded reward})], the live dicts (updates stick)."""
    return _attr("ray.asha", bracket, "_rungs")


def asha_num_stopped(scheduler: Any) -> int:
    return _attr("ray.asha", scheduler, "_num_stopped")


def set_asha_num_stopped(scheduler: Any, n: int) -> None:
    asha_num_stopped(scheduler)  # present, so the assignment below updates ASHA's own counter
    scheduler._num_stopped = n


# ---------------------------------------------------------------- DeepSpeed


def deepspeed_checked() -> bool:
    """Whether the installed DeepSpeed's private layouts (ZeRO fragments, checkpoint files) are ones raydiff knows."""
    return in_checked_range("deepspeed.zero_layouts")


def disable_deepspeed_op(op_name: str) -> None:
    """Mark a DeepSpeed op incompatible, so DeepSpeed never builds or loads it in this process."""
    check("deepspeed.op_table")
    import deepspeed.ops

    try:
        table = deepspeed.ops.__compatible_ops__
    except AttributeError as err:
        raise broken("deepspeed.op_table", err) from err
    if op_name not in table:
        raise broken("deepspeed.op_table", f"no op named {op_name!r}")
    table[op_name] = False


def has_fragment_map(param: Any) -> bool:
    """Whether a parameter belongs to a ZeRO-1/2 (or bf16) optimizer's flat fp32 partitions."""
    return hasattr(param, "_hp_mapping")


def fragment(param: Any) -> tuple[int, Any] | None:
    """(start in the flattened parameter, live fp32 master slice) of this rank's piece of a ZeRO-1/2 parameter, or
    None when this rank's partition holds none of it."""
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is None:
        return None
    try:
        return mapping.lp_fragment_address.start, mapping.get_hp_fragment().view(-1)
    except AttributeError as err:
        raise broken("deepspeed.zero_layouts", err) from err


# ---------------------------------------------------------------- diffusers, torch


def diffusers_dtype_kwarg(dtype: Any) -> dict[str, Any]:
    """The ``from_pretrained`` keyword for the load dtype: ``dtype`` (diffusers deprecates ``torch_dtype``)."""
    check("diffusers.dtype")
    return {"dtype": dtype}


def is_compiled(module: Any) -> bool:
    """Whether ``module.compile()`` was called (torch keeps the compiled forward in a private slot)."""
    check("torch.compiled")
    return getattr(module, "_compiled_call_impl", None) is not None
