"""Typed run configuration: dataclass sections <-> YAML, `--set a.b=c` overrides, validation before any Ray work.

Every key a user can write is a field below; anything else is rejected with the closest valid name.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = "tiny_cpu"


class ConfigError(ValueError):
    """A config problem, always naming the offending key."""


@dataclass
class RunSection:
    name: str = "raydiff-tiny"
    # Local dir, NFS path or s3:// / gs:// URI; multi-node runs need shared storage.
    storage_path: str = "~/raydiff_runs"
    max_failures: int = 0


@dataclass
class ScalingSection:
    num_workers: int = 2
    use_gpu: bool = False
    # Fractional CPUs leave room for Ray Data's preprocessing tasks on small machines.
    cpus_per_worker: float = 0.5
    gpus_per_worker: float = 1.0


@dataclass
class TrainSection:
    max_steps: int = 60
    batch_size: int = 4  # per worker, per micro-step
    grad_accum: int = 1
    seed: int = 0
    grad_clip: float = 1.0  # 0 disables clipping
    gradient_checkpointing: bool = False
    # Speed switches (raydiff/train/speed.py, measured in docs/performance.md): attention kernel (sdpa: PyTorch's
    # fused scaled_dot_product_attention; eager: diffusers' explicit softmax), NHWC convolutions, torch.compile.
    attention: str = "sdpa"
    channels_last: bool = False
    compile: bool = False
    log_every_n_steps: int = 1  # metrics.jsonl + progress line (rank 0, cheap)
    # ray.train.report is a barrier that waits for the controller (~0.1-2 s); validation and checkpoint steps
    # always report, this adds reports in between (what Tune schedulers see).
    report_every_n_steps: int = 10
    prefetch_batches: int = 2
    # EMA of the UNet weights (decay per optimizer step); None: off. The export then holds the EMA weights.
    ema_decay: Optional[float] = None


@dataclass
class OptimSection:
    optimizer: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 1e-2
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    lr_scheduler: str = "constant"  # constant (after warmup) | cosine | linear
    warmup_steps: int = 0


@dataclass
class DeepSpeedSection:
    zero_stage: int = 2
    precision: str = "fp32"  # fp32 | bf16 | fp16
    # Optimizer state and fp32 masters in host RAM (ZeRO 1-3): DeepSpeedCPUAdam on GPU workers, torch's optimizer on CPU.
    offload_optimizer: bool = False
    # Elements per ZeRO all-gather / reduce-scatter bucket. DeepSpeed's default (5e8): ~6 buckets per micro-step for
    # the 2.6 B-parameter SDXL UNet instead of 50+ at 5e7, at ~1 GB of bf16 bucket memory each.
    allgather_bucket_size: int = 500_000_000
    reduce_bucket_size: int = 500_000_000


@dataclass
class ObjectiveSection:
    gamma: float = 0.1
    gamma_schedule: str = "constant"  # constant | linear_decay | random_strength
    gamma_decay_steps: int = 0  # linear_decay: gamma reaches 0 at this step (0: train.max_steps)
    gamma_per_sample: bool = False  # random_strength: one u ~ U(0, gamma) per sample instead of per batch
    # None: read from the model's scheduler config.
    prediction_type: Optional[str] = None
    noise_offset: float = 0.0  # offset noise, built into eps (input and target)
    snr_gamma: Optional[float] = None  # min-SNR-gamma loss weighting; None: off


@dataclass
class ModelSection:
    pretrained: str = "tiny"  # hub id, local diffusers dir, or "tiny"
    vae: Optional[str] = None  # separate VAE, e.g. madebyollin/sdxl-vae-fp16-fix
    revision: Optional[str] = None
    variant: Optional[str] = None


@dataclass
class DataSection:
    source: Optional[str] = None  # None: the generated demo dataset
    format: Optional[str] = None  # parquet | imagefolder | webdataset; None: detected from the files
    image_column: str = "image"
    caption_column: str = "text"
    resolution: int = 64
    center_crop: bool = False
    random_flip: bool = True
    val_fraction: float = 0.05
    val_max_samples: int = 16
    on_error: str = "skip"  # skip | raise
    max_aspect_ratio: float = 4.0  # images with long/short side above this are skipped
    # Rows a worker shuffles together within its span of an epoch (whole read units, at least this many rows): the
    # row-level mixing on top of the per-epoch shuffle of units (parquet row groups, tar shards). Memory of a read
    # task grows with it.
    shuffle_window: int = 2048
    # Aspect-ratio buckets: [] = square crops at `resolution`; [sdxl] = the SDXL list scaled to `resolution`;
    # or WIDTHxHEIGHT sizes, e.g. [1024x1024, 1152x896, 896x1152].
    buckets: list[str] = field(default_factory=list)
    demo_num_images: int = 320
    caption_dropout: float = 0.0  # probability of training on the empty prompt (for classifier-free guidance)
    # Frozen encoders in a Ray Data actor pool instead of the training step: none | text | latents.
    precompute: str = "none"
    # With precompute: a directory or s3:// / gs:// URI for a parquet cache reused by runs with the same fingerprint
    # (the random crop is then drawn once; flips and caption dropout stay per epoch). Unset: encode in the stream.
    cache_dir: Optional[str] = None
    precompute_concurrency: int = 1  # encoder actors (per worker stream when streamed; for the build when cached)
    precompute_num_gpus: float = 0.0  # GPUs per encoder actor (e.g. 1 to build a cache on a GPU cluster)


@dataclass
class CheckpointSection:
    every_n_steps: int = 20
    keep: int = 2


@dataclass
class ValidationSection:
    every_n_steps: int = 20
    batch_size: int = 4
    seed: int = 1234
    # Fixed timesteps: every held-out sample is scored at each one, so runs with any gamma see the same loss terms.
    timesteps: list[int] = field(default_factory=lambda: [125, 375, 625, 875])
    # Exposure bias: a DDIM chain of this many steps on the held-out latents (0: off).
    sample_steps: int = 10
    eps_scale: float = 1.0  # Epsilon Scaling lambda used by the exposure-bias chain and the sample images
    prompts: list[str] = field(default_factory=list)  # rendered into <run>/samples/step_XXXXXX.png; [] = none
    image_steps: int = 20  # sampler steps for those images


@dataclass
class TuneSection:
    """`python -m raydiff.tune`: one trial per sampled config, ranked by the unperturbed `val_loss`."""

    # Dotted config key -> one of {grid: [..]}, {choice: [..]}, {uniform: [lo, hi]}, {loguniform: [lo, hi]}.
    search_space: dict[str, Any] = field(default_factory=dict)
    num_samples: int = 1  # samples per grid point
    scheduler: str = "asha"  # asha | fifo
    grace_period: int = 1  # ASHA: optimizer steps before a trial can be stopped
    reduction_factor: float = 3.0  # ASHA: keep the best 1/reduction_factor at each rung
    # None: as many as the cluster's CPUs (or GPUs) fit, given each trial's scaling section.
    max_concurrent_trials: Optional[int] = None
    search_alg: str = "random"  # random (grid keys expanded, others sampled) | optuna


@dataclass
class LoggingSection:
    tensorboard: bool = True  # event files in <run dir>/tensorboard
    mlflow_uri: Optional[str] = None  # e.g. http://mlflow:5000 or file:///path; unset: no MLflow
    mlflow_experiment: str = "raydiff"
    # A sample grid from the exported model at the end of the run (TensorBoard + samples.png); empty: none.
    sample_prompts: list[str] = field(default_factory=lambda: ["a red circle on a blue background",
                                                               "a small green square and a large yellow star"])
    sample_steps: int = 20


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


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else f" (valid: {', '.join(sorted(choices))})"


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
        raise ConfigError(f"unknown config section '{section_name}' in '{dotted}'{_suggest(section_name, list(sections))}")
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

_CHOICES = {
    "deepspeed.precision": ("fp32", "bf16", "fp16"),
    "objective.prediction_type": (None, "epsilon", "v_prediction"),
    "optim.optimizer": ("adamw", "adafactor"),
    "optim.lr_scheduler": ("constant", "cosine", "linear"),
    "data.on_error": ("skip", "raise"),
    "objective.gamma_schedule": ("constant", "linear_decay", "random_strength"),
    "tune.scheduler": ("asha", "fifo"),
    "tune.search_alg": ("random", "optuna"),
    "data.format": (None, "parquet", "imagefolder", "webdataset"),
    "data.precompute": ("none", "text", "latents"),
    "train.attention": ("sdpa", "eager"),
}

_POSITIVE = ("scaling.num_workers", "train.max_steps", "train.batch_size", "train.grad_accum", "optim.lr",
             "data.resolution", "checkpoint.every_n_steps", "validation.every_n_steps", "validation.batch_size",
             "train.log_every_n_steps", "train.report_every_n_steps", "checkpoint.keep", "data.val_max_samples",
             "data.shuffle_window", "data.demo_num_images", "data.precompute_concurrency", "tune.num_samples",
             "tune.grace_period", "logging.sample_steps")

_NON_NEGATIVE = ("objective.gamma", "train.grad_clip", "optim.weight_decay", "optim.warmup_steps",
                 "run.max_failures", "train.seed", "train.prefetch_batches", "scaling.cpus_per_worker",
                 "objective.gamma_decay_steps", "objective.noise_offset", "validation.sample_steps",
                 "data.precompute_num_gpus")


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config key '{key}' {message}")


def validate(cfg: Config) -> Config:
    """Reject invalid values with a message naming the key. Runs before any Ray work."""
    for key, choices in _CHOICES.items():
        value = cfg.get(key)
        _check(value in choices, key, f"must be one of {[c for c in choices if c is not None]}, got {value!r}")
    for key in _POSITIVE:
        _check(cfg.get(key) > 0, key, f"must be > 0, got {cfg.get(key)!r}")
    for key in _NON_NEGATIVE:
        _check(cfg.get(key) >= 0, key, f"must be >= 0, got {cfg.get(key)!r}")
    _check(cfg.deepspeed.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", f"must be 0, 1, 2 or 3, got {cfg.deepspeed.zero_stage}")
    _check(cfg.data.resolution % 8 == 0, "data.resolution", f"must be a multiple of 8 (the VAE factor), got {cfg.data.resolution}")
    _check(cfg.data.max_aspect_ratio >= 1, "data.max_aspect_ratio", f"must be >= 1, got {cfg.data.max_aspect_ratio}")
    try:
        from raydiff.data.buckets import parse_buckets

        parse_buckets(cfg.data.buckets, cfg.data.resolution)
    except ValueError as exc:
        raise ConfigError(f"config key 'data.buckets' {exc}") from None
    _check(cfg.data.cache_dir is None or cfg.data.precompute != "none", "data.cache_dir",
           "is set but data.precompute is 'none': set data.precompute to text or latents, or unset data.cache_dir")
    _check(cfg.data.precompute_num_gpus == 0 or cfg.scaling.use_gpu, "data.precompute_num_gpus",
           "needs GPUs (scaling.use_gpu: true)")
    _check(0 < cfg.data.val_fraction < 1, "data.val_fraction", f"must be in (0, 1), got {cfg.data.val_fraction}")
    _check(all(0 <= t < 1000 for t in cfg.validation.timesteps) and cfg.validation.timesteps,
           "validation.timesteps", f"must be a non-empty list of timesteps in [0, 1000), got {cfg.validation.timesteps}")
    _check(cfg.scaling.use_gpu or cfg.deepspeed.precision != "fp16", "deepspeed.precision",
           "fp16 needs GPUs (scaling.use_gpu: true); use fp32 or bf16 on CPU")
    # ZeRO-0 with bf16/fp16 would step the optimizer on the 16-bit weights themselves: no fp32 master weights.
    _check(cfg.deepspeed.precision == "fp32" or cfg.deepspeed.zero_stage > 0, "deepspeed.precision",
           f"{cfg.deepspeed.precision} needs deepspeed.zero_stage 1-3 (fp32 master weights); ZeRO-0 trains in fp32 only")
    _check(not cfg.deepspeed.offload_optimizer or cfg.deepspeed.zero_stage > 0, "deepspeed.offload_optimizer",
           "needs deepspeed.zero_stage 1-3")
    _check(cfg.objective.gamma <= 1.0, "objective.gamma", f"must be <= 1 (the paper finds > 0.2 too strong), got {cfg.objective.gamma}")
    _check(bool(cfg.run.name) and "/" not in cfg.run.name, "run.name", f"must be a non-empty name without '/', got {cfg.run.name!r}")
    _check(bool(cfg.run.storage_path), "run.storage_path", "must be set")
    _validate_objective(cfg)
    # ZeRO-3 gathers each parameter in module hooks around every forward; compiling through them is untested here.
    _check(not (cfg.train.compile and cfg.deepspeed.zero_stage == 3), "train.compile",
           "is not supported with deepspeed.zero_stage: 3; use zero_stage 0-2 or train.compile: false")
    _check(cfg.tune.reduction_factor > 1, "tune.reduction_factor", f"must be > 1, got {cfg.tune.reduction_factor}")
    _check(cfg.tune.max_concurrent_trials is None or cfg.tune.max_concurrent_trials > 0, "tune.max_concurrent_trials",
           f"must be > 0 or null, got {cfg.tune.max_concurrent_trials}")
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


def _validate_objective(cfg: Config) -> None:
    o, v = cfg.objective, cfg.validation
    _check(o.snr_gamma is None or o.snr_gamma > 0, "objective.snr_gamma", f"must be > 0 or null, got {o.snr_gamma}")
    _check(0 <= cfg.data.caption_dropout < 1, "data.caption_dropout", f"must be in [0, 1), got {cfg.data.caption_dropout}")
    _check(v.sample_steps <= 1000, "validation.sample_steps", f"must be <= 1000, got {v.sample_steps}")
    _check(0.5 <= v.eps_scale <= 2.0, "validation.eps_scale", f"must be in [0.5, 2] (the paper uses ~1.005-1.02), got {v.eps_scale}")
    _check(v.image_steps > 0, "validation.image_steps", f"must be > 0, got {v.image_steps}")
    ema = cfg.train.ema_decay
    _check(ema is None or 0 < ema < 1, "train.ema_decay", f"must be in (0, 1) or null, got {ema}")


# Search-space distributions: name -> whether its values are a list of candidates (else [low, high] bounds).
SEARCH_KINDS = {"grid": True, "choice": True, "uniform": False, "loguniform": False}
_NOT_SEARCHABLE = ("run", "tune")  # a trial's run name and storage come from the sweep


def _validate_search_space(cfg: Config) -> None:
    """Every searched key is a real config key and every candidate value (or bound) is valid for it."""
    if cfg.tune.search_alg == "optuna":
        import importlib.util

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
        _check(not (kind == "grid" and cfg.tune.search_alg == "optuna"), where, "grid is not supported by optuna; use choice")
        _check(isinstance(values, list) and len(values) > 0, where, f"{kind} needs a non-empty list, got {values!r}")
        if not SEARCH_KINDS[kind]:
            _check(len(values) == 2 and values[0] < values[1], where, f"{kind} needs [low, high] with low < high, got {values}")
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
        import glob

        expanded = os.path.expanduser(src)
        _check(os.path.exists(expanded) or bool(glob.glob(expanded)), "data.source", f"path does not exist: {src}")
    model = cfg.model.pretrained
    if model != "tiny" and not is_uri(model) and not os.path.isdir(os.path.expanduser(model)):
        _check(_looks_like_hub_id(model), "model.pretrained", f"is neither 'tiny', an existing directory, nor a hub id: {model}")


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
