"""What a checkpoint costs training, and what a resume downloads, with raydiff.train.checkpoint.

    PYTHONPATH=. python benchmarks/checkpoint_cost.py --params 50e6 --workers 2 --steps 16 --every 4 --storage s3

1. Stall per checkpoint, Ray Train's synchronous vs asynchronous upload side by side: one TorchTrainer fit per mode,
   the same model, steps and storage. Each worker trains a stand-in of `--params` parameters (a stack of square
   Linear layers, ZeRO-2 bf16 as the SDXL recipe: a checkpoint's bytes depend only on the parameter count and the
   ZeRO layout, not on the architecture) and checkpoints every `--every` steps through the same calls as
   `Checkpointer.save` (`staging_dir`, `engine.save_checkpoint`, `write_manifest`, `report`). Per checkpoint: `stall`
   = the time the training loop spends in that path (waiting for the previous upload + save + `ray.train.report`),
   the slowest rank's, averaged over the checkpoints; `cost` = (loop wall time after the first step - those steps x
   the median step without a checkpoint) / checkpoints, so time lost to an upload competing with training for the
   CPUs (here: 2 cores, the S3 server in the same box) counts too. The other columns are rank 0's means.
2. Bytes each rank downloads to resume the last checkpoint: before (`checkpoint.as_directory()`: the whole
   checkpoint, one copy per node) vs now (`resume_dir`: only the rank's files; and for all ranks on one node, each
   file once), and after a world-size change: before (every rank converted the whole checkpoint) vs now (rank 0
   converts once; the others download the conversion). Counted through a byte-counting pyarrow filesystem
   (raydiff.data.iostats) over the same storage.

`--storage s3` (default): a moto S3 server on loopback, in this process (an object store: uploads are copies).
`--storage local`: a directory on the temp directory's filesystem (uploads are renames). Any other value: that
directory (e.g. /dev/shm: another filesystem, so copies). The last lines print the command and a JSON summary.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=float, default=50e6, help="parameters of the stand-in model")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--every", type=int, default=4, help="checkpoint every N steps")
    p.add_argument("--width", type=int, default=1024, help="width of each square Linear layer")
    p.add_argument("--storage", default="s3", help="s3 (moto on loopback), local, or a directory")
    p.add_argument("--modes", nargs="+", default=["SYNC", "ASYNC"], choices=["SYNC", "ASYNC"])
    p.add_argument("--json", default=None, help="write the results to this file")
    return p.parse_args()


def train_loop(config: dict) -> None:
    """One Ray Train worker: train, checkpoint like Checkpointer.save, record the timings."""
    import ray.train
    import torch
    import torch.distributed as dist

    from raydiff.train import checkpoint as ckpt
    from raydiff.train.deepspeed_setup import initialize_engine

    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    torch.manual_seed(0)
    width, layers = config["width"], config["layers"]
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    ds = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "train_batch_size": 8 * world,
          "zero_optimization": {"stage": 2, "contiguous_gradients": True}, "bf16": {"enabled": True},
          "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, *_ = initialize_engine(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4), config=ds,
                                   dist_init_required=False)
    mode = getattr(ray.train.CheckpointUploadMode, config["mode"])
    steps, ckpts, uploads = [], [], []
    for step in range(1, config["steps"] + 1):
        t = time.perf_counter()
        if step == 2:
            start = t  # after the first step (warm-up)
        x = torch.randn(8, width, dtype=torch.bfloat16)
        engine.backward(engine(x).float().square().mean())
        engine.step()
        steps.append(time.perf_counter() - t)
        if step % config["every"]:  # (no metrics-only reports: each is a round trip to the controller)
            continue
        t0 = time.perf_counter()
        tmp = ckpt.staging_dir()  # waits for the previous upload
        uploads.append(ckpt.wait_for_upload())
        t1 = time.perf_counter()
        engine.save_checkpoint(tmp, tag=ckpt.DS_TAG)
        if rank == 0:
            with open(os.path.join(tmp, ckpt.STATE_FILE), "w") as f:
                json.dump({"step": step, "stream": {"world": world}}, f)
        ckpt.save_rng_state(tmp, rank)
        ckpt.write_manifest(tmp, rank)
        t2 = time.perf_counter()
        ckpt.report({"step": step}, tmp, mode=mode)
        t3 = time.perf_counter()
        ckpts.append({"step": step, "wait_s": t1 - t0, "save_s": t2 - t1, "report_s": t3 - t2, "stall_s": t3 - t0})
    loop_s = time.perf_counter() - start
    uploads.append(ckpt.wait_for_upload())  # the last one (a real run waits for it before the export)
    done = [u for u in uploads if u is not None][-len(ckpts):]
    for c, u in zip(ckpts, done):
        c.update(upload_s=u.seconds, upload_bytes=u.nbytes, renamed=u.renamed, upload_thread=u.thread)
    plain = [s for i, s in enumerate(steps, 1) if i % config["every"] and i > 1]  # no checkpoint after it
    dist.barrier()
    with open(os.path.join(config["out"], f"{config['mode']}-rank{rank}.json"), "w") as f:
        json.dump({"loop_s": loop_s, "steps": len(steps) - 1, "median_step_s": statistics.median(plain),
                   "checkpoints": ckpts}, f)


# ---------------------------------------------------------------- storage


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def open_storage(kind: str):
    """(pyarrow filesystem, base path, what it is, stop function)."""
    import pyarrow.fs as pafs

    if kind == "s3":
        import logging

        import boto3
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
        port = _free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="x", aws_secret_access_key="x",
                     region_name="us-east-1").create_bucket(Bucket="bench")
        fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", access_key="x", secret_key="x",
                               region="us-east-1")
        return fs, "bench/runs", "S3 API (moto on loopback)", server.stop
    base = tempfile.mkdtemp(prefix="ckpt-bench-", dir=None if kind == "local" else kind)
    return pafs.LocalFileSystem(), base, f"directory {base}", lambda: shutil.rmtree(base, ignore_errors=True)


# ---------------------------------------------------------------- 1. stall per checkpoint


def run_mode(mode: str, args, layers: int, fs, base: str, out: str) -> dict:
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    config = {"mode": mode, "steps": args.steps, "every": args.every, "width": args.width, "layers": layers,
              "out": out}
    trainer = TorchTrainer(train_loop, train_loop_config=config,
                           scaling_config=ScalingConfig(num_workers=args.workers, resources_per_worker={"CPU": 1}),
                           run_config=RunConfig(name=f"bench-{mode.lower()}", storage_path=base, storage_filesystem=fs,
                                                checkpoint_config=CheckpointConfig(num_to_keep=1)))
    result = trainer.fit()
    ranks = [json.load(open(os.path.join(out, f"{mode}-rank{r}.json"))) for r in range(args.workers)]
    n = len(ranks[0]["checkpoints"])
    worst = [max(r["checkpoints"][i]["stall_s"] for r in ranks) for i in range(n)]  # the slowest rank holds all
    cost = [(r["loop_s"] - r["steps"] * r["median_step_s"]) / n for r in ranks]
    c0 = ranks[0]["checkpoints"]
    return {"mode": mode, "checkpoints": n, "stall_s": statistics.mean(worst),
            "stall_s_each": [round(s, 2) for s in worst], "cost_s": max(cost),
            "save_s": statistics.mean(c["save_s"] for c in c0), "report_s": statistics.mean(c["report_s"] for c in c0),
            "wait_s": statistics.mean(c["wait_s"] for c in c0), "upload_s": statistics.mean(c["upload_s"] for c in c0),
            "upload_mb_rank0": c0[-1]["upload_bytes"] / 1e6, "renamed": c0[-1]["renamed"],
            "upload_thread": c0[-1]["upload_thread"], "median_step_s": ranks[0]["median_step_s"],
            "checkpoint": result.checkpoint}


# ---------------------------------------------------------------- 2. bytes downloaded to resume


@contextlib.contextmanager
def temp_root(path: str):
    """tempfile.gettempdir() (where resume_dir puts a node's copy) is ``path`` meanwhile."""
    old, tempfile.tempdir = tempfile.tempdir, path
    try:
        yield
    finally:
        tempfile.tempdir = old


def resume_bytes(checkpoint, world: int, work: str) -> dict:
    """Bytes per rank through a counting filesystem: the old whole-checkpoint download vs resume_dir."""
    from ray.train import Checkpoint

    from raydiff.data import iostats
    from raydiff.train import checkpoint as ckpt

    def counted(sink):
        return Checkpoint(checkpoint.path, filesystem=iostats.counting_filesystem(checkpoint.filesystem, sink))

    def measure(name, fn):
        sink = os.path.join(work, name)
        fn(counted(sink))
        return iostats.bytes_read(sink)

    def as_directory(c):
        with c.as_directory():
            pass

    def now(rank, tmpdir, universal=False):
        def go(c):
            with temp_root(tmpdir):  # a node of its own
                with ckpt.resume_dir(c, rank, world, universal=universal, barrier=lambda: None):
                    pass
        return go

    sizes = ckpt._sizes(checkpoint.filesystem, checkpoint.path)
    out = {"checkpoint_mb": sum(sizes.values()) / 1e6, "before_per_rank_mb": measure("before", as_directory) / 1e6}
    out["now_per_rank_mb"] = [measure(f"now{r}", now(r, tempfile.mkdtemp(dir=work))) / 1e6 for r in range(world)]
    # All ranks on one node: what resume_dir fetches for each, into the one node directory they share.
    node, sink = tempfile.mkdtemp(dir=work), os.path.join(work, "node")
    fs = iostats.counting_filesystem(checkpoint.filesystem, sink)
    for r in range(world):
        ckpt.fetch(fs, checkpoint.path, {n: sizes[n] for n in ckpt.rank_files(sizes, r)}, node)
    out["now_node_of_all_ranks_mb"] = iostats.bytes_read(sink) / 1e6
    # Another world size: before, every rank downloaded everything and converted it; now rank 0 converts once.
    t = time.perf_counter()
    out["universal_rank0_mb"] = measure("uni0", now(0, tempfile.mkdtemp(dir=work), universal=True)) / 1e6
    out["convert_s"] = time.perf_counter() - t
    out["universal_other_rank_mb"] = measure("uni1", now(1, tempfile.mkdtemp(dir=work), universal=True)) / 1e6
    return out


def main() -> None:
    args = parse_args()
    import ray

    layers = max(1, round(args.params / args.width**2))
    params = layers * args.width**2
    fs, base, what, stop = open_storage(args.storage)
    out = tempfile.mkdtemp(prefix="ckpt-bench-out-")
    ray.init(address="local", num_cpus=max(2, args.workers) + 1, include_dashboard=False, log_to_driver=False)
    try:
        results = [run_mode(m, args, layers, fs, base, out) for m in args.modes]
        downloads = resume_bytes(results[-1].pop("checkpoint"), args.workers, out)
        for r in results:
            r.pop("checkpoint", None)
    finally:
        ray.shutdown()
        stop()
        shutil.rmtree(out, ignore_errors=True)
    print(f"\nstand-in model: {params / 1e6:.0f} M parameters ({layers} x Linear {args.width}x{args.width}), ZeRO-2 "
          f"bf16, {args.workers} workers; storage: {what}; {args.steps} steps, a checkpoint every {args.every}")
    print(f"{'mode':6} {'stall/ckpt s':>12} {'cost/ckpt s':>11} {'save s':>7} {'report s':>8} {'wait s':>7} "
          f"{'upload s':>8} {'MB rank0':>8} {'step s':>7}  upload by")
    for r in results:
        how = ("rename" if r["renamed"] else "copy") + f", thread {r['upload_thread']}"
        print(f"{r['mode']:6} {r['stall_s']:12.2f} {r['cost_s']:11.2f} {r['save_s']:7.2f} {r['report_s']:8.2f} "
              f"{r['wait_s']:7.2f} {r['upload_s']:8.2f} {r['upload_mb_rank0']:8.1f} {r['median_step_s']:7.3f}  {how}")
    d = downloads
    print(f"\nresume of a {d['checkpoint_mb']:.0f} MB checkpoint, bytes downloaded per rank"
          + (":" if args.storage == "s3" else " (were it remote: resume_dir reads a local path in place):"))
    print(f"  same world size:  before {d['before_per_rank_mb']:.1f} MB on every node (the whole checkpoint); now "
          + ", ".join(f"rank {r} {mb:.1f} MB" for r, mb in enumerate(d["now_per_rank_mb"]))
          + f"; all {args.workers} ranks on one node: {d['now_node_of_all_ranks_mb']:.1f} MB for the node")
    print(f"  new world size:   before {d['before_per_rank_mb']:.1f} MB + a conversion on every rank; now rank 0 "
          f"{d['universal_rank0_mb']:.1f} MB + one conversion ({d['convert_s']:.1f} s), any other rank "
          f"{d['universal_other_rank_mb']:.1f} MB")
    summary = {"params": params, "workers": args.workers, "storage": what, "modes": results, "resume": downloads}
    print("\ncommand: " + " ".join([os.path.basename(sys.executable), *sys.argv]))
    print(json.dumps(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
