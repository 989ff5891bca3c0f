"""Every library internal raydiff reads (raydiff.compat) holds on the installed libraries, which are the versions it
was checked on, and pyproject.toml allows only those. A failure here after an upgrade names what moved."""

from __future__ import annotations

import importlib
import logging
import re
import tomllib
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from raydiff import compat

ROOT = Path(__file__).resolve().parents[1]


def _version(v: compat.Version) -> Version:
    return Version(f"{v[0]}.{v[1]}")


def _requirements() -> dict[str, Requirement]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {r.name: r for r in map(Requirement, deps)}


@pytest.mark.parametrize("name", sorted(compat.ASSUMPTIONS))
def test_installed_version_is_one_the_assumption_was_checked_on(name: str) -> None:
    a = compat.ASSUMPTIONS[name]
    assert compat.in_checked_range(name), (f"{a.library} {compat.installed(a.library)} is outside {a.checked} "
                                           f"for {a.what}: prove it (below), then widen raydiff.compat")


@pytest.mark.parametrize("library", ["ray", "deepspeed", "diffusers"])
def test_pyproject_allows_only_checked_versions(library: str) -> None:
    """Every x.y the requirement admits (up to its upper bound) lies in each range checked for that library."""
    spec = _requirements()[library].specifier
    ranges = [a.checked for a in compat.ASSUMPTIONS.values() if a.library == library]
    allowed = [Version(f"{major}.{minor}.0") for major in range(4) for minor in range(100)]
    allowed = [v for v in allowed if spec.contains(v) or spec.contains(f"{v.major}.{v.minor}.99")]
    assert allowed, f"pyproject.toml admits no {library} version"
    for lo, hi in ranges:
        assert all(_version(lo) <= v < _version(hi) for v in allowed), \
            f"pyproject.toml {library}{spec} admits versions outside the checked [{lo}, {hi})"


def test_cluster_images_run_the_pinned_ray() -> None:
    pinned = _requirements()["ray"].specifier
    image = re.search(r"^FROM rayproject/ray:([\d.]+)-", (ROOT / "cluster" / "Dockerfile").read_text(), re.M)[1]
    assert pinned.contains(image), f"cluster/Dockerfile runs Ray {image}; pyproject.toml pins ray{pinned}"


# ---------------------------------------------------------------- each assumption, on real objects


def _bootstrap_address(request) -> None:
    temp = request.getfixturevalue("tmp_path")
    assert compat.find_bootstrap_address(str(temp)) is None
    (temp / "ray_current_cluster").write_text("10.0.0.1:6379\n")
    assert compat.find_bootstrap_address(str(temp)) == "10.0.0.1:6379"


def _train_storage(request) -> None:
    from ray.train.v2._internal.execution.context import TrainContext
    from ray.train.v2._internal.execution.storage import StorageContext

    # What ray.train.get_context().get_storage() returns in a worker (TrainContext.get_storage).
    assert TrainContext.__annotations__["storage_context"] in (StorageContext, "StorageContext")
    storage = StorageContext(str(request.getfixturevalue("tmp_path")), "experiment")
    fs, path = compat.storage_paths(storage)
    assert fs.get_file_info(path).is_file is False and path.endswith("/experiment")


def _preemption_notice(request) -> None:
    import inspect

    from ray.train import PreemptionInfo
    from ray.train.v2._internal.execution import context
    from ray.train.v2._internal.execution.preemption import PreemptionContext
    from ray.train.v2._internal.execution.worker_group.worker import RayTrainWorker

    # Where the watcher's notice lands in a worker (RayTrainWorker.mark_preempt), and what compat reads it from.
    assert "train_context.preemption_context.preemption_info = info" in inspect.getsource(RayTrainWorker.mark_preempt)
    assert context.TrainContext.__annotations__["preemption_context"] in (PreemptionContext, "PreemptionContext")
    info = PreemptionInfo(deadline_ms=1_000, preempted_node_to_ranks={"node": [1]})
    for notice in (None, info):
        context.set_train_context(SimpleNamespace(preemption_context=PreemptionContext(notice)))
        try:
            assert compat.preemption_notice() is notice
        finally:
            context.set_train_context(None)


def _checkpoint_snapshot(request) -> None:
    from ray.train import CheckpointConfig
    from ray.train.v2._internal.exceptions import CheckpointManagerInitializationError
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import CheckpointManager
    from ray.train.v2._internal.execution.storage import StorageContext

    storage = StorageContext(str(request.getfixturevalue("tmp_path")), "experiment")
    snapshot = storage.checkpoint_manager_snapshot_path
    assert snapshot.endswith("/experiment/" + compat.checkpoint_snapshot_name())
    # What raydiff.train.checkpoint.resume_without_ray_list saves a relaunch from: Ray refuses an empty list.
    storage.storage_filesystem.create_dir(storage.experiment_fs_path)
    with storage.storage_filesystem.open_output_stream(snapshot):
        pass
    with pytest.raises(CheckpointManagerInitializationError, match="Expecting value"):
        CheckpointManager(CheckpointConfig(), storage)
    storage.storage_filesystem.delete_file(snapshot)
    CheckpointManager(CheckpointConfig(), storage)  # none: a fresh list


def _split_coordinator(request) -> None:
    import inspect

    import ray.data
    from ray.data._internal.iterator.stream_split_iterator import StreamSplitDataIterator

    assert "StreamSplitDataIterator.create" in inspect.getsource(ray.data.Dataset.streaming_split)
    coordinator = object()
    assert compat.split_coordinator(StreamSplitDataIterator(coordinator, 0, 1)) is coordinator


def _asha(request) -> None:
    from ray.tune.schedulers import ASHAScheduler

    asha = ASHAScheduler(time_attr="step", max_t=8, grace_period=2, reduction_factor=2, metric="val_loss", mode="min")
    trial = SimpleNamespace(trial_id="t")
    asha.on_trial_add(None, trial)
    asha.on_trial_result(None, trial, {"step": 2, "val_loss": 0.5})
    (bracket,) = compat.asha_brackets(asha)
    assert compat.asha_trial_brackets(asha) == {"t": bracket}
    assert [m for m, _ in compat.asha_rungs(bracket)] == [8, 4, 2]
    assert compat.asha_rungs(bracket)[-1][1] == {"t": -0.5}  # rewards are recorded signed for "max"
    compat.set_asha_num_stopped(asha, 3)
    assert compat.asha_num_stopped(asha) == 3 and "num_stopped=3" in asha.debug_string()


def _ray_logging(request) -> None:
    for name in (compat.RAY_WORKER_LOGGER, compat.RAY_TOKEN_LOGGER):
        assert importlib.import_module(name).logger.name == name
    config = yaml.safe_load((ROOT / "raydiff" / "ray_data_logging.yaml").read_text())
    classes = [spec.get("class") or spec.get("()") for part in ("filters", "handlers")
               for spec in config[part].values()]
    ray_classes = [c for c in classes if c.startswith("ray.")]
    assert len(ray_classes) == 3
    for dotted in ray_classes:
        module, _, attr = dotted.rpartition(".")
        assert hasattr(importlib.import_module(module), attr), dotted


def _op_table(request) -> None:
    import deepspeed.ops

    from raydiff.train.deepspeed_setup import SHM_COMM_OP

    compat.disable_deepspeed_op(SHM_COMM_OP)
    assert deepspeed.ops.__compatible_ops__[SHM_COMM_OP] is False
    comm = importlib.import_module("deepspeed.comm.torch")  # (`deepspeed.comm.torch` as an attribute is torch)
    assert comm.build_shm_op() is None  # the table is consulted: the op is neither built nor loaded
    with pytest.raises(compat.BrokenAssumption, match="no op named 'no_such_op'.*tests/test_compat.py"):
        compat.disable_deepspeed_op("no_such_op")


def _zero_layouts(request) -> None:
    # The fragment map and the checkpoint files are proven on real ZeRO engines by tests/test_ema.py and
    # tests/test_checkpoint.py (fast lane); here, what a parameter outside ZeRO-1/2 looks like.
    import torch

    param = torch.nn.Parameter(torch.zeros(3))
    assert compat.deepspeed_checked() and not compat.has_fragment_map(param) and compat.fragment(param) is None


def _diffusers_dtype(request) -> None:
    import torch
    from diffusers import StableDiffusionXLPipeline

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*dtype", category=FutureWarning)  # a deprecated keyword warns
        pipe = StableDiffusionXLPipeline.from_pretrained(request.getfixturevalue("tiny_sdxl"),
                                                         **compat.diffusers_dtype_kwarg(torch.float16))
    assert pipe.unet.dtype == pipe.vae.dtype == torch.float16  # an ignored keyword would load fp32


def _compiled(request) -> None:
    import torch

    module = torch.nn.Linear(2, 2)
    assert not compat.is_compiled(module)
    module.compile()  # lazy: compiles on the first forward
    assert compat.is_compiled(module)


PROOFS = {
    "ray.bootstrap_address": _bootstrap_address,
    "ray.train_storage": _train_storage,
    "ray.checkpoint_snapshot": _checkpoint_snapshot,
    "ray.split_coordinator": _split_coordinator,
    "ray.preemption_notice": _preemption_notice,
    "ray.asha": _asha,
    "ray.logging": _ray_logging,
    "deepspeed.op_table": _op_table,
    "deepspeed.zero_layouts": _zero_layouts,
    "diffusers.dtype": _diffusers_dtype,
    "torch.compiled": _compiled,
}


@pytest.mark.parametrize("name", sorted(compat.ASSUMPTIONS))
def test_assumption_holds(name: str, request) -> None:
    assert name in PROOFS, f"raydiff.compat assumes {name!r}: add its proof to tests/test_compat.py"
    PROOFS[name](request)


# ---------------------------------------------------------------- the fence itself


def test_outside_the_checked_range_warns_once_and_a_missing_internal_is_named(monkeypatch, caplog) -> None:
    monkeypatch.setitem(compat.ASSUMPTIONS, "ray.asha", compat.Assumption(
        "ray", ((1, 0), (1, 1)), "ASHAScheduler._brackets", "the test"))
    compat.check.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="raydiff.compat"):
            assert compat.check("ray.asha") is False and compat.check("ray.asha") is False
        assert [r.getMessage() for r in caplog.records] == [
            f"ray {compat._fmt(compat.installed('ray'))} is outside the versions raydiff checked "
            "ASHAScheduler._brackets on [1.0, 1.1): run tests/test_compat.py"]
        with pytest.raises(compat.BrokenAssumption, match=r"ASHAScheduler._brackets is gone or changed in ray .*"
                                                          r"for the test\. Checked on ray \[1\.0, 1\.1\)"):
            compat.asha_brackets(SimpleNamespace())
    finally:
        compat.check.cache_clear()
