"""What the driver's console shows: raydiff's own lines and the warnings a user must act on.

Ray, Ray Data, Ray Train, DeepSpeed and the Hugging Face libraries write routine start-up lines from every process,
and Ray forwards each worker's output to the driver: a 60-step run printed ~500 lines, ~60 of them raydiff's. By
default that chatter stays out of the console and in Ray's log files (`session_latest/logs` under Ray's temp dir:
worker-*.out/err, ray-data/, ray-train-*); `--verbose` or `RAYDIFF_VERBOSE=1` shows everything.

Three places, each the library's own switch: Ray's log forwarding skips lines matching `FORWARDED_NOISE`
(`RAY_DEDUP_LOGS_SKIP_REGEX`, read when `ray` is imported); Ray Data's console handler logs warnings only
(`RAY_DATA_LOGGING_CONFIG`); this process's library loggers drop the notices listed in `LOCAL_NOISE`. Ray Train's
own level is set per run (`ray.train.LoggingConfig`, `train_log_level`). raydiff's own lines come from its logger
(raydiff.log: "[raydiff] ..." on stdout, set up in every process that imports raydiff).
"""

from __future__ import annotations

import logging
import os
import re
import warnings

from raydiff import compat  # light: imports no library

VERBOSE_ENV = "RAYDIFF_VERBOSE"
RAY_DATA_LOGGING_CONFIG = os.path.join(os.path.dirname(__file__), "ray_data_logging.yaml")

# Lines other processes print that Ray forwards to the driver. They stay in the workers' log files.
FORWARDED_NOISE = (
    # Ray core: actor-argument and worker-pool notices, and the placement-group cleaner of a run without a dashboard
    r"has constructor arguments in the object store and max_restarts > 0",
    r"PYTHON worker processes have been started on node",
    r"Failed to query Ray Train Controller actor state",
    # Ray Train logs each report's whole metrics dict per rank (under a logger outside `ray.train`'s level)
    r"Reporting training result \d+: TrainingReport\(",
    # Ray Data's per-execution INFO lines (every epoch, every worker)
    r"Estimated parquet (encoding ratio|reader batch size)",
    r"(Starting execution|Execution plan) of Dataset",
    r"Dataset \S+ execution finished in",
    r"Progress bars disabled\. To enable",
    # ... and its hint that a small dataset has fewer blocks than the concurrency raydiff allows (with the source
    # line Python's warnings print after every warning)
    r"is set to \d+, but the operator only received \d+ input",
    r"^\s+warnings\.warn\($",
    # DeepSpeed's accelerator probe on CPU machines, transformers' torchvision fallback, Hugging Face loading bars
    r"Setting accelerator to CPU\. If you have GPU",
    r"requires torchvision \(not installed\); falling back",
    r"(Loading weights|Writing model shards|Loading pipeline components\.\.\.):\s+\d+%",
)
# Notices from libraries imported into this process (logger name -> message pattern)
LOCAL_NOISE = {
    "transformers.utils.import_utils": r"requires torchvision \(not installed\)",
    "DeepSpeed": r"Setting accelerator to CPU",
    compat.RAY_TOKEN_LOGGER: r"[Tt]oken authentication is enabled|authentication token",
    compat.RAY_WORKER_LOGGER: r"Started a local Ray instance",
}
# Python warnings raised inside libraries on every run that no raydiff user can act on
IGNORED_WARNINGS = (
    (FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated"),  # called by DeepSpeed ZeRO
)


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def train_log_level() -> str:
    """Ray Train's console level: its worker-group and checkpoint INFO lines repeat raydiff's own."""
    return "INFO" if is_verbose() else "WARNING"


class _Drop(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


class RayDataNoise(_Drop):
    """Ray Data's console filter (ray_data_logging.yaml): its warning that progress bars are off, which raydiff
    turns off on purpose."""

    def __init__(self):
        super().__init__(r"Progress bars disabled\. To enable")


def configure(verbose: bool = False) -> None:
    """Quiet this process's console; call before `ray` is imported (its log forwarding reads the skip list then).

    `verbose` (or `RAYDIFF_VERBOSE`) leaves everything as the libraries print it, and tells workers the same."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    if is_verbose():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", "|".join(FORWARDED_NOISE))
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", RAY_DATA_LOGGING_CONFIG)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' bars follow huggingface_hub's switch
    quiet_process()


_quieted = False  # this process's filters are installed (a driver calls quiet_process again for its sample grid)


def quiet_process() -> None:
    """Drop the listed library notices in this process (the training loop calls it in each worker too)."""
    global _quieted
    if is_verbose() or _quieted:
        return
    _quieted = True
    for name, pattern in LOCAL_NOISE.items():
        logging.getLogger(name).addFilter(_Drop(pattern))
    for category, message in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def disable_hf_progress_bars() -> None:
    """The loading and saving bars of diffusers (which has no environment switch) and transformers, in a process that
    loads and exports pipelines."""
    # Here: this module is imported first in every process, before anything heavy.
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
