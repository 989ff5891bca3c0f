"""Data at cluster scale: bytes read per epoch ÷ the split's bytes, time to the first batch, the epoch-boundary step
÷ the median step, and peak memory, for W = 1, 2, 4 training-worker streams on a local multi-node Ray cluster.

    python benchmarks/data_scale.py                       # 2 nodes, 768 rows in 32 row groups, 2 epochs
    python benchmarks/data_scale.py --before 099cc3c --json docs/scaling_raw.json   # and the code before, side by side

Each of the W streams runs where a training worker would (an actor per rank, spread over the nodes) and iterates
``raydiff.data.loader.planned_batches`` exactly as ``Worker.start_batches`` does: one Ray Data execution over its
read chunks, preprocessing (decode, crop, flip, both tokenizers) in Ray Data tasks, batches of ``--batch`` rows,
for ``--epochs`` epochs' worth of rows. Every byte of the source is read through ``raydiff.data.iostats``'s counting
filesystem (any process, any node), so "read" is what the readers really fetched, start-up included: listing, parquet
footers, then the epochs. The step time is the gap between consecutive batches on a rank with a simulated training
step of ``--step-ms`` between them (a step = that pause plus any wait for the batch); the boundary step is the
slowest step whose batch is the first of a new epoch.

``--before REV``: the same measurement, on the same source, of the package at git revision REV (extracted into a
temporary directory and put first on a child process's PYTHONPATH; its source filesystem wrapped in the same
counting filesystem). Before this change that was an index pass on the driver, then per epoch per worker a Ray Data
execution over the whole source.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import tempfile
import time

import numpy as np


def write_source(root: str, rows: int, groups: int, size: int) -> str:
    """Incompressible images (noise PNGs): the bytes read are the bytes stored."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    os.makedirs(root, exist_ok=True)
    per_group = rows // groups
    files = 4
    for k in range(files):
        ids = range(k * rows // files, (k + 1) * rows // files)
        images = []
        for i in ids:
            buf = io.BytesIO()
            Image.fromarray(np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
            images.append({"bytes": buf.getvalue(), "path": f"{i}.png"})
        table = pa.table({"image": images, "text": [f"a photo number {i}" for i in ids]})
        pq.write_table(table, os.path.join(root, f"part-{k}.parquet"), row_group_size=per_group)
    return root


def split_bytes(source: str) -> int:
    return sum(os.path.getsize(os.path.join(source, f)) for f in os.listdir(source) if f.endswith(".parquet"))


def count_reads_of_storage(sink: str) -> None:
    """The code before this change opened its source through ``raydiff.storage.filesystem`` in whichever process
    read it: wrap that in the counting filesystem (in the driver and in each stream actor)."""
    from raydiff import storage
    from raydiff.data.iostats import counting_filesystem

    if getattr(storage.filesystem, "counting", False):
        return
    plain = storage.filesystem

    def counted(path: str):
        fs, inner = plain(path)
        return counting_filesystem(fs, sink), inner

    counted.counting = True
    storage.filesystem = counted


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stream_actor():
    import ray

    @ray.remote(num_cpus=0)
    class Stream:
        """A training worker's data side: its planned batches, with a stand-in training step between them."""

        def run(self, spec, tokenizer: str, manifest, world: int, rank: int, batch: int, rows: int,
                step_s: float, before_sink: str | None = None) -> dict:
            from raydiff.data.loader import planned_batches
            from raydiff.data.stream import StreamPosition

            pos = StreamPosition(0, world, batch, [0] * world)
            if before_sink:  # the code before this change: its stream took the training identities
                count_reads_of_storage(before_sink)
                stream = planned_batches(spec, tokenizer, manifest, pos, rank, batch)
            else:
                stream = planned_batches(spec, tokenizer, manifest, pos, rank, batch, rows_needed=rows)
            start = time.perf_counter()
            gaps, epochs, first = [], [], None
            last = start
            taken = 0
            for _, _, epoch in stream:
                now = time.perf_counter()
                if first is None:
                    first = now - start
                else:
                    gaps.append(now - last)  # one step: the stand-in training step plus any wait for this batch
                last = now
                epochs.append(epoch)
                time.sleep(step_s)  # the training step the data must keep up with
                taken += batch
                if taken >= rows:
                    break
            return {"first_batch_s": first, "gaps": gaps, "epochs": epochs, "worker_rss_mb": _rss_mb()}

    return Stream


def measure(args, world: int, source: str, tokenizer: str, sink: str) -> dict:
    import pyarrow.fs as pafs
    import ray

    from raydiff.data.iostats import bytes_read, counting_filesystem, reset
    from raydiff.config import DataSection
    from raydiff.data.pipeline import DataSpec

    reset(sink)
    before = args.as_before
    window = {} if before else {"shuffle_window": args.window}
    spec = DataSpec(DataSection(source=source, resolution=args.resolution, val_fraction=0.0, **window),
                    batch_size=args.batch)
    t0 = time.perf_counter()
    if before:  # an index pass over the source
        from raydiff.data.pipeline import index_source

        count_reads_of_storage(sink)
        manifest = index_source(spec).train_uids
        num_train, units = len(manifest), 0
    else:
        from raydiff.data.pipeline import build_manifest

        manifest = build_manifest(spec, filesystem=counting_filesystem(pafs.LocalFileSystem(), sink))
        num_train, units = manifest.num_train, len(manifest.unit_rows)
    start_up_s = time.perf_counter() - t0
    start_up_bytes = bytes_read(sink)
    split = split_bytes(source)
    rows = args.epochs * num_train // world
    Stream = stream_actor()
    actors = [Stream.options(scheduling_strategy="SPREAD").remote() for _ in range(world)]
    runs = ray.get([a.run.remote(spec, tokenizer, manifest, world, r, args.batch, rows,
                                 args.step_ms / 1000, sink if before else None) for r, a in enumerate(actors)])
    for a in actors:
        ray.kill(a)
    total = bytes_read(sink)
    gaps = np.concatenate([np.asarray(r["gaps"]) for r in runs])
    boundary = [g for r in runs for g, e0, e1 in zip(r["gaps"], r["epochs"], r["epochs"][1:]) if e1 != e0]
    steady = float(np.median(gaps))
    return {
        "code": "before" if before else "now", "world": world, "rows": num_train, "units": units, "split_bytes": split,
        "start_up_s": round(start_up_s, 3), "start_up_read_ratio": round(start_up_bytes / split, 4),
        "read_per_epoch_ratio": round((total - start_up_bytes) / (split * args.epochs), 4),
        "run_read_ratio": round(total / (split * args.epochs), 4),
        "first_batch_s": round(max(r["first_batch_s"] for r in runs), 2),
        "median_step_s": round(steady, 4),
        "boundary_step_ratio": round(max(boundary) / steady, 2) if boundary else None,
        "slowest_step_ratio": round(float(gaps.max()) / steady, 2),
        "driver_rss_mb": round(_rss_mb(), 1), "worker_rss_mb": round(max(r["worker_rss_mb"] for r in runs), 1),
    }


def run_before(args, source: str, tmp: str) -> list[dict]:
    """The same measurement on the package of revision ``args.before``, in a child process whose PYTHONPATH puts an
    extracted copy of that package (plus this counting filesystem) first, on the same source."""
    import shutil
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    old = os.path.join(tmp, "before")
    os.makedirs(old)
    subprocess.run(f"git archive {args.before} raydiff | tar -x -C {old}", shell=True, check=True, cwd=repo)
    shutil.copy(os.path.join(repo, "raydiff", "data", "iostats.py"), os.path.join(old, "raydiff", "data"))
    out = os.path.join(tmp, "before.json")
    argv = [a for a in sys.argv[1:] if not a.startswith("--before") and a != args.before]
    argv = [a for i, a in enumerate(argv) if a != "--json" and (i == 0 or argv[i - 1] != "--json")]
    subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--as-before", "--source", source,
                    "--json", out], check=True, env={**os.environ, "PYTHONPATH": old}, cwd=tmp)
    with open(out) as f:
        return json.load(f)["results"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=768)
    p.add_argument("--groups", type=int, default=32, help="parquet row groups (the read units)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--window", type=int, default=96, help="data.shuffle_window")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--step-ms", type=float, default=200.0, help="the stand-in training step")
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--worlds", default="1,2,4")
    p.add_argument("--json")
    p.add_argument("--before", metavar="REV", help="also measure the code of git revision REV (e.g. 099cc3c)")
    p.add_argument("--as-before", action="store_true", help=argparse.SUPPRESS)  # this process runs REV's package
    p.add_argument("--source", help=argparse.SUPPRESS)
    args = p.parse_args()

    from raydiff import console

    console.configure(False)
    import ray
    from ray.cluster_utils import Cluster

    from raydiff import models

    tmp = tempfile.mkdtemp(prefix="raydiff-scale-")
    source = args.source or write_source(os.path.join(tmp, "src"), args.rows, args.groups, args.image_size)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    for _ in range(args.nodes - 1):
        cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address)
    try:
        tokenizer = models.resolve_pretrained("tiny")
        results = [measure(args, w, source, tokenizer, os.path.join(tmp, f"reads-{w}"))
                   for w in (int(x) for x in args.worlds.split(","))]
    finally:
        ray.shutdown()
        cluster.shutdown()
    if args.before:
        results += run_before(args, source, tmp)
    cols = ["code", "world", "units", "start_up_read_ratio", "read_per_epoch_ratio", "run_read_ratio", "first_batch_s",
            "median_step_s", "boundary_step_ratio", "slowest_step_ratio", "driver_rss_mb", "worker_rss_mb"]
    print(" | ".join(cols))
    for r in results:
        print(" | ".join(str(r[c]) for c in cols))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "machine": platform.platform(), "cpus": os.cpu_count(),
                       "results": results}, f, indent=1)
    last = next((r for r in results if r["world"] == 4 and r["code"] == "now"), results[0])
    print(f"read amplification at W={last['world']} = {last['run_read_ratio']:.2f}")


if __name__ == "__main__":
    main()
