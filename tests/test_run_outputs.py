"""What a user sees from one real run (local Ray, DeepSpeed ZeRO-2, tiny SDXL): TensorBoard event files, the MLflow
run, the loss-curve PNG, the sample grid and the driver's summary."""

import contextlib
import glob
import io
import os

import numpy as np
import pytest
from PIL import Image

from raydiff.train import driver
from raydiff.train.metrics_log import read_metrics

pytestmark = pytest.mark.integration

STEPS = 6


@pytest.fixture(scope="module")
def finished_run(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("outputs")
    overrides = [f"run.storage_path={root}", "run.name=watched", f"train.max_steps={STEPS}",
                 "validation.every_n_steps=3", "checkpoint.every_n_steps=3", "data.demo_num_images=96",
                 "data.val_fraction=0.15", f"logging.mlflow_uri=file://{root}/mlruns", "logging.sample_steps=2",
                 # TensorBoard and MLflow mirror Ray reports; report every step so they hold every metrics.jsonl row.
                 "train.report_every_n_steps=1"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert driver.main([arg for o in overrides for arg in ("--set", o)]) == 0
    run_dir = os.path.join(root, "watched")
    return {"root": str(root), "run_dir": run_dir, "stdout": buf.getvalue(),
            "rows": read_metrics(os.path.join(run_dir, "metrics.jsonl"))}


def tensorboard_scalars(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(logdir, size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    scalars = {tag: {(e.step, e.value) for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    return scalars, acc.Tags()["images"], acc


def test_tensorboard_holds_the_reported_scalars_and_a_sample_grid(finished_run):
    logdir = os.path.join(finished_run["run_dir"], "tensorboard")
    assert glob.glob(os.path.join(logdir, "events.out.tfevents.*"))
    scalars, images, acc = tensorboard_scalars(logdir)
    for key in ("loss", "val_loss", "lr", "samples_per_s"):
        # TensorBoard stores float32: compare with each row's value as float32 (rounding decimals can split a tie)
        expected = {(r["step"], float(np.float32(r[key]))) for r in finished_run["rows"] if r.get(key) is not None}
        assert expected and scalars[key] == expected, key
    assert "samples" in images
    grid = acc.Images("samples")[-1]
    assert grid.step == STEPS and grid.width == 2 * grid.height  # the two default prompts side by side


def test_mlflow_run_holds_params_and_metrics(finished_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"file://{finished_run['root']}/mlruns")
    (run,) = client.search_runs([client.get_experiment_by_name("raydiff").experiment_id])
    assert run.info.run_name == "watched" and run.info.status == "FINISHED"
    assert run.data.params["objective.gamma"] == "0.1"
    assert run.data.params["train.max_steps"] == str(STEPS)
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    expected = {r["step"]: r["loss"] for r in finished_run["rows"] if r.get("loss") is not None}
    assert sorted(history) == list(range(1, STEPS + 1))
    assert history == pytest.approx(expected)
    vals = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_loss"))
    assert vals == [0, 3, 6]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"loss_curve.png", "samples.png"}


def test_loss_curve_samples_and_summary(finished_run):
    run_dir = finished_run["run_dir"]
    with Image.open(os.path.join(run_dir, "loss_curve.png")) as img:
        assert img.format == "PNG" and img.width > 200
    with Image.open(os.path.join(run_dir, "samples.png")) as img:
        assert img.width == 2 * img.height
    out = finished_run["stdout"]
    best = min(r["val_loss"] for r in finished_run["rows"] if r.get("val_loss") is not None)
    assert "[raydiff] run finished" in out
    assert f"steps:          {STEPS}" in out
    assert f"best val_loss:  {best:.4f}" in out
    assert "samples/s" in out and "wall time:" in out
    assert f"model:          {os.path.join(run_dir, 'final')}" in out
    assert os.path.join(run_dir, "checkpoint_") in out
    assert os.path.join(run_dir, "loss_curve.png") in out
