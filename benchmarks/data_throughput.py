"""Images/s of the Ray Data preprocessing vs a torch DataLoader running the same transforms with as many workers.

    python benchmarks/data_throughput.py --images 256 --resolution 64 --workers 2

Both sides run ``raydiff.data.pipeline.Preprocessor`` (decode, EXIF, mode conversion, resize, crop, flip, time_ids,
both tokenizers) on the same parquet rows in batches of ``--batch-size``; Ray Data with a fixed pool of
``--workers`` actors, the DataLoader with ``num_workers=--workers`` processes. Each side is timed over one full
pass after a warm-up pass (actor start-up, tokenizer loading and worker forking are excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq


def ray_pass(spec, tokenizer: str) -> tuple[int, float]:
    from raydiff.data.pipeline import build_datasets

    ds = build_datasets(spec, tokenizer, epoch=0)["train"]
    for _ in ds.iter_batches(batch_size=spec.batch_size):  # warm-up: actors up, tokenizers loaded
        pass
    start, n = time.perf_counter(), 0
    for batch in ds.iter_batches(batch_size=spec.batch_size):
        n += len(batch["time_ids"])
    return n, time.perf_counter() - start


class _Rows:
    """Map-style dataset whose items are whole batches (index lists from a BatchSampler), like Ray's batches."""

    def __init__(self, table: pa.Table, tokenizer: str, resolution: int):
        self.table, self.tokenizer, self.resolution = table, tokenizer, resolution
        self.pre = None

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, indices):
        from raydiff.data.pipeline import Preprocessor

        if self.pre is None:  # built in the worker process, like Ray's actors build theirs
            self.pre = Preprocessor(self.tokenizer, resolution=self.resolution)
        return self.pre(self.table.take(indices))


def dataloader_pass(table: pa.Table, tokenizer: str, resolution: int, workers: int, batch_size: int):
    import torch.utils.data as tud

    sampler = tud.BatchSampler(tud.SequentialSampler(range(table.num_rows)), batch_size, drop_last=False)
    loader = tud.DataLoader(_Rows(table, tokenizer, resolution), sampler=sampler, batch_size=None,
                            num_workers=workers, persistent_workers=workers > 0)
    for _ in loader:  # warm-up
        pass
    start, n = time.perf_counter(), 0
    for batch in loader:
        n += len(batch["time_ids"])
    return n, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()

    import ray

    from raydiff.data.demo import write_demo_dataset
    from raydiff.data.pipeline import DataSpec
    from raydiff.models import resolve_pretrained

    tokenizer = resolve_pretrained("tiny")
    data = write_demo_dataset(tempfile.mkdtemp(prefix="raydiff-bench-"), num_images=args.images)
    table = pa.concat_tables([pq.read_table(os.path.join(data, f)) for f in sorted(os.listdir(data))])
    ray.init(num_cpus=max(os.cpu_count() or 1, args.workers + 1), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    spec = DataSpec(source=data, resolution=args.resolution, val_fraction=0.0, batch_size=args.batch_size,
                    concurrency=args.workers)
    results = {}
    for name, run in (("ray_data", lambda: ray_pass(spec, tokenizer)),
                      ("torch_dataloader", lambda: dataloader_pass(table, tokenizer, args.resolution,
                                                                  args.workers, args.batch_size))):
        n, seconds = run()
        results[name] = {"images": n, "seconds": round(seconds, 3), "images_per_s": round(n / seconds, 1)}
    print(json.dumps({"machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.python_version()}",
                      "args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
