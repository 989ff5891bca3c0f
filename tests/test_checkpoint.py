"""Checkpoints at real size (raydiff.train.checkpoint): which files each rank reads back, checked against real DeepSpeed
checkpoints of every ZeRO stage; per-rank copies counted through a byte-counting filesystem; a world-size change
converted once; uploads that put each rank's manifest last, by rename on one local filesystem; and, on a real local
Ray cluster, an asynchronous upload to S3 that yields a complete checkpoint a rank resumes from exactly."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch

from raydiff.data import iostats
from raydiff.train import checkpoint as ckpt

REPO = Path(__file__).resolve().parent.parent
COMBOS = [(0, "fp32"), (1, "bf16"), (2, "fp32"), (2, "bf16"), (3, "bf16")]  # what raydiff's config allows

# A rank of a real gloo world (RANK / WORLD_SIZE from the environment; its own TMPDIR: a node of its own). argv:
# out_dir, phase, the (ZeRO stage, precision) pairs. Each: save, then resume into a fresh engine through resume_dir
# over a byte-counting filesystem; one more step on both must give the same weights bit for bit. Then the ZeRO-2 bf16
# checkpoint is resumed twice as one of another world size (universal format), against the saved weights and moments.
RANK_SCRIPT = textwrap.dedent("""
    import json, os, shutil, sys
    import pyarrow.fs as pafs
    import torch
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from ray.train import Checkpoint

    from raydiff import config as C
    from raydiff.data import iostats
    from raydiff.train import checkpoint as ckpt
    from raydiff.train.deepspeed_setup import build_optimizer, deepspeed_config, initialize_engine

    out, phase = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    def engine(zero, precision, universal=False):
        cfg = C.load_config("tiny_cpu", [f"deepspeed.zero_stage={zero}", f"deepspeed.precision={precision}",
                                         "train.batch_size=2"])
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Linear(16, 4))
        config = {**deepspeed_config(cfg, world), **({"checkpoint": {"load_universal": True}} if universal else {})}
        eng, *_ = initialize_engine(model=model, optimizer=build_optimizer(model.parameters(), cfg), config=config,
                                    dist_init_required=False)
        return eng

    def step(eng, seed):
        torch.manual_seed(seed * 100 + rank)
        x = torch.randn(2, 4).to(next(eng.module.parameters()).dtype)
        eng.backward(eng(x).float().square().mean())
        eng.step()

    def full(eng, what="fp32"):  # collective under ZeRO-3
        got = {}
        for n, p in eng.module.named_parameters():
            t = safe_get_full_fp32_param(p) if what == "fp32" else safe_get_full_optimizer_state(p, what)
            got[n] = (p.detach() if t is None else t).float().clone()
        return got

    def save(eng, path):
        eng.save_checkpoint(path, tag=ckpt.DS_TAG)
        if rank == 0:
            with open(os.path.join(path, ckpt.STATE_FILE), "w") as f:
                json.dump({"step": 1, "stream": {"world": world}}, f)
        torch.save({}, os.path.join(path, ckpt.EMA_SHARD.format(rank)))
        ckpt.save_rng_state(path, rank)
        dist.barrier()
        ckpt.write_manifest(path, rank)  # (all ranks share this directory: each lists everything, which is fine)
        dist.barrier()

    def resume(path, sink, universal):
        fs = iostats.counting_filesystem(pafs.LocalFileSystem(), sink)
        return ckpt.resume_dir(Checkpoint(path, filesystem=fs), rank, world, universal=universal,
                               barrier=dist.barrier, poll_s=0.2)

    report, saved = {}, {}
    for zero, precision in [tuple(c) for c in json.loads(sys.argv[3])]:
        name = f"z{zero}_{precision}"
        path = os.path.join(out, name)
        eng = engine(zero, precision)
        step(eng, 1)
        save(eng, path)
        saved[name] = {"fp32": full(eng), "exp_avg": full(eng, "exp_avg")}
        sink = os.path.join(out, f"reads-{name}-{rank}")
        fresh = engine(zero, precision)
        with resume(path, sink, universal=False) as (ckpt_dir, load_dir):
            local = sorted(os.path.relpath(os.path.join(d, f), ckpt_dir) for d, _, fs in os.walk(ckpt_dir)
                           for f in fs if not d.endswith(".fetch"))
            fresh.load_checkpoint(load_dir, tag=ckpt.DS_TAG)
        step(eng, 2)
        step(fresh, 2)
        a, b = full(eng), full(fresh)
        report[name] = {"local": local, "equal": all(torch.equal(a[k], b[k]) for k in a),
                        "read": iostats.bytes_read(sink), "copy_gone": not os.path.exists(ckpt_dir)}
    # The recipe's ZeRO-2 bf16 checkpoint again, as a checkpoint of another world size is (DeepSpeed's universal
    # format loads at any world size): twice, the second attempt reusing the first one's conversion.
    path, want = os.path.join(out, "z2_bf16"), saved["z2_bf16"]
    for attempt in (1, 2):
        sink = os.path.join(out, f"reads-universal{attempt}-{rank}")
        eng = engine(2, "bf16", universal=True)
        with resume(path, sink, universal=True) as (ckpt_dir, load_dir):
            eng.load_checkpoint(load_dir, tag=ckpt.DS_TAG)
        got = {"fp32": full(eng), "exp_avg": full(eng, "exp_avg")}
        paths = [line.split("\\t", 1)[1].strip() for f in os.listdir(sink) for line in open(os.path.join(sink, f))]
        report[f"universal{attempt}"] = {"equal": all(torch.equal(got[w][k], want[w][k]) for w in got for k in got[w]),
                                         "read_paths": sorted(os.path.relpath(p, path) for p in paths)}
    # The same on a local path (the storage is a directory every rank sees): converted in place, nothing copied.
    local = os.path.join(out, "z2_bf16_local")
    if rank == 0:
        shutil.copytree(path, local, ignore=shutil.ignore_patterns(ckpt.UNIVERSAL))
    dist.barrier()
    eng = engine(2, "bf16", universal=True)
    with ckpt.resume_dir(Checkpoint(local, filesystem=pafs.LocalFileSystem()), rank, world, universal=True,
                         barrier=dist.barrier, poll_s=0.2) as (ckpt_dir, load_dir):
        eng.load_checkpoint(load_dir, tag=ckpt.DS_TAG)
    got = {"fp32": full(eng), "exp_avg": full(eng, "exp_avg")}
    report["in_place"] = {"equal": all(torch.equal(got[w][k], want[w][k]) for w in got for k in got[w]),
                          "dirs": [ckpt_dir, load_dir]}
    with open(os.path.join(out, f"{phase}-{rank}.json"), "w") as f:
        json.dump(report, f)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(out: Path, phase: str, world: int, *args: str) -> tuple[list[dict], str]:
    """Run RANK_SCRIPT as ``world`` gloo ranks (each its own TMPDIR: separate nodes); their reports and stdout."""
    port = str(_free_port())
    procs = []
    for rank in range(world):
        tmp = out / f"tmp-{phase}-{rank}"
        tmp.mkdir(exist_ok=True)
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "TMPDIR": str(tmp), "PYTHONPATH": str(REPO)}
        with open(out / f"{phase}-{rank}.log", "w") as log:
            procs.append(subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(out), phase, *args], env=env,
                                          stdout=log, stderr=subprocess.STDOUT))
    try:  # a rank that fails ends the others (rank 1 would wait for a conversion that never comes)
        while any(p.poll() is None for p in procs) and not any(p.poll() for p in procs):
            time.sleep(0.2)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    logs = [(out / f"{phase}-{rank}.log").read_text() for rank in range(world)]
    for p, log in sorted(zip(procs, logs), key=lambda pl: pl[0].returncode == -9):  # the first to fail first
        assert p.returncode == 0, log[-4000:]
    return [json.loads((out / f"{phase}-{r}.json").read_text()) for r in range(world)], "".join(logs)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Real checkpoints of a world of 2 ranks, every ZeRO stage, each resumed per rank; the ZeRO-2 bf16 one then resumed
    twice in universal format (convert once, then reuse)."""
    out = tmp_path_factory.mktemp("ckpts")
    reports, log = run_ranks(out, "ranks", 2, json.dumps(COMBOS))
    return out, reports, log


def test_each_rank_copies_only_its_files_and_resumes_exactly(saved):
    out, same, _ = saved
    for zero, precision in COMBOS:
        name = f"z{zero}_{precision}"
        sizes = {p.relative_to(out / name).as_posix(): p.stat().st_size for p in (out / name).rglob("*")
                 if p.is_file()}
        for rank in (0, 1):
            got = same[rank][name]
            other = str(1 - rank)
            assert got["equal"], f"{name} rank {rank}: the next step after resuming differs from the unbroken one"
            assert got["copy_gone"], f"{name}: the node copy outlived the load"
            shards = [f for f in got["local"] if "zero_pp_rank_" in f]
            assert all(f"zero_pp_rank_{rank}_" in f for f in shards) and len(shards) == (zero > 0) + (zero == 3), \
                (name, got["local"])
            assert f"rng_rank{other}.pt" not in got["local"] and f"ema_rank{other}.pt" not in got["local"]
            assert ckpt.STATE_FILE in got["local"] and f"ema_rank{rank}.pt" in got["local"]
            assert got["read"] == sum(sizes[f] for f in got["local"]) < sum(sizes.values())
            if zero < 3:  # module, scheduler and step: one file every rank reads
                assert "deepspeed/mp_rank_00_model_states.pt" in got["local"]


def test_a_universal_resume_is_converted_once_by_rank_0_and_reused(saved):
    # (the real world-size change, 2 workers -> 1, runs in test_resume.py through the training loop)
    out, reports, log = saved
    assert log.count("universal format once") == 2 and log.count("converted by an earlier attempt") == 1, log[-3000:]
    read = {}
    for rank in (0, 1):
        for attempt in (1, 2):
            got = reports[rank][f"universal{attempt}"]
            assert got["equal"], f"rank {rank} attempt {attempt}: weights or Adam moments differ from the saved ones"
            read[rank, attempt] = got["read_paths"]
    # Only rank 0 read the original shards (to convert them), and only the first time.
    assert any(p.startswith("deepspeed/") for p in read[0, 1])
    assert not any(p.startswith("deepspeed/") for key, paths in read.items() if key != (0, 1) for p in paths)
    # The others copy the conversion from the storage (rank 0 loads the one it just made locally).
    assert all(any(p.startswith("universal/deepspeed/zero/") for p in paths)
               for key, paths in read.items() if key != (0, 1))
    assert json.loads((out / "z2_bf16" / ckpt.UNIVERSAL_MANIFEST).read_text())["files"]
    # On a local path: rank 0 converted in place, beside the checkpoint; every rank loaded it from there.
    local = out / "z2_bf16_local"
    assert log.count(f"converted {local} to DeepSpeed's universal format once") == 1
    for rank in (0, 1):
        got = reports[rank]["in_place"]
        assert got["equal"] and got["dirs"] == [str(local), str(local / ckpt.UNIVERSAL)], got
    assert not list(local.glob("universal.partial-*"))


def test_rank_files_by_name():
    names = ["deepspeed/mp_rank_00_model_states.pt", "deepspeed/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
             "deepspeed/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
             "deepspeed/zero_pp_rank_1_mp_rank_00optim_states.pt",
             "rng_rank0.pt", "rng_rank1.pt", "ema_rank0.pt", "ema_rank1.pt", "ema_unet.pt", "trainer_state.json",
             "manifest_rank0.json", "latest", "zero_to_fp32.py", "universal/deepspeed/zero/w/fp32.pt",
             "universal/deepspeed/zero_pp_rank_1_mp_rank_00_model_states.pt", "universal/manifest.json",
             "universal.partial-123/deepspeed/zero/w/fp32.pt"]  # (a conversion cut short)
    assert ckpt.rank_files(names, 1) == [
        "deepspeed/mp_rank_00_model_states.pt", "deepspeed/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "deepspeed/zero_pp_rank_1_mp_rank_00optim_states.pt", "rng_rank1.pt", "ema_rank1.pt", "ema_unet.pt",
        "trainer_state.json"]
    assert ckpt.rank_files(names, 1, elastic=True)[1:3] == names[1:3]
    assert ckpt.rank_files(names, 1, same_world=False) == [
        "ema_rank0.pt", "ema_rank1.pt", "ema_unet.pt", "trainer_state.json", "universal/deepspeed/zero/w/fp32.pt"]
    assert ckpt.EMA_SHARD == __import__("raydiff.train.ema", fromlist=["EMA_SHARD"]).EMA_SHARD


def test_a_local_checkpoint_is_read_in_place(tmp_path):
    from ray.train import Checkpoint

    (tmp_path / ckpt.STATE_FILE).write_text("{}")
    with ckpt.resume_dir(Checkpoint(str(tmp_path), filesystem=pafs.LocalFileSystem()), 0, 1, universal=False,
                         barrier=lambda: None) as (ckpt_dir, load_dir):
        assert ckpt_dir == load_dir == str(tmp_path)
    assert (tmp_path / ckpt.STATE_FILE).exists()


def _staged(tmp_path: Path, rank: int = 0) -> Path:
    local = tmp_path / f"stage{rank}"
    (local / "deepspeed").mkdir(parents=True)
    (local / "deepspeed" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"x" * 1000)
    (local / ckpt.STATE_FILE).write_text(json.dumps({"stream": {"world": 1}}))
    ckpt.write_manifest(str(local), rank)
    return local


class _Recording(iostats.CountingHandler):
    """A local filesystem that records the order files are opened for writing, and can fail on one of them."""

    def __init__(self, sink: Path, fail_on: str | None = None):
        super().__init__(pafs.LocalFileSystem(), str(sink))
        self.opened, self.fail_on = [], fail_on

    def open_output_stream(self, path, metadata):
        self.opened.append(os.path.basename(path))
        if self.fail_on and path.endswith(self.fail_on):
            raise OSError(f"injected failure writing {path}")
        return super().open_output_stream(path, metadata)


def test_upload_renames_on_one_filesystem_and_copies_manifest_last_elsewhere(tmp_path):
    # Same local filesystem: moved, not copied (one write of 36 GB, not two).
    local = _staged(tmp_path)
    done = ckpt.upload(str(local), pafs.LocalFileSystem(), str(tmp_path / "store" / "checkpoint_a"))
    assert done.renamed and done.nbytes > 1000 and not any(p.is_file() for p in local.rglob("*"))
    ckpt.check_complete(pafs.LocalFileSystem(), str(tmp_path / "store" / "checkpoint_a"))
    # Another filesystem (an object store, NFS): copied, each rank's manifest last.
    handler = _Recording(tmp_path / "sink")
    done = ckpt.upload(str(_staged(tmp_path, 1)), pafs.PyFileSystem(handler), str(tmp_path / "store" / "b"))
    assert not done.renamed and handler.opened[-1] == "manifest_rank1.json" and len(handler.opened) == 3


def test_an_upload_cut_short_is_not_a_complete_checkpoint(tmp_path):
    handler = _Recording(tmp_path / "sink", fail_on="optim_states.pt")
    dest = str(tmp_path / "store" / "checkpoint_b")
    with pytest.raises(OSError, match="injected failure"):
        ckpt.upload(str(_staged(tmp_path)), pafs.PyFileSystem(handler), dest)
    assert "manifest_rank0.json" not in handler.opened
    with pytest.raises(ckpt.IncompleteCheckpoint, match="checkpoint_b: no trainer_state.json"):
        ckpt.check_complete(pafs.LocalFileSystem(), dest)


def test_staging_dirs_of_dead_processes_are_swept(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt.tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"{ckpt.STAGING_PREFIX}{dead.stdout.strip()}-abc"
    live = tmp_path / f"{ckpt.STAGING_PREFIX}{os.getppid()}-abc"
    stale.mkdir(), live.mkdir()
    fresh = ckpt.staging_dir()
    assert not stale.exists() and live.exists() and os.path.isdir(fresh)


def test_without_a_usable_ray_checkpoint_list_the_newest_complete_checkpoint_is_handed_over(tmp_path, caplog):
    """A stop while Ray Train rewrites its checkpoint list leaves it empty (seen in tests/test_job_submission.py) and
    Ray would refuse the relaunch; with no list (set aside by an earlier relaunch) Ray would start over. Either way
    the newest complete checkpoint on storage, passing over a newer one cut short, reaches the Checkpointer."""
    from raydiff.train.checkpointer import Checkpointer

    run = tmp_path / "run"
    complete = run / "checkpoint_2026-12-05_10-00-00.000000"
    ckpt.upload(str(_staged(tmp_path)), pafs.LocalFileSystem(), str(complete))
    (run / "checkpoint_2026-12-05_11-00-00.000000").mkdir()  # newer, its upload cut short
    snapshot = run / "checkpoint_manager_snapshot.json"
    snapshot.write_bytes(b"")
    with caplog.at_level("WARNING", logger="raydiff.train.checkpoint"):
        found = ckpt.resume_without_ray_list(str(run))
    assert found == str(complete) and not snapshot.exists()
    (aside,) = run.glob("checkpoint_manager_snapshot.json.torn-*")
    assert aside.read_bytes() == b""
    said = caplog.text
    assert f"{snapshot} is unreadable" in said and aside.name in said
    assert "checkpoint_2026-12-05_11-00-00.000000 is incomplete" in said
    assert f"resuming from {complete.name}, the newest complete one" in said
    checkpointer = Checkpointer(every_n_steps=1, max_steps=1, rank=0, world=1)
    checkpointer.find(None, found)  # Ray hands none: it starts a new list
    assert checkpointer.checkpoint.path == str(complete) and checkpointer.saved.stream == {"world": 1}
    checkpointer.find(None, None)
    assert not checkpointer.resumed

    # No list (the relaunch that set it aside was stopped before Ray wrote a new one): the same checkpoint.
    assert ckpt.resume_without_ray_list(str(run)) == str(complete)
    # Cut mid-JSON is torn too.
    snapshot.write_bytes(b'{"checkpoint_res')
    assert ckpt.resume_without_ray_list(str(run)) == str(complete) and not snapshot.exists()
    # A readable list is Ray's to read: left alone.
    snapshot.write_text('{"ray_version": "x"}')
    assert ckpt.resume_without_ray_list(str(run)) is None and snapshot.read_text() == '{"ray_version": "x"}'
    snapshot.unlink()
    # Nothing complete: the run starts over, and says so when there were checkpoints; a new run is silent.
    (complete / "manifest_rank0.json").unlink()
    caplog.clear()
    with caplog.at_level("WARNING", logger="raydiff.train.checkpoint"):
        assert ckpt.resume_without_ray_list(str(run)) is None
        assert ckpt.resume_without_ray_list(str(tmp_path / "new")) is None
    assert caplog.text.count("the run starts over") == 1


# ---------------------------------------------------------------- on a real Ray cluster, to S3


def async_loop():
    """The loop of test_async_upload_to_s3...: made inside a function, so Ray pickles it by value (this test module
    is not importable on its workers)."""

    def loop(config: dict) -> None:
        """2 workers: checkpoint twice with the default (asynchronous) upload, then resume the last one into a fresh
        engine through resume_dir, and check it against the saved weights."""
        import ray.train
        import torch.distributed as dist
        from deepspeed.utils import safe_get_full_fp32_param

        # (no `from raydiff import config`: cloudpickle would then ship torch.distributed.config by value)
        from raydiff.config import load_config
        from raydiff.train.deepspeed_setup import build_optimizer, deepspeed_config, initialize_engine

        rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()

        def engine():
            cfg = load_config("tiny_cpu", ["deepspeed.zero_stage=2", "deepspeed.precision=bf16", "train.batch_size=2"])
            torch.manual_seed(0)
            model = torch.nn.Linear(4, 4)
            return initialize_engine(model=model, optimizer=build_optimizer(model.parameters(), cfg),
                                     config=deepspeed_config(cfg, world), dist_init_required=False)[0]

        eng, uploads, staged = engine(), [], []
        for step in (1, 2):
            eng.backward(eng(torch.randn(2, 4, dtype=torch.bfloat16)).float().square().mean())
            eng.step()
            tmp = ckpt.staging_dir()
            uploads.append(ckpt.wait_for_upload())  # the previous one (None at first)
            staged.append(tmp)
            eng.save_checkpoint(tmp, tag=ckpt.DS_TAG)
            if rank == 0:
                Path(tmp, ckpt.STATE_FILE).write_text(json.dumps({"step": step, "stream": {"world": world}}))
            ckpt.write_manifest(tmp, rank)
            ckpt.report({"step": step}, tmp)
        uploads.append(ckpt.wait_for_upload())
        # Once every rank's upload is done, Ray registers the checkpoint (COMMITTED waits for that).
        committed = ray.train.CheckpointConsistencyMode.COMMITTED
        checkpoint = ray.train.get_all_reported_checkpoints(committed)[-1].checkpoint
        ckpt.check_complete(checkpoint.filesystem, checkpoint.path)
        fresh = engine()
        with ckpt.resume_dir(checkpoint, rank, world, universal=False, barrier=dist.barrier) as (_, load_dir):
            fresh.load_checkpoint(load_dir, tag=ckpt.DS_TAG)
        same = all(torch.equal(safe_get_full_fp32_param(a), safe_get_full_fp32_param(b))
                   for a, b in zip(eng.module.parameters(), fresh.module.parameters()))
        Path(config["out"], f"rank{rank}.json").write_text(json.dumps({
            "threads": [u.thread for u in uploads[1:]], "train_thread": __import__("threading").current_thread().name,
            "renamed": [u.renamed for u in uploads[1:]], "paths": [u.path for u in uploads[1:]], "same": same,
            "staged_left": [os.path.exists(t) for t in staged], "resumed_from": checkpoint.path}))

    return loop


def test_async_upload_to_s3_is_complete_and_resumes(ray_local, s3_bucket, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raydiff import storage

    fs, path = storage.filesystem(f"{s3_bucket}/runs")
    trainer = TorchTrainer(async_loop(), train_loop_config={"out": str(tmp_path)},
                           scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                           run_config=RunConfig(name="async", storage_path=path, storage_filesystem=fs))
    result = trainer.fit()
    ckpt.check_complete(fs, result.checkpoint.path)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["same"], f"rank {rank}: the resumed weights differ from the saved ones"
        assert all(t != got["train_thread"] for t in got["threads"]), got  # Ray's upload thread, not training's
        assert got["renamed"] == [False, False] and got["staged_left"] == [False, False], got
        assert got["paths"][-1] == got["resumed_from"] == result.checkpoint.path
