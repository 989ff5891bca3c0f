"""Typed run configuration: dataclass sections <-> YAML, `--set a.b=c` overrides, validation before any Ray work.

Every key a user can write is a field below, declared with `setting(default, help, ge=/gt=/le=/lt=)`: its meaning,
range and (as a `Literal` type) its choices live next to it. From them come the coercion and validation here,
`python -m raydiff.train --help-config` and the README's key table. Unknown keys are rejected with the closest name.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import glob
import importlib.util
import operator
import os
import re
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, TypeVar

import yaml

from raydiff.data.buckets import parse_buckets  # a leaf module (re, math): no Ray, no torch

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = "tiny_cpu"


class ConfigError(ValueError):
    """A config problem, always naming the offending key."""


# ---------------------------------------------------------------- choices (the lower layers derive their tables)

Precision = Literal["fp32", "bf16", "fp16"]
ZeroStage = Literal[0, 1, 2, 3]
Attention = Literal["sdpa", "eager"]
Optimizer = Literal["adamw", "adafactor"]
LrScheduler = Literal["constant", "cosine", "linear"]
GammaSchedule = Literal["constant", "linear_decay", "random_strength"]
PredictionType = Literal["epsilon", "v_prediction"]
DataFormat = Literal["parquet", "imagefolder", "webdataset"]
OnError = Literal["skip", "raise"]
Precompute = Literal["none", "text", "latents"]
TuneScheduler = Literal["asha", "fifo"]
SearchAlg = Literal["random", "optuna"]
LrScaling = Literal["sqrt", "linear", "none"]
WorkerCount = typing.Union[int, list[int]]  # n workers, or [min, max]: elastic

BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}  # setting() keywords -> the comparison they require
_COMPARE = {"ge": operator.ge, "gt": operator.gt, "le": operator.le, "lt": operator.lt}


def setting(default: Any, help: str, **bounds: float) -> Any:
    """A config field: its default, one line of meaning, and its range as `ge`/`gt`/`le`/`lt` bounds (checked by
    `validate`; a null value of an optional field is exempt)."""
    unknown = set(bounds) - set(BOUNDS)
    if unknown:
        raise TypeError(f"setting(): unknown bound(s) {sorted(unknown)}; use {list(BOUNDS)}")
    meta = {"help": help, **bounds}
    if isinstance(default, (list, dict)):  # a fresh copy per Config
        return field(default_factory=functools.partial(copy.deepcopy, default), metadata=meta)
    return field(default=default, metadata=meta)


def choices(tp: Any) -> tuple:
    """The values a `Literal` type (or an optional one) allows."""
    inner, _ = _unwrap_optional(tp)
    if typing.get_origin(inner) is not Literal:
        raise TypeError(f"{tp} is not a Literal type")
    return typing.get_args(inner)


V = TypeVar("V")


def per_choice(tp: Any, table: dict[Any, V]) -> dict[Any, V]:
    """`table` (e.g. precision -> torch dtype) after checking it has one entry per choice of the `Literal` `tp`: a
    choice added to the config without its entry fails at import, not in the middle of a run."""
    if set(table) != set(choices(tp)):
        raise TypeError(f"table keys {sorted(map(str, table))} do not match the config's choices {list(choices(tp))}")
    return table


# ---------------------------------------------------------------- sections


@dataclass
class RunSection:
    """Which run this is and where it is stored."""

    name: str = setting("raydiff-tiny", "With run.storage_path it identifies the run: relaunching the same name "
                        "resumes it (never put a timestamp in it).")
    storage_path: str = setting("~/raydiff_runs", "Local dir, NFS path or s3:// / gs:// URI (multi-node runs need "
                                "shared storage); $VARS are expanded where the run starts.")
    max_failures: int = setting(0, "Worker-group restarts from the latest checkpoint before the run fails.", ge=0)


@dataclass
class ScalingSection:
    """Ray Train's worker group: a fixed number of workers, or elastic between [min, max] (docs/reliability.md)."""

    num_workers: WorkerCount = setting(2, "Training workers (one per GPU on a GPU cluster); [min, max]: elastic, the "
                                       "run starts once min fit, grows up to max when the cluster can place more, "
                                       "shrinks when nodes go, each time resuming from the latest checkpoint.", gt=0)
    use_gpu: bool = setting(False, "Train on GPUs.")
    cpus_per_worker: float = setting(0.5, "CPUs reserved per worker; fractions leave room for Ray Data's "
                                     "preprocessing tasks on small machines.", ge=0)
    gpus_per_worker: float = setting(1.0, "GPUs reserved per worker (with scaling.use_gpu).")
    resize_interval_s: float = setting(60.0, "Elastic runs: seconds between checks for room to grow (Ray Train's "
                                       "elastic_resize_monitor_interval_s); a grow restarts from the latest "
                                       "checkpoint.", gt=0)
    lr_scaling: LrScaling = setting("sqrt", "Elastic runs keep the per-worker batch, so the global batch follows the "
                                    "workers W; optim.lr is the LR at max workers, scaled at W by sqrt(W / max), "
                                    "W / max (linear) or not at all (none).")

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, list) else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[-1] if isinstance(self.num_workers, list) else self.num_workers

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, list)


@dataclass
class TrainSection:
    """The training loop: length, batch, speed switches (docs/performance.md), how often it logs and reports."""

    max_steps: int = setting(60, "Optimizer steps to train.", gt=0)
    batch_size: int = setting(4, "Samples per worker per micro-step.", gt=0)
    grad_accum: int = setting(1, "Micro-steps per optimizer step.", gt=0)
    seed: int = setting(0, "Seeds the data stream (order, crops, flips, caption dropout) and the training noise.",
                        ge=0)
    grad_clip: float = setting(1.0, "Largest gradient norm; 0 disables clipping.", ge=0)
    gradient_checkpointing: bool = setting(False, "Recompute activations in the backward pass (less memory, about "
                                           "30 % more compute).")
    attention: Attention = setting("sdpa", "Attention kernel: sdpa (PyTorch's fused scaled_dot_product_attention) "
                                   "or eager (diffusers' explicit softmax, a baseline).")
    channels_last: bool = setting(False, "NHWC weights for the convolutions.")
    compile: bool = setting(False, "torch.compile of the UNet, in place (not with ZeRO-3).")
    log_every_n_steps: int = setting(1, "Steps between metrics.jsonl rows (rank 0, cheap).", gt=0)
    progress_every_s: float = setting(2.0, "Least seconds between console progress lines (a logged step with "
                                      "val_loss, and the last step, always print one); 0: every logged step.", ge=0)
    report_every_n_steps: int = setting(10, "Steps between ray.train.report calls (a barrier, ~0.1-2 s; what Tune "
                                        "schedulers see); validation and checkpoint steps always report.", gt=0)
    prefetch_batches: int = setting(2, "Batches each worker's data iterator prepares ahead.", ge=0)
    ema_decay: Optional[float] = setting(None, "EMA of the fp32 master weights (decay per optimizer step), sharded "
                                         "like them; the export then holds the EMA weights. null: off.", gt=0, lt=1)


@dataclass
class OptimSection:
    """Optimizer and learning-rate schedule."""

    optimizer: Optimizer = setting("adamw", "Optimizer (DeepSpeedCPUAdam on GPU workers with "
                                   "deepspeed.offload_optimizer).")
    lr: float = setting(1e-4, "Peak learning rate.", gt=0)
    weight_decay: float = setting(1e-2, "Decoupled weight decay.", ge=0)
    beta1: float = setting(0.9, "Decay of the first-moment estimate.")
    beta2: float = setting(0.999, "Decay of the second-moment estimate.")
    eps: float = setting(1e-8, "Added to the denominator for numerical stability.")
    lr_scheduler: LrScheduler = setting("constant", "Learning-rate shape after the warmup.")
    warmup_steps: int = setting(0, "Optimizer steps of linear warmup from 0.", ge=0)


@dataclass
class DeepSpeedSection:
    """DeepSpeed ZeRO: sharding, precision, offload, communication buckets."""

    zero_stage: ZeroStage = setting(2, "ZeRO stage: 0 replicates everything; 1 shards optimizer states, 2 also "
                                    "gradients, 3 also parameters.")
    precision: Precision = setting("fp32", "Training precision; bf16 and fp16 need ZeRO 1-3 (fp32 master weights), "
                                   "fp16 needs GPUs.")
    offload_optimizer: bool = setting(False, "Optimizer state and fp32 masters in host RAM (ZeRO 1-3): "
                                      "DeepSpeedCPUAdam on GPU workers, torch's optimizer on CPU.")
    allgather_bucket_size: int = setting(500_000_000, "Elements per ZeRO all-gather bucket. DeepSpeed's default: "
                                         "~6 buckets per micro-step for the SDXL UNet, ~1 GB of bf16 each.")
    reduce_bucket_size: int = setting(500_000_000, "Elements per ZeRO reduce-scatter bucket.")


@dataclass
class ObjectiveSection:
    """The Input Perturbation objective (formulas and sources: docs/objective.md)."""

    gamma: float = setting(0.1, "IP strength: inputs get noise eps + gamma * xi, the target stays eps (the paper "
                           "finds > 0.2 too strong).", ge=0, le=1)
    gamma_schedule: GammaSchedule = setting("constant", "constant; linear_decay (gamma falls to 0 at "
                                            "gamma_decay_steps); random_strength (gamma * u, u ~ U(0, 1)).")
    gamma_decay_steps: int = setting(0, "linear_decay: the step at which gamma reaches 0 (0: train.max_steps).",
                                     ge=0)
    gamma_per_sample: bool = setting(False, "random_strength: one u per sample instead of one per batch.")
    prediction_type: Optional[PredictionType] = setting(None, "The UNet's target; null: from the model's "
                                                        "scheduler config.")
    noise_offset: float = setting(0.0, "Offset noise, built into eps (input and target).", ge=0)
    snr_gamma: Optional[float] = setting(None, "Min-SNR-gamma loss weighting; null: off.", gt=0)


@dataclass
class ModelSection:
    """The pretrained SDXL pipeline to fine-tune."""

    pretrained: str = setting("tiny", "Hub id, local diffusers directory, or tiny (a random-init toy SDXL).")
    vae: Optional[str] = setting(None, "A separate VAE, e.g. madebyollin/sdxl-vae-fp16-fix; null: the model's.")
    revision: Optional[str] = setting(None, "Hub revision (branch, tag or commit).")
    variant: Optional[str] = setting(None, "Weights variant to load, e.g. fp16.")


@dataclass
class DataSection:
    """The dataset and its preprocessing (raydiff/data): the data layer reads this section itself."""

    source: Optional[str] = setting(None, "File, directory, glob or s3:// / gs:// URI; null: the generated demo "
                                    "dataset.")
    format: Optional[DataFormat] = setting(None, "The source's format; null: detected from the files.")
    image_column: str = setting("image", "Column holding the images.")
    caption_column: str = setting("text", "Column holding the captions.")
    resolution: int = setting(64, "Training size in pixels (square crops, or the scale of data.buckets); a "
                              "multiple of 8.", gt=0)
    center_crop: bool = setting(False, "Center crops instead of random ones.")
    random_flip: bool = setting(True, "Horizontal flips, drawn per sample and epoch.")
    val_fraction: float = setting(0.05, "Share of the rows held out for validation.", gt=0, lt=1)
    val_max_samples: int = setting(16, "Most rows held out.", gt=0)
    on_error: OnError = setting("skip", "A row that cannot be read or decoded: skip (counted, logged) or raise.")
    max_aspect_ratio: float = setting(4.0, "Images whose long/short side is above this are skipped.", ge=1)
    shuffle_window: int = setting(2048, "Rows a worker shuffles together within its span of an epoch (whole read "
                                  "units: parquet row groups, tar shards); a read task's memory grows with it.", gt=0)
    buckets: list[str] = setting([], "Aspect-ratio buckets: [] square crops at data.resolution; [sdxl] the SDXL list "
                                 "scaled to data.resolution; or WIDTHxHEIGHT sizes, e.g. [1152x896, 896x1152].")
    demo_num_images: int = setting(320, "Images in the generated demo dataset (data.source unset).", gt=0)
    record_rows: bool = setting(False, "Each rank writes the source rows and epochs it trains on at each step to "
                                "<run>/rows/ at every checkpoint (raydiff.train.row_trace): an audit that each epoch "
                                "reads every row once across restarts and resizes; ~20 bytes per row and epoch.")
    caption_dropout: float = setting(0.0, "Probability of training on the empty prompt (for classifier-free "
                                     "guidance).", ge=0, lt=1)
    precompute: Precompute = setting("none", "Frozen encoders in a Ray Data actor pool instead of the training step: "
                                     "none, text (text encoders) or latents (also the VAE).")
    cache_dir: Optional[str] = setting(None, "With data.precompute: a directory or URI for a parquet cache reused by "
                                       "runs with the same fingerprint (the random crop is then drawn once); null: "
                                       "encode in the stream.")
    precompute_concurrency: int = setting(1, "Encoder actors (per worker stream when streamed; for the build when "
                                          "cached).", gt=0)
    precompute_num_gpus: float = setting(0.0, "GPUs per encoder actor (needs scaling.use_gpu).", ge=0)


@dataclass
class CheckpointSection:
    """Ray Train checkpoints (every rank's DeepSpeed shards, RNG states, data position)."""

    every_n_steps: int = setting(20, "Optimizer steps between checkpoints (the last step always saves one).", gt=0)
    keep: int = setting(2, "Checkpoints kept; older ones are deleted.", gt=0)
    on_preemption: bool = setting(True, "Save one at the next step after a node of the worker group gets a "
                                  "preemption notice (a drain), then wait for Ray Train's restart: no step is lost.")


@dataclass
class ValidationSection:
    """Held-out loss at fixed timesteps and noise, exposure bias, sample images."""

    every_n_steps: int = setting(20, "Optimizer steps between validations (also run at step 0).", gt=0)
    batch_size: int = setting(4, "Held-out samples per worker per validation batch.", gt=0)
    seed: int = setting(1234, "Seeds the fixed validation noise and the sample images.")
    timesteps: list[int] = setting([125, 375, 625, 875], "Timesteps in [0, 1000) at which every held-out sample is "
                                   "scored, so runs with any gamma see the same loss terms.")
    exposure_bias_denoising_steps: int = setting(10, "Denoising steps of the DDIM chain on the held-out latents "
                                                 "that measures exposure bias; 0: off.", ge=0, le=1000)
    eps_scale: float = setting(1.0, "Epsilon Scaling lambda of that chain and of the sample images (1: off; the "
                               "paper uses ~1.005-1.02).", ge=0.5, le=2)
    prompts: list[str] = setting([], "Prompts rendered into <run>/samples/step_XXXXXX.png at each validation; "
                                 "[]: none.")
    image_denoising_steps: int = setting(20, "Denoising steps of each of those images.", gt=0)


@dataclass
class TuneSection:
    """`python -m raydiff.tune` only: one trial per sampled config, ranked by the unperturbed `val_loss`."""

    search_space: dict[str, Any] = setting({}, "Dotted config key -> one of {grid: [..]}, {choice: [..]}, "
                                           "{uniform: [lo, hi]}, {loguniform: [lo, hi]}.")
    num_samples: int = setting(1, "Samples per grid point.", gt=0)
    scheduler: TuneScheduler = setting("asha", "asha stops weak trials at val_loss reports; fifo runs every trial "
                                       "to the end.")
    grace_period: int = setting(1, "ASHA: optimizer steps before a trial can be stopped.", gt=0)
    reduction_factor: float = setting(3.0, "ASHA: the best 1/reduction_factor go on at each rung.", gt=1)
    max_concurrent_trials: Optional[int] = setting(None, "null: as many as the cluster's CPUs (or GPUs) fit, given "
                                                   "each trial's scaling section.", gt=0)
    search_alg: SearchAlg = setting("random", "random (grid keys expanded, the others sampled) or optuna.")


@dataclass
class LoggingSection:
    """TensorBoard, MLflow and the end-of-run sample grid."""

    tensorboard: bool = setting(True, "Event files in <run>/tensorboard.")
    mlflow_uri: Optional[str] = setting(None, "e.g. http://mlflow:5000 or file:///path (pip install "
                                        "'raydiff[mlflow]'); null: no MLflow.")
    mlflow_experiment: str = setting("raydiff", "MLflow experiment name.")
    sample_prompts: list[str] = setting(["a red circle on a blue background",
                                         "a small green square and a large yellow star"],
                                        "Prompts of a grid from the exported model at the end of the run "
                                        "(TensorBoard and samples.png); []: none.")
    sample_denoising_steps: int = setting(20, "Denoising steps of each image of that grid.", gt=0)


@dataclass
class Config:
    run: RunSection = field(default_factory=RunSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimSection = field(default_factory=OptimSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    tune: TuneSection = field(default_factory=TuneSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def get(self, dotted: str) -> Any:
        section, key = _split_key(dotted)
        return getattr(getattr(self, section), key)


# ---------------------------------------------------------------- building from dicts


def _split_key(dotted: str) -> tuple[str, str]:
    parts = dotted.split(".")
    if len(parts) != 2:
        raise ConfigError(f"config key '{dotted}' must have the form section.key")
    return parts[0], parts[1]


def _suggest(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else f" (valid: {', '.join(sorted(names))})"


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _unwrap_optional(tp) -> tuple[Any, bool]:
    """Return (inner type, is_optional) for Optional[X] / X | None."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp, key: str) -> Any:
    """Coerce a YAML or command-line value to the field's declared type."""
    inner, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("null", "none", "~")):
        if optional:
            return None
        raise ConfigError(f"config key '{key}' may not be null")
    if typing.get_origin(inner) in (typing.Union, types.UnionType):  # e.g. int | list[int]: a list takes the list arm
        return _coerce_union(value, typing.get_args(inner), key)
    if typing.get_origin(inner) is Literal:
        allowed = typing.get_args(inner)
        value = _coerce(value, type(allowed[0]), key)  # "2" -> 2 for ZeRO stages
        _check(value in allowed, key, _choice_message(allowed, value))
        return value
    if typing.get_origin(inner) is list:
        (item_tp,) = typing.get_args(inner)
        if isinstance(value, str):
            parsed = yaml.safe_load(value)
            value = parsed if isinstance(parsed, list) else [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if typing.get_origin(inner) is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if inner is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if inner is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
    if inner is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}") from None
    if inner is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return str(value)
    raise ConfigError(f"config key '{key}': unsupported type {tp}")


def _coerce_union(value: Any, arms: tuple, key: str) -> Any:
    """A value of `scalar | list[...]`: a list (YAML, or `a,b` / `[a, b]` from --set) takes the list arm."""
    if isinstance(value, str):
        parsed = yaml.safe_load(value) if value.strip() else value
        value = parsed if isinstance(parsed, list) or "," not in value else value.split(",")
    is_list = isinstance(value, (list, tuple))
    arm = next((a for a in arms if (typing.get_origin(a) is list) == is_list), None)
    if arm is None:
        raise ConfigError(f"config key '{key}' must be one of {' | '.join(_plain_type(a) for a in arms)}, "
                          f"got {value!r}")
    return _coerce(value, arm, key)


@functools.cache
def _section_types(section_cls) -> dict[str, Any]:
    return typing.get_type_hints(section_cls)


def from_dict(raw: dict[str, Any] | None) -> Config:
    """Build a Config from a nested dict, rejecting unknown sections and keys."""
    cfg = Config()
    apply_dict(cfg, raw or {})
    return cfg


def apply_dict(cfg: Config, raw: dict[str, Any]) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"config must be a mapping of sections, got {type(raw).__name__}")
    sections = _fields(Config)
    for section_name, values in raw.items():
        if section_name not in sections:
            raise ConfigError(f"unknown config section '{section_name}'{_suggest(section_name, list(sections))}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"config section '{section_name}' must be a mapping, got {values!r}")
        for key, value in values.items():
            set_value(cfg, f"{section_name}.{key}", value)
    return cfg


def field_type(dotted: str):
    """The declared type of a dotted key; unknown sections and keys are rejected with the closest valid name."""
    section_name, key = _split_key(dotted)
    sections = _fields(Config)
    if section_name not in sections:
        raise ConfigError(f"unknown config section '{section_name}' in '{dotted}'"
                          f"{_suggest(section_name, list(sections))}")
    types_ = _section_types(sections[section_name].default_factory)
    if key not in types_:
        raise ConfigError(f"unknown config key '{dotted}'{_suggest(key, list(types_))}")
    return types_[key]


def set_value(cfg: Config, dotted: str, value: Any) -> None:
    """Set one dotted key, coercing the value (a string from --set, or a YAML value) to the field type."""
    tp = field_type(dotted)
    section_name, key = _split_key(dotted)
    setattr(getattr(cfg, section_name), key, _coerce(value, tp, dotted))


def parse_override(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ConfigError(f"--set expects section.key=value, got '{text}'")
    key, value = text.split("=", 1)
    return key.strip(), value


def resolve_config_path(name_or_path: str | None) -> Path:
    """`None` → configs/tiny_cpu.yaml; a bare NAME → configs/NAME.yaml; anything else is a path."""
    name_or_path = name_or_path or DEFAULT_CONFIG
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml") or os.sep in name_or_path:
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        return path
    # The repo's configs/ (also when shipped with `ray job submit --working-dir`), then ./configs.
    for folder in (CONFIG_DIR, Path.cwd() / "configs"):
        candidate = folder / f"{name_or_path}.yaml"
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"no config named '{name_or_path}' in {CONFIG_DIR}{_suggest(name_or_path, known)}")


def load_config(name_or_path: str | None = None, overrides: list[str] | None = None, check: bool = True) -> Config:
    """Load a YAML config, apply `--set` overrides in order, validate (unless `check` is False: a caller that
    transforms the config first, e.g. raydiff.shape, validates the result)."""
    path = resolve_config_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    try:
        cfg = from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    for text in overrides or []:
        set_value(cfg, *parse_override(text))
    return validate(cfg) if check else cfg


# ---------------------------------------------------------------- validation

def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config key '{key}' {message}")


def keys() -> list[tuple[str, dataclasses.Field, Any]]:
    """(dotted key, field, resolved type) of every config key, in section and field order."""
    return [(f"{name}.{f.name}", f, _section_types(section.default_factory)[f.name])
            for name, section in _fields(Config).items() for f in dataclasses.fields(section.default_factory)]


def _choice_message(allowed: tuple, value: Any) -> str:
    return f"must be one of {list(allowed)}, got {value!r}"


def _range_text(meta: typing.Mapping[str, Any]) -> str:
    """The field's bounds as text: '> 0', 'in [0, 1)', '' when unbounded."""
    low = next(((k, meta[k]) for k in ("gt", "ge") if k in meta), None)
    high = next(((k, meta[k]) for k in ("lt", "le") if k in meta), None)
    if low and high:
        return f"in {'(' if low[0] == 'gt' else '['}{low[1]:g}, {high[1]:g}{')' if high[0] == 'lt' else ']'}"
    bound = low or high
    return f"{BOUNDS[bound[0]]} {bound[1]:g}" if bound else ""


def _in_range(value: Any, meta: typing.Mapping[str, Any]) -> bool:
    """Bounds hold for a number, or for every item of a list."""
    return all(_COMPARE[k](v, meta[k]) for v in (value if isinstance(value, list) else [value])
               for k in BOUNDS if k in meta)


def _check_field(key: str, f: dataclasses.Field, tp: Any, value: Any) -> None:
    """A key's own constraints, declared with it: its choices (a Literal type) and its range (setting bounds)."""
    if value is None:
        _check(_unwrap_optional(tp)[1], key, "may not be null")
        return
    if typing.get_origin(_unwrap_optional(tp)[0]) is Literal:
        _check(value in choices(tp), key, _choice_message(choices(tp), value))
    if any(k in f.metadata for k in BOUNDS):
        _check(_in_range(value, f.metadata), key,
               f"must be {_range_text(f.metadata)}{' or null' if _unwrap_optional(tp)[1] else ''}, got {value!r}")


def validate(cfg: Config) -> Config:
    """Reject invalid values with a message naming the key. Runs before any Ray work."""
    for key, f, tp in keys():
        _check_field(key, f, tp, cfg.get(key))
    _check(not cfg.scaling.elastic or (len(cfg.scaling.num_workers) == 2 and cfg.scaling.min_workers <=
                                       cfg.scaling.max_workers), "scaling.num_workers",
           f"must be a number of workers or [min, max] with min <= max, got {cfg.scaling.num_workers}")
    _check(cfg.data.resolution % 8 == 0, "data.resolution",
           f"must be a multiple of 8 (the VAE factor), got {cfg.data.resolution}")
    try:
        parse_buckets(cfg.data.buckets, cfg.data.resolution)
    except ValueError as exc:
        raise ConfigError(f"config key 'data.buckets' {exc}") from None
    _check(cfg.data.cache_dir is None or cfg.data.precompute != "none", "data.cache_dir",
           "is set but data.precompute is 'none': set data.precompute to text or latents, or unset data.cache_dir")
    _check(cfg.data.precompute_num_gpus == 0 or cfg.scaling.use_gpu, "data.precompute_num_gpus",
           "needs GPUs (scaling.use_gpu: true)")
    _check(all(0 <= t < 1000 for t in cfg.validation.timesteps) and cfg.validation.timesteps,
           "validation.timesteps",
           f"must be a non-empty list of timesteps in [0, 1000), got {cfg.validation.timesteps}")
    _check(cfg.scaling.use_gpu or cfg.deepspeed.precision != "fp16", "deepspeed.precision",
           "fp16 needs GPUs (scaling.use_gpu: true); use fp32 or bf16 on CPU")
    # ZeRO-0 with bf16/fp16 would step the optimizer on the 16-bit weights themselves: no fp32 master weights.
    _check(cfg.deepspeed.precision == "fp32" or cfg.deepspeed.zero_stage > 0, "deepspeed.precision",
           f"{cfg.deepspeed.precision} needs deepspeed.zero_stage 1-3 (fp32 master weights); "
           "ZeRO-0 trains in fp32 only")
    _check(not cfg.deepspeed.offload_optimizer or cfg.deepspeed.zero_stage > 0, "deepspeed.offload_optimizer",
           "needs deepspeed.zero_stage 1-3")
    _check(bool(cfg.run.name) and "/" not in cfg.run.name, "run.name",
           f"must be a non-empty name without '/', got {cfg.run.name!r}")
    _check(bool(cfg.run.storage_path), "run.storage_path", "must be set")
    # ZeRO-3 gathers each parameter in module hooks around every forward; compiling through them is untested here.
    _check(not (cfg.train.compile and cfg.deepspeed.zero_stage == 3), "train.compile",
           "is not supported with deepspeed.zero_stage: 3; use zero_stage 0-2 or train.compile: false")
    for key in ("run.storage_path", "data.cache_dir"):  # `$VARS` are expanded where the run starts
        value = cfg.get(key)
        _check(value is None or "$" not in os.path.expandvars(value), key,
               f"names an unset environment variable: {value!r}")
    _check(bool(cfg.logging.mlflow_experiment), "logging.mlflow_experiment", "must be set")
    _check(not cfg.logging.mlflow_uri or importlib.util.find_spec("mlflow") is not None, "logging.mlflow_uri",
           "needs MLflow: pip install 'raydiff[mlflow]'")
    _validate_paths(cfg)
    _refuse_placeholders(cfg)
    _validate_search_space(cfg)
    return cfg


# Search-space distributions: name -> whether its values are a list of candidates (else [low, high] bounds).
SEARCH_KINDS = {"grid": True, "choice": True, "uniform": False, "loguniform": False}
_NOT_SEARCHABLE = ("run", "tune")  # a trial's run name and storage come from the sweep


def _validate_search_space(cfg: Config) -> None:
    """Every searched key is a real config key and every candidate value (or bound) is valid for it."""
    if cfg.tune.search_alg == "optuna":
        _check(importlib.util.find_spec("optuna") is not None, "tune.search_alg",
               "is 'optuna' but optuna is not installed (pip install optuna)")
    for dotted, spec in cfg.tune.search_space.items():
        where = f"tune.search_space.{dotted}"
        try:
            field_type(dotted)
        except ConfigError as exc:
            raise ConfigError(f"config key '{where}': {exc}") from None
        _check(isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in SEARCH_KINDS, where,
               f"must be one of {{{' | '.join(f'{k}: [...]' for k in SEARCH_KINDS)}}}, got {spec!r}")
        (kind, values), = spec.items()
        _check(_split_key(dotted)[0] not in _NOT_SEARCHABLE, where, "cannot be searched (set by the sweep)")
        _check(not (kind == "grid" and cfg.tune.search_alg == "optuna"), where,
               "grid is not supported by optuna; use choice")
        _check(isinstance(values, list) and len(values) > 0, where, f"{kind} needs a non-empty list, got {values!r}")
        if not SEARCH_KINDS[kind]:
            _check(len(values) == 2 and values[0] < values[1], where,
                   f"{kind} needs [low, high] with low < high, got {values}")
            _check(kind != "loguniform" or values[0] > 0, where, f"loguniform needs low > 0, got {values}")
        for value in values:  # each candidate must make a valid config on its own
            trial = from_dict(cfg.to_dict() | {"tune": {}})
            try:
                set_value(trial, dotted, value)
                validate(trial)
            except ConfigError as exc:
                raise ConfigError(f"config key '{where}': value {value!r}: {exc}") from None



def is_uri(path: str) -> bool:
    return "://" in path


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def _validate_paths(cfg: Config) -> None:
    src = cfg.data.source
    if src is not None and not is_uri(src):
        expanded = os.path.expanduser(src)
        _check(os.path.exists(expanded) or bool(glob.glob(expanded)), "data.source", f"path does not exist: {src}")
    model = cfg.model.pretrained
    if model != "tiny" and not is_uri(model) and not os.path.isdir(os.path.expanduser(model)):
        _check(_looks_like_hub_id(model), "model.pretrained",
               f"is neither 'tiny', an existing directory, nor a hub id: {model}")


# Template values in the shipped configs and cluster files, to be replaced by the user's own.
_PLACEHOLDER = re.compile(r"YOUR[-_]|<[A-Za-z_-]+>|example\.com", re.IGNORECASE)
_PATH_KEYS = ("run.storage_path", "data.source", "data.cache_dir", "model.pretrained", "model.vae",
              "logging.mlflow_uri")


def _refuse_placeholders(cfg: Config) -> None:
    """`s3://YOUR-BUCKET/...` would pass every other check and fail minutes later inside pyarrow or the hub."""
    for key in _PATH_KEYS:
        value = cfg.get(key)
        _check(not (isinstance(value, str) and _PLACEHOLDER.search(os.path.expandvars(value))), key,
               f"is a placeholder ({value!r}): set it to your own bucket or path, e.g. --set {key}=s3://my-bucket/...")


def storage_path(cfg: Config) -> str:
    """The storage path with `$VARS` and `~` expanded and local paths made absolute (Ray needs absolute paths).

    `$VARS` let a cluster name its bucket once (e.g. RAYDIFF_STORAGE_PATH in cluster/*.yaml): `ray job submit`
    quotes the entrypoint, so the variable is expanded here, on the cluster, not by a shell.
    """
    path = os.path.expandvars(cfg.run.storage_path)
    return path if is_uri(path) else os.path.abspath(os.path.expanduser(path))


def run_dir(cfg: Config) -> str:
    return f"{storage_path(cfg).rstrip('/')}/{cfg.run.name}"


# ---------------------------------------------------------------- the key reference: --help-config, README table

README_BEGIN = "<!-- config-keys:begin (generated by `python -m raydiff.train --help-config --markdown`) -->"
README_END = "<!-- config-keys:end -->"


def _type_text(tp: Any, meta: typing.Mapping[str, Any]) -> str:
    """'int > 0', '{fp32, bf16, fp16}', 'float in (0, 1) or null', 'list[str]'."""
    inner, optional = _unwrap_optional(tp)
    if typing.get_origin(inner) is Literal:
        text = "{" + ", ".join(str(c) for c in typing.get_args(inner)) + "}"
    else:
        text = _plain_type(inner)
    bounds = _range_text(meta)
    return f"{text}{' ' + bounds if bounds else ''}{' or null' if optional else ''}"


def _plain_type(tp: Any) -> str:
    if tp is Any:
        return "any"
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_plain_type(a) for a in typing.get_args(tp))
    args = typing.get_args(tp)
    name = getattr(typing.get_origin(tp) or tp, "__name__", str(tp))
    return f"{name}[{', '.join(_plain_type(a) for a in args)}]" if args else name


def _value_text(value: Any) -> str:
    """A value as it is written in YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value or '""'
    if isinstance(value, list):
        return "[" + ", ".join(_value_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_value_text(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _sections() -> list[tuple[str, str, list[tuple[str, dataclasses.Field, Any]]]]:
    """(section name, its docstring, its keys) in order."""
    return [(name, section.default_factory.__doc__ or "", [k for k in keys() if k[0].split(".")[0] == name])
            for name, section in _fields(Config).items()]


def help_text(cfg: Config | None = None, label: str = "config") -> str:
    """Every key with its type, default and meaning; with `cfg`, also its value there where it is not the default."""
    defaults, lines = Config(), []
    for name, doc, section_keys in _sections():
        lines += ["", f"{name}: {doc}"]
        for key, f, tp in section_keys:
            differs = cfg is not None and cfg.get(key) != defaults.get(key)
            ours = f"  ({label}: {_value_text(cfg.get(key))})" if differs else ""
            lines.append(f"  {key} = {_value_text(defaults.get(key))}  [{_type_text(tp, f.metadata)}]{ours}")
            lines += textwrap.wrap(f.metadata["help"], 116, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines[1:])


def markdown_table() -> str:
    """The README's key reference: one table per section."""
    defaults, out = Config(), []
    for name, doc, section_keys in _sections():
        out += [f"**`{name}`**: {doc}", "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for key, f, tp in section_keys:
            cells = (f"`{key}`", _type_text(tp, f.metadata), f"`{_value_text(defaults.get(key))}`", f.metadata["help"])
            out.append("| " + " | ".join(_markdown_cell(c) for c in cells) + " |")
        out.append("")
    return "\n".join(out).rstrip("\n")


def _markdown_cell(text: str) -> str:
    """`|` escaped; `<run>` shown, not taken for an HTML tag."""
    return re.sub(r"<(?=[A-Za-z/])", "&lt;", text.replace("|", "\\|"))


def with_markdown_table(readme: str) -> str:
    """`readme` with the text between its README_BEGIN and README_END lines replaced by `markdown_table()`."""
    if readme.count(README_BEGIN) != 1 or readme.count(README_END) != 1:
        raise ValueError(f"the README needs one '{README_BEGIN}' line and one '{README_END}' line after it")
    head, rest = readme.split(README_BEGIN)
    _, tail = rest.split(README_END)
    return f"{head}{README_BEGIN}\n{markdown_table()}\n{README_END}{tail}"
