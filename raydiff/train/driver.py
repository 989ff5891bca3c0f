"""The Ray driver: validate, prepare the run directory, build the Ray Data pipeline and the TorchTrainer, fit, report.

`python -m raydiff.train [--config NAME|PATH] [--set section.key=value ...]`
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field

import ray
import ray.data
import ray.train
from ray.data import ExecutionOptions
from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from raydiff import console, hub, shape, storage
from raydiff.compat import find_bootstrap_address
from raydiff.config import (Config, ConfigError, ScalingSection, help_text, is_uri, load_config, markdown_table,
                            run_dir, storage_path)
from raydiff.data import manifest as manifests
from raydiff.data import sources, stats
from raydiff.data.demo import ensure_demo_dataset
from raydiff.data.pipeline import PREPROCESS_TASKS, DataSpec, build_datasets, build_manifest, held_out_rows
from raydiff.data.precompute import EncoderSpec, ensure_cache
from raydiff.train import summary as summ
from raydiff.train import tracking
from raydiff.train.checkpoint import resume_without_ray_list
from raydiff.train.deepspeed_setup import PRECISION_DTYPES
from raydiff.train.entry import train_loop_per_worker
from raydiff.train.metrics_log import read_metrics

logger = logging.getLogger(__name__)


SHAPE_STORAGE = "~/raydiff_runs/shape-checks"


@dataclass
class RunOutputs:
    run_dir: str
    model_dir: str
    metrics_path: str
    checkpoint_path: str | None
    metrics: dict
    wall_s: float = 0.0
    extras: dict[str, str] = field(default_factory=dict)  # further outputs by label: plot, samples, TensorBoard...


def init_ray(cfg: Config, num_cpus: float | None = None) -> None:
    """Join the cluster we run in (ray job submit sets RAY_ADDRESS; on a node of a `ray start` cluster Ray finds
    it), else start a local Ray sized for the run (or for `num_cpus`, the need of several concurrent runs)."""
    # Ray Data's progress bars would bury the training progress lines in the driver log.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    # The controller drains each worker's one-slot report queue at this interval (default 2 s), which bounds how
    # fast ray.train.report returns; Ray propagates this variable from the driver to the controller.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    # How often Ray Train asks the GCS for nodes being drained (default 5 s): a preemption notice reaches the workers
    # within this, and they checkpoint at the next step (raydiff.train.preemption). One GCS call per run.
    os.environ.setdefault("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "2")
    # Ray Train also routes worker prints through its logger, which shows every progress line twice.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    ray.data.DataContext.get_current().enable_progress_bars = False
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if (address and address != "local") or (address is None and _local_cluster_answers()):
        ray.init(log_to_driver=True)  # ray.init(num_cpus=...) would refuse to join a running cluster
        return
    # Training workers hold fractional CPUs; make sure Ray Data's preprocessing still gets whole CPUs on a laptop.
    needed = num_cpus or run_cpus(cfg)
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(needed + 0.999)), include_dashboard=False)


def _local_cluster_answers() -> bool:
    """Whether the cluster a `ray start` on this machine recorded (where ray.init looks) is up. A record left by a
    cluster that died without `ray stop` would make ray.init try to join a dead address; it is reported and ignored."""
    recorded = find_bootstrap_address(None)
    if not recorded:
        return False
    host, _, port = recorded.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
        return True
    except (OSError, ValueError):
        logger.info("ignoring %s, the Ray cluster recorded on this machine: it does not answer (stopped without "
                    "`ray stop`?); starting a local Ray", recorded)
        return False


def run_cpus(cfg: Config) -> float:
    """Logical CPUs one run needs to never stall: its workers, each worker's preprocessing tasks (and streamed
    encoder actors) at full concurrency, and one for the read and sort tasks that feed them."""
    streamed = cfg.data.precompute != "none" and not cfg.data.cache_dir
    streamed_encoders = cfg.data.precompute_concurrency if streamed else 0
    return cfg.scaling.max_workers * (cfg.scaling.cpus_per_worker + PREPROCESS_TASKS + streamed_encoders) + 1


def data_spec(cfg: Config, stats_actor: str | None = None) -> DataSpec:
    """The run's data: its data section, with the generated demo dataset's path when data.source is unset."""
    source = cfg.data.source or ensure_demo_dataset(hub.default_cache_dir(), num_images=cfg.data.demo_num_images)
    return DataSpec(dataclasses.replace(cfg.data, source=source), seed=cfg.train.seed, stats_actor=stats_actor)


def encoder_spec(cfg: Config):
    m, d = cfg.model, cfg.data
    return EncoderSpec(pretrained=m.pretrained, mode=d.precompute, vae=m.vae, revision=m.revision, variant=m.variant,
                       text_dtype=str(PRECISION_DTYPES[cfg.deepspeed.precision]).removeprefix("torch."),
                       concurrency=d.precompute_concurrency, num_gpus=d.precompute_num_gpus,
                       zero_empty_prompt=hub.zeros_for_empty_prompt(m.pretrained, m.revision))


def with_precompute(cfg: Config, spec, tokenizer_path: str, manifest):
    """The data spec with its precompute: an encoder stage in every epoch stream, or a cache built (or found) now."""
    if cfg.data.precompute == "none":
        return spec
    encoder = encoder_spec(cfg)
    if not cfg.data.cache_dir:
        return dataclasses.replace(spec, encoder=dataclasses.asdict(encoder))
    return dataclasses.replace(spec, cache=ensure_cache(spec, encoder, tokenizer_path, manifest,
                                                        resolve_dir(cfg.data.cache_dir)))


# Keys whose values change what a precompute cache holds (raydiff.data.precompute.fingerprint).
CACHE_KEYS = ("data.", "model.", "train.seed", "deepspeed.precision")


def prepare_precompute_cache(cfg: Config, workdir: str) -> None:
    """Build (or find) the precompute cache before a sweep's trials start: every trial whose searched keys leave the
    cache's fingerprint alone then reads it, instead of the first concurrent trials each encoding the whole dataset."""
    if cfg.data.precompute == "none" or not cfg.data.cache_dir or \
            any(key.startswith(CACHE_KEYS) for key in cfg.tune.search_space):
        return
    spec, manifest, tokenizer_path = run_data(cfg, workdir)
    with_precompute(cfg, spec, tokenizer_path, manifest)


def run_data(cfg: Config, workdir: str):
    """(data spec with its counter actor, source manifest, tokenizer model name) of a run, or a sweep, kept in
    `workdir`: the manifest holds the units and held-out rows (from metadata; every worker plans from it), the counter
    actor the distinct-row counters shared by preprocessing tasks and training workers."""
    spec = data_spec(cfg)
    manifest = run_manifest(spec, workdir)
    spec = dataclasses.replace(spec, stats_actor=stats.create(manifest.num_rows, workdir))
    return spec, manifest, hub.model_ref(cfg.model.pretrained, cfg.model.revision)  # a name: each node resolves it


def resolve_dir(path: str) -> str:
    """`$VARS` expanded (as in run.storage_path); a local directory made absolute (Ray workers run elsewhere)."""
    path = os.path.expandvars(path)
    return path if is_uri(path) else os.path.abspath(os.path.expanduser(path))


def _ordered():
    """Validation batches in a fixed order: each batch's fixed noise is keyed by its index."""
    return ExecutionOptions(preserve_order=True)


def build_trainer(cfg: Config, callbacks: list | None = None, resume_from: str | None = None) -> TorchTrainer:
    """A TorchTrainer for one run; `run.name` + `run.storage_path` identify it, so relaunching resumes it.
    `resume_from`: the checkpoint to start from when Ray hands the workers none (it had no usable list)."""
    spec, manifest, tokenizer_path = run_data(cfg, run_dir(cfg))
    stats_actor = spec.stats_actor
    logger.info("data: %s (%s): %s training rows, %s validation rows, %s read units; %s steps = %.1f epochs",
                cfg.data.source or "generated demo dataset", manifest.format, manifest.num_train, manifest.num_val,
                len(manifest.unit_rows), cfg.train.max_steps, summ.epochs_of(cfg, max(manifest.num_train, 1)))
    val_config, datasets = validation_data(spec, tokenizer_path, manifest, stats_actor)
    spec = with_precompute(cfg, spec, tokenizer_path, manifest)
    data = {"spec": spec, "tokenizer_path": tokenizer_path, "manifest": manifest}
    # An explicit filesystem carries the endpoint and credentials to Ray Train's controller and workers.
    where = storage_path(cfg)
    store_fs, store_path = storage.filesystem(where) if is_uri(where) else (None, where)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "run_dir": run_dir(cfg), "data_stats": stats_actor, "data": data,
                           "cloud_env": storage.cloud_env() if uses_object_store(cfg) else {},
                           "verbose": console.is_verbose(), "resume_from": resume_from, **val_config},
        scaling_config=scaling_config(cfg.scaling),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=store_path,
            storage_filesystem=store_fs,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            callbacks=callbacks,
            logging_config=LoggingConfig(log_level=console.train_log_level()),
        ),
        # At most a large val goes through Ray Train's ingest; each worker reads its own training stream
        # (raydiff.data.stream).
        datasets=datasets or None,
        dataset_config=DataConfig(datasets_to_split=[], execution_options={"val": _ordered()}) if datasets else None,
    )


def scaling_config(s: ScalingSection) -> ScalingConfig:
    """Ray Train's worker group: `scaling.num_workers` fixed, or [min, max] elastic (Ray Train starts once min fit,
    and every `scaling.resize_interval_s` restarts the group at the size the cluster then holds)."""
    resources = {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.use_gpu else {})}
    workers = (s.min_workers, s.max_workers) if s.elastic else s.num_workers
    return ScalingConfig(num_workers=workers, use_gpu=s.use_gpu, resources_per_worker=resources,
                         elastic_resize_monitor_interval_s=s.resize_interval_s)


def run_manifest(spec, path: str):
    """The source's manifest for this run: built at its first launch and kept in the run directory, so a relaunch
    reads no footers again and trains on the very units it started on. A source whose files changed since is
    refused, naming what changed: resuming would silently shift the stream."""
    saved = storage.join(path, manifests.MANIFEST_FILE)
    if not storage.exists(saved):
        manifest = build_manifest(spec, workdir=storage.join(path, "data"))
        storage.write_text(saved, manifest.to_json())
        return manifest
    src = sources.resolve(spec.data.source, spec.data.format)
    unit_fs = storage.filesystem(path)[0] if src.format == "imagefolder" else src.filesystem
    manifest = manifests.Manifest.from_json(storage.read_text(saved), src.filesystem, unit_fs)
    now = manifests.file_stats(src.filesystem, src.files)
    if manifests.fingerprint(now, src.format) != manifest.fingerprint:
        raise RuntimeError(f"data.source {spec.data.source!r} changed since this run started: "
                           f"{manifests.describe_change(manifest, now)}. Resuming would shift the training stream; "
                           f"restore the files it started on, or start a new run (another run.name).")
    return manifest


# Up to this many held-out rows are preprocessed in the driver itself (pipeline.held_out_rows); more go through Ray
# Data. 64 rows at 1024 px are ~200 MB of uint8 pixels in the driver (and once in the object store).
IN_DRIVER_VAL_ROWS = 64


def validation_data(spec, tokenizer_path: str, manifest, stats_actor: str) -> tuple[dict, dict]:
    """The held-out split, preprocessed once here, as (train_loop_config entries, Ray Train datasets): up to
    IN_DRIVER_VAL_ROWS rows go to the workers as one object they batch themselves (no Ray Train ingest: a dataset
    manager actor and an execution per worker, seconds of every start and restart); more rows are materialized in the
    object store and go through Ray Train's ingest. Every worker group after a restart reads these, not the source."""
    if len(manifest.val_rows) <= IN_DRIVER_VAL_ROWS:
        rows = held_out_rows(spec, tokenizer_path, manifest)
        if not rows:  # every held-out row was skipped: say why before any worker starts
            raise stats.no_data_error(stats_actor, "validation")
        return {"val_rows": ray.put(rows)}, {}
    val = build_datasets(spec, tokenizer_path, manifest=manifest)["val"].materialize()
    if val.count() == 0:
        raise stats.no_data_error(stats_actor, "validation")
    return {}, {"val": val}


def uses_object_store(cfg: Config) -> bool:
    """Whether workers open s3:// / gs:// paths themselves: run files, or a precompute cache read per epoch."""
    return is_uri(storage_path(cfg)) or is_uri(resolve_dir(cfg.data.cache_dir or ""))


def prepare_run_dir(cfg: Config) -> str:
    """Create the run directory and record the resolved config next to Ray's checkpoints."""
    path = run_dir(cfg)
    storage.makedirs(path)
    storage.write_text(storage.join(path, "config.yaml"), cfg.to_yaml())
    return path


def run_training(cfg: Config, callbacks: list | None = None) -> RunOutputs:
    start = time.perf_counter()
    init_ray(cfg)
    if cfg.model.pretrained == hub.TINY:  # built once here, before workers race for it (other names: each node's own)
        hub.local_pretrained(hub.TINY, parts=())  # imports diffusers into the driver only to build it
    path = prepare_run_dir(cfg)
    logger.info("%s", summ.format_start(cfg, path))
    resume_from = resume_without_ray_list(path)  # before Ray Train reads it
    mlflow_run = tracking.start_mlflow_run(cfg)
    try:
        result = build_trainer(cfg, [*(callbacks or []), tracking.RunTracker(cfg, mlflow_run)], resume_from).fit()
    except BaseException:  # stopped or failed: a relaunch resumes, and reopens the MLflow run
        tracking.end_mlflow_run(cfg, mlflow_run, status="FAILED")
        raise
    finally:
        stats.flush_all()  # the distinct-row counters a relaunch continues from
    out = RunOutputs(run_dir=path, model_dir=storage.join(path, "final"),
                     metrics_path=storage.join(path, "metrics.jsonl"),
                     checkpoint_path=result.checkpoint.path if result.checkpoint else None,
                     metrics=result.metrics or {})
    finish_run(cfg, out, mlflow_run)
    out.wall_s = time.perf_counter() - start
    return out


def finish_run(cfg: Config, out: RunOutputs, mlflow_run: str | None) -> None:
    """The loss-curve PNG, a sample grid from the exported model, and the MLflow run's artifacts and end."""
    with tempfile.TemporaryDirectory() as tmp:
        files = {"loss curve": summ.plot_loss_curve(read_metrics(out.metrics_path), os.path.join(tmp, summ.LOSS_CURVE))}
        if cfg.logging.sample_prompts:
            grid = summ.sample_grid(cfg, out.model_dir)
            grid.save(os.path.join(tmp, summ.SAMPLES))
            files["samples"] = os.path.join(tmp, summ.SAMPLES)
            if cfg.logging.tensorboard:
                tracking.log_sample_grid(cfg, grid, int(out.metrics.get("step", 0)))
        for label, local in files.items():
            out.extras[label] = storage.join(out.run_dir, os.path.basename(local))
            with open(local, "rb") as f:
                storage.write_bytes(out.extras[label], f.read())
        tracking.end_mlflow_run(cfg, mlflow_run, tuple(files.values()))
    if cfg.logging.tensorboard:
        out.extras["tensorboard"] = f"tensorboard --logdir {storage.join(out.run_dir, 'tensorboard')}"
    if mlflow_run:
        out.extras["mlflow run"] = f"{cfg.logging.mlflow_uri} (run id {mlflow_run})"


def parse_args(argv: list[str] | None, prog: str, description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", default=None, help="config NAME (configs/NAME.yaml) or PATH; default tiny_cpu")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config key; repeatable")
    parser.add_argument("--shape-check", nargs="?", const=SHAPE_STORAGE, default=None, metavar="DIR",
                        help="run the config on this machine's CPUs at toy size (tiny model, demo data, a few steps), "
                             f"every other setting kept, into DIR (default {SHAPE_STORAGE}): see raydiff/shape.py")
    parser.add_argument("--verbose", action="store_true",
                        help=f"show every line Ray and the libraries print (also {console.VERBOSE_ENV}=1); by default "
                             "they go to Ray's log files only")
    parser.add_argument("--help-config", action="store_true",
                        help="list every config key (type, default, meaning; with --config, that config's values "
                             "too) and exit")
    parser.add_argument("--markdown", action="store_true", help="with --help-config: as the README's key tables")
    args = parser.parse_args(argv)
    if args.markdown and not args.help_config:
        parser.error("--markdown goes with --help-config")
    if args.help_config:  # before any Ray work, like --help
        print(markdown_table() if args.markdown else help_text(*_given_config(parser, args)))
        parser.exit(0)
    return args


def _given_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[Config | None, str]:
    """The --config/--set config to show beside the defaults (not validated: its placeholders may still be unset)."""
    if args.config is None and not args.overrides:
        return None, ""
    try:
        return load_config(args.config, args.overrides, check=False), args.config or "--set"
    except ConfigError as exc:
        parser.error(f"config error: {exc}")


def load_cli_config(argv: list[str] | None, prog: str, description: str) -> Config:
    args = parse_args(argv, prog, description)
    try:
        if args.shape_check is None:
            return load_config(args.config, args.overrides)
        cfg = load_config(args.config, args.overrides, check=False)
        return shape.in_shape(cfg, os.path.abspath(os.path.expanduser(args.shape_check)))
    except ConfigError as exc:
        print(f"{prog}: config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> int:
    cfg = load_cli_config(argv, "python -m raydiff.train", "Train SDXL with input perturbation on Ray + DeepSpeed.")
    out = run_training(cfg)
    s = summ.Summary.from_rows(read_metrics(out.metrics_path), out.wall_s)
    extras = {"metrics": out.metrics_path, "config": storage.join(out.run_dir, "config.yaml"), **out.extras}
    # The command's result (a block to read or paste), not a log line: printed as it is.
    print("\n" + summ.format_summary(s, out.run_dir, out.model_dir, out.checkpoint_path, extras), flush=True)
    return 0
