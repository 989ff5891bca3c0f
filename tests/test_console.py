"""raydiff.console: which lines stay out of the driver's console, and that --verbose / RAYDIFF_VERBOSE keep them all.
(The default job's console, end to end, is checked in test_run_outputs.py.)"""

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

from raydiff import console

REPO = Path(__file__).resolve().parent.parent

# Lines worker processes printed in a default run before raydiff.console (as Ray hands them to the driver).
CHATTER = [
    "Failed to query Ray Train Controller actor state. State API may be temporarily unavailable. "
    "Continuing to monitor.",
    "[2026-12-03 09:39:24,940 E 2774 2814] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and ID: "
    "'3d75' has constructor arguments in the object store and max_restarts > 0. If the arguments ...",
    "WARNING: 8 PYTHON worker processes have been started on node: cc1d with address: 192.0.2.2, which is 4x the ...",
    "Reporting training result 1: TrainingReport(checkpoint=None, metrics={'step': 0})",
    "Estimated parquet encoding ratio is 1.299.",
    "Estimated parquet reader batch size at 146768 rows",
    "Starting execution of Dataset dataset_0358_0. Full logs are in /tmp/ray/session_x/logs/ray-data",
    "Execution plan of Dataset val_0358_0: InputDataBuffer[Input] -> TaskPoolMapOperator[ReadParquet]",
    "✔️  Dataset dataset_0358_0 execution finished in 16.09 seconds",
    "Progress bars disabled. To enable, set `ray.data.DataContext.get_current().enable_progress_bars = True`.",
    "[2026-12-03 09:39:27,347] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU. "
    "If you have GPU or other accelerator, we were unable to detect it.",
    "[transformers] `CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`",
    "Loading weights: 100%|██████████| 36/36 [00:00<00:00, 13656.05it/s]",
    "Writing model shards:   0%|          | 0/1 [00:00<?, ?it/s]",
    "Loading pipeline components...: 100%|██████████| 7/7 [00:00<00:00, 105.43it/s]",
    "/x/task_pool_map_operator.py:326: UserWarning: The maximum number of concurrent tasks for "
    "'MapBatches(_preprocess)' is set to 2, but the operator only received 1 input(s). This means ...",
    "  warnings.warn(",
]
# Lines that must still reach the console.
KEPT = [
    "[raydiff] step 3/60 | loss 1.0682 | val_loss 0.9896 | 38.3 samples/s | lr 8.00e-04 | ETA 17s",
    "[raydiff] checkpoint at step 20: /root/raydiff_runs/raydiff-tiny/checkpoint_2026-12-03_09-40-14.044591",
    "Traceback (most recent call last):",
    "RuntimeError: the train split produced no samples (3 rows skipped; first: ...)",
    "(raylet) A worker died or was killed while executing a task by an unexpected system error.",
    "Task was killed due to the node running low on memory.",
    "/x/loop.py:12: UserWarning: something raydiff should hear about",
]


def test_forwarded_chatter_is_skipped_and_nothing_else():
    skip = re.compile("|".join(console.FORWARDED_NOISE))
    assert [line for line in CHATTER if not skip.search(line)] == []
    assert [line for line in KEPT if skip.search(line)] == []


def test_local_notices_are_dropped_at_their_loggers_only(monkeypatch):
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep()
    names = list(console.LOCAL_NOISE)
    for name in names:
        logging.getLogger(name).addHandler(handler)
    try:
        console.quiet_process()
        logging.getLogger("DeepSpeed").warning("Setting accelerator to CPU. If you have GPU or other accelerator, ...")
        logging.getLogger("transformers.utils.import_utils").warning(
            "`CLIPImageProcessor` requires torchvision (not installed); falling back")
        logging.getLogger("DeepSpeed").warning("ZeRO stage 3 needs a real problem fixed")  # not listed: kept
    finally:
        for name in names:
            logging.getLogger(name).removeHandler(handler)
    assert records == ["ZeRO stage 3 needs a real problem fixed"]


def configured_env(*args: str, env: dict | None = None) -> dict:
    """The environment `raydiff.console.configure` leaves in a fresh process (nothing of this test's own)."""
    code = ("import json, os, sys; from raydiff import console; console.configure(verbose='--verbose' in sys.argv); "
            "print(json.dumps({k: os.environ.get(k) for k in ('RAY_DEDUP_LOGS_SKIP_REGEX', 'RAY_DATA_LOGGING_CONFIG', "
            "'HF_HUB_DISABLE_PROGRESS_BARS', 'RAYDIFF_VERBOSE')}))")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_DEDUP", "RAY_DATA_LOGGING", "HF_HUB_DISABLE",
                                                                     "RAYDIFF_VERBOSE"))}
    out = subprocess.run([sys.executable, "-c", code, *args], env={**base, "PYTHONPATH": str(REPO), **(env or {})},
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_default_quiets_and_verbose_leaves_everything():
    quiet = configured_env()
    assert quiet["RAY_DEDUP_LOGS_SKIP_REGEX"] == "|".join(console.FORWARDED_NOISE)
    assert quiet["RAY_DATA_LOGGING_CONFIG"] == console.RAY_DATA_LOGGING_CONFIG
    assert os.path.isfile(quiet["RAY_DATA_LOGGING_CONFIG"])  # shipped as package data
    for loud in (configured_env("--verbose"), configured_env(env={"RAYDIFF_VERBOSE": "1"})):
        assert loud["RAY_DEDUP_LOGS_SKIP_REGEX"] is None and loud["RAY_DATA_LOGGING_CONFIG"] is None
        assert loud["RAYDIFF_VERBOSE"] == "1"  # workers started from here see it too


def test_ray_train_logs_warnings_only_unless_verbose(monkeypatch):
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    assert console.train_log_level() == "WARNING"
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    assert console.train_log_level() == "INFO"


def test_the_cli_accepts_verbose():
    from raydiff.train.driver import parse_args

    assert parse_args(["--verbose", "--set", "train.max_steps=2"], "train", "").verbose
    assert not parse_args([], "train", "").verbose


# ---------------------------------------------------------------- raydiff's logger (raydiff.log)

LOG_TWICE = """
import logging, sys
logging.basicConfig(stream=sys.stderr)  # a root console handler, as Ray Train gives each worker
import raydiff
from raydiff import log
log.setup()  # a second set-up (a worker importing raydiff again) adds nothing
logger = logging.getLogger("raydiff.train.somewhere")
logger.info("step %d/%d | loss %.4f", 3, 6, 0.5)
logger.info("run x in /tmp/x\\n  model tiny | 6 steps")
logger.warning("checkpoint %s is incomplete", "/tmp/c")
logger.debug("not shown")
"""


def test_raydiff_lines_reach_stdout_once_with_their_prefix():
    out = subprocess.run([sys.executable, "-c", LOG_TWICE], env={**os.environ, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == [
        "[raydiff] step 3/6 | loss 0.5000",
        "[raydiff] run x in /tmp/x",
        "[raydiff]   model tiny | 6 steps",
        "[raydiff] WARNING: checkpoint /tmp/c is incomplete",
    ]
    assert out.stderr == ""  # nothing propagated to the root logger's handler: no line twice


def test_the_logger_writes_to_the_current_stdout(capsys):
    """Not the stdout of when it was set up: a redirect (pytest's capture here) gets the lines."""
    logging.getLogger("raydiff.x").info("exported diffusers pipeline to %s", "/tmp/final")
    assert capsys.readouterr().out == "[raydiff] exported diffusers pipeline to /tmp/final\n"
