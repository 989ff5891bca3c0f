"""Training end to end on user data: a bucket on a real S3-API server (data, checkpoints, resume) and hostile rows."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydiff import config as C
from raydiff import storage
from raydiff.data.demo import write_demo_dataset
from raydiff.train.driver import run_training
from raydiff.train.metrics_log import read_metrics

from test_data_sources import hostile_rows

pytestmark = pytest.mark.integration


def cfg_for(storage_path, source, *overrides):
    return C.load_config("tiny_cpu", [f"run.storage_path={storage_path}", "run.name=bucket", f"data.source={source}",
                                      "data.resolution=32", "train.max_steps=4", "validation.every_n_steps=2",
                                      # 1 worker x 8 rows: the rows per step of 2 x 4; the data path is under test
                                      "scaling.num_workers=1", "train.batch_size=8",
                                      "checkpoint.every_n_steps=2", "data.val_fraction=0.2",
                                      # the data path is under test here, not the sample images or the bias chain
                                      "validation.prompts=[]", "validation.exposure_bias_denoising_steps=0",
                                      "logging.sample_prompts=[]", *overrides])


def test_bucket_data_checkpoints_resume_and_skip_counts(ray_local, tmp_path, s3_bucket):
    # 16 good + 12 hostile rows: 4 steps x 8 samples pass the end of the first epoch, so every bad
    # row has been through preprocessing (val rows once at start-up) by the last step of the first run.
    data = write_demo_dataset(str(tmp_path / "data"), num_images=16, seed=5)
    bad, want = hostile_rows()
    pq.write_table(pa.Table.from_pylist(bad), os.path.join(data, "hostile.parquet"))
    storage.upload_dir(data, f"{s3_bucket}/train")

    first = run_training(cfg_for(f"{s3_bucket}/runs", f"{s3_bucket}/train"))
    assert first.metrics["step"] == 4 and first.checkpoint_path.startswith("raydiff-data/runs/bucket/")
    # Distinct rows: each bad row counts once although the stream passed the end of the first epoch.
    assert first.metrics["data_skipped"] == want["data_skipped"]
    assert first.metrics["data_null_captions"] == want["data_null_captions"]
    second = run_training(cfg_for(f"{s3_bucket}/runs", f"{s3_bucket}/train", "train.max_steps=6"))
    assert second.metrics["step"] == 6
    assert second.metrics["data_skipped"] == want["data_skipped"]  # the relaunch continues the distinct counts
    rows = read_metrics(second.metrics_path)  # read back from the bucket
    assert [r["step"] for r in rows] == list(range(0, 7)), "resumed from the bucket's checkpoint, not restarted"
    assert all("data_skipped" in r for r in rows if r["step"] > 0)
    assert storage.exists(f"{second.model_dir}/unet/config.json")
    skipped = [json.loads(line)
               for line in storage.read_text(f"{s3_bucket}/runs/bucket/data_skipped.jsonl").splitlines()]
    assert len(skipped) == want["data_skipped"] == len({r["row"] for r in skipped})  # each bad row once, with why
    assert sorted(r["what"].split("image_path='")[1].split("'")[0] for r in skipped) == \
        ["garbage.png", "panorama.png", "truncated.png"]
    # The source changed under the run: a relaunch names what changed instead of silently shifting the stream.
    storage.write_bytes(f"{s3_bucket}/train/more.parquet", open(os.path.join(data, "hostile.parquet"), "rb").read())
    with pytest.raises(RuntimeError, match=r"changed since this run started: 1 file\(s\) added \(more.parquet\)"):
        run_training(cfg_for(f"{s3_bucket}/runs", f"{s3_bucket}/train", "train.max_steps=8"))


def test_every_row_bad_stops_with_a_clear_error(ray_local, tmp_path):
    bad, _ = hostile_rows()
    d = tmp_path / "bad"
    d.mkdir()
    pq.write_table(pa.Table.from_pylist(bad[:3]), str(d / "bad.parquet"))  # only the 3 skipped kinds
    # RuntimeError from the driver itself: the held-out split is preprocessed once there, before any worker starts.
    with pytest.raises(RuntimeError,
                       match=r"produced no samples \(\d+ rows skipped; first: .*(truncated|garbage|panorama)"):
        # val_fraction 0.9: the (deterministic) bad rows have val candidates, so the validation load meets them first
        run_training(cfg_for(str(tmp_path / "runs"), str(d), "data.val_fraction=0.9"))


def test_training_stream_runs_in_the_worker_unless_its_placement_group_captures_tasks(ray_local):
    """A training worker runs its stream's execution in its own process (no launcher and split-coordinator actors to
    start before the first batch); inside a placement group that captures child tasks (a Tune trial) the execution
    is placed outside the group, where its tasks can be scheduled at all."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    @ray.remote(num_cpus=0)
    def iterate() -> tuple[str, int]:
        from raydiff.data.loader import _stream_iterator

        it = _stream_iterator(ray.data.range(8).map_batches(lambda b: b))
        return type(it).__name__, sum(len(b["id"]) for b in it.iter_batches(batch_size=None))

    plain_kind, plain_rows = ray.get(iterate.remote())
    group = placement_group([{"CPU": 0.01}])
    ray.get(group.ready())
    try:
        captured = PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True)
        captured_kind, captured_rows = ray.get(iterate.options(scheduling_strategy=captured).remote())
    finally:
        remove_placement_group(group)
    assert (plain_rows, captured_rows) == (8, 8)
    assert captured_kind == "StreamSplitDataIterator" and plain_kind != captured_kind, (plain_kind, captured_kind)
