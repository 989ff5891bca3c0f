"""What a user watches besides the driver log: TensorBoard event files and (optionally) an MLflow run.

`RunTracker` is a Ray Train `UserCallback`: it runs in the Train controller, which Ray pins to the driver's node,
so the per-worker loop stays free of logging code and a local run directory is the driver's own disk. For s3:// /
gs:// run directories the event files are written to a local staging directory and copied up on every checkpoint
(the last report always carries one). MLflow gets one run per raydiff run: its id is kept in the run directory, so
a resumed run keeps logging to the same MLflow run.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os

import numpy as np
from ray.train import UserCallback

from raydiff import hub, storage  # light: the Train controller, which runs RunTracker, imports no torch
from raydiff.config import Config, is_uri, run_dir

logger = logging.getLogger(__name__)

SCALARS = ("loss", "val_loss", "lr", "samples_per_s", "gamma", "epoch")
MLFLOW_RUN_FILE = "mlflow_run.json"


def tensorboard_dirs(cfg: Config) -> tuple[str, str | None]:
    """(where event files are written, where they are copied to or None when that is the same place)."""
    target = storage.join(run_dir(cfg), "tensorboard")
    if not is_uri(target):
        return target, None
    return os.path.join(hub.default_cache_dir(), "tensorboard-staging", cfg.run.name), target


def reported_scalars(metrics: dict) -> dict[str, float]:
    return {k: float(metrics[k]) for k in SCALARS
            if isinstance(metrics.get(k), (int, float)) and math.isfinite(metrics[k])}


def flat_params(cfg: Config) -> dict[str, str]:
    return {f"{section}.{key}": str(value)
            for section, values in cfg.to_dict().items() for key, value in values.items()}


# ---------------------------------------------------------------- MLflow


def mlflow_client(cfg: Config):
    from mlflow.tracking import MlflowClient  # here and below: mlflow is an optional extra (logging.mlflow_uri)

    if cfg.logging.mlflow_uri.startswith("file:"):
        # MLflow 3 refuses file stores unless opted in; a file:// URI in the config is that opt-in. Set here, as the
        # Train controller (where metrics are logged) does not inherit the driver's environment.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")

    return MlflowClient(tracking_uri=cfg.logging.mlflow_uri)


def start_mlflow_run(cfg: Config) -> str | None:
    """Create (or, on resume, reuse) the MLflow run of this raydiff run and log the resolved config as params."""
    if not cfg.logging.mlflow_uri:
        return None
    path = storage.join(run_dir(cfg), MLFLOW_RUN_FILE)
    client = mlflow_client(cfg)
    if storage.exists(path):
        run_id = json.loads(storage.read_text(path))["run_id"]
        client.update_run(run_id, status="RUNNING")
        return run_id
    experiment = client.get_experiment_by_name(cfg.logging.mlflow_experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(cfg.logging.mlflow_experiment)
    run_id = client.create_run(experiment_id, run_name=cfg.run.name).info.run_id
    from mlflow.entities import Param

    client.log_batch(run_id, params=[Param(k, v) for k, v in flat_params(cfg).items()])
    storage.write_text(path, json.dumps({"run_id": run_id, "tracking_uri": cfg.logging.mlflow_uri}))
    return run_id


def end_mlflow_run(cfg: Config, run_id: str | None, artifacts: tuple[str, ...] = (), status: str = "FINISHED") -> None:
    if run_id is None:
        return
    client = mlflow_client(cfg)
    for path in artifacts:
        client.log_artifact(run_id, path)
    client.set_terminated(run_id, status=status)


# ---------------------------------------------------------------- the callback


class RunTracker(UserCallback):
    """Mirrors rank 0's reports (every rank reports the same numbers) to TensorBoard and MLflow."""

    def __init__(self, cfg: Config, mlflow_run_id: str | None):
        self.cfg = cfg
        self.mlflow_run_id = mlflow_run_id
        self._writer = None  # created in the controller: writers and clients do not pickle
        # The controller may run in a cluster started before the object-store variables were set (as the workers).
        self.cloud_env = storage.cloud_env()

    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter  # here: torch only when TensorBoard is on

            self._writer = SummaryWriter(log_dir=tensorboard_dirs(self.cfg)[0])
        return self._writer

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        os.environ.update(self.cloud_env)
        report = metrics[0]
        step, scalars = int(report.get("step", 0)), reported_scalars(report)
        if checkpoint is not None:
            logger.info("checkpoint at step %d: %s", step, checkpoint.path)
        if self.cfg.logging.tensorboard:
            for key, value in scalars.items():
                self.writer().add_scalar(key, value, global_step=step)
            if "val_loss" in report:
                self.add_validation_grid(step)
            self.writer().flush()
            if checkpoint is not None:
                sync_tensorboard(self.cfg)
        if self.mlflow_run_id:
            from mlflow.entities import Metric

            now = int(report.get("time", 0) * 1000)
            mlflow_client(self.cfg).log_batch(
                self.mlflow_run_id, metrics=[Metric(k, v, now, step) for k, v in scalars.items()])


    def add_validation_grid(self, step: int) -> None:
        """The sample grid of this step's validation (validation.prompts), which rank 0 wrote to <run>/samples
        before it reported: TensorBoard is written here and by the driver (log_sample_grid), not by workers."""
        path = storage.join(run_dir(self.cfg), "samples", f"step_{step:06d}.png")
        if not self.cfg.validation.prompts or not storage.exists(path):
            return
        from PIL import Image  # here: only for runs with validation images

        grid = np.asarray(Image.open(io.BytesIO(storage.read_bytes(path))).convert("RGB"))
        self.writer().add_image("samples", grid, global_step=step, dataformats="HWC")


def sync_tensorboard(cfg: Config) -> None:
    local, target = tensorboard_dirs(cfg)
    if target is not None and os.path.isdir(local):
        storage.upload_dir(local, target)


def log_sample_grid(cfg: Config, grid, step: int) -> None:
    """The end-of-run sample grid as a TensorBoard image (HWC uint8)."""
    from torch.utils.tensorboard import SummaryWriter  # (as in RunTracker.writer)

    with SummaryWriter(log_dir=tensorboard_dirs(cfg)[0]) as writer:
        writer.add_image("samples", np.asarray(grid), global_step=step, dataformats="HWC")
    sync_tensorboard(cfg)
