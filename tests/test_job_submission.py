"""`ray job submit --working-dir . -- python -m raydiff.train` against a real Ray head started by this test, the way
a user runs raydiff on a cluster: the job is stopped mid-run (`ray job stop`), resubmitted with the same command,
resumes from its checkpoint and succeeds. The head is this test's own `ray start --head --block` process tree (own
ports and temp dir, beside the session's in-process `ray_local`), and only that tree is stopped at the end."""

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

from raydiff.train.metrics_log import read_metrics

# Generous limits: two jobs, each starting Ray Data, DeepSpeed and the tiny SDXL, on a shared 2-core machine.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(3600)]

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
STEPS, CKPT_EVERY = 60, 4  # long enough that the stop lands mid-run: a step takes ~0.1 s here, the stop ~3 s


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def wait_for(predicate, what: str, limit_s: float = 1500, every_s: float = 2):
    """Poll until `predicate()` is truthy; the limit only turns a hang into a failure."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"gave up waiting for {what}")


def ours(root: psutil.Process, temp_dir: str) -> list[psutil.Process]:
    """`ray start` and everything below it (job drivers run in their own sessions, so a process-group kill would
    miss them), plus any Ray process of this head orphaned by an early exit (its command line names our temp dir)."""
    procs = {root, *with_ignored(root.children, recursive=True)} if root.is_running() else set()
    for p in psutil.process_iter(["cmdline"]):
        if temp_dir in " ".join(p.info["cmdline"] or []):
            procs |= {p, *with_ignored(p.children, recursive=True)}
    return list(procs)


def stop_tree(root: psutil.Process, temp_dir: str) -> None:
    """SIGTERM, then SIGKILL, the processes this test started, and only those."""
    procs = ours(root, temp_dir)
    for p in procs:
        with_ignored(p.send_signal, signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=5)  # some never exit on SIGTERM: waiting longer only delays the kill
    for p in alive:
        with_ignored(p.kill)
    psutil.wait_procs(alive, timeout=10)


def with_ignored(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs) or ()
    except psutil.NoSuchProcess:
        return ()


def start_head(attempt: int):
    """`ray start --head --block` on free ports in its own temp dir; returns (process, temp dir, jobs CLI)."""
    gcs, dash, *others = free_ports(9)
    temp_dir = tempfile.mkdtemp(prefix=f"rdj{attempt}", dir="/tmp")  # short: socket paths must stay < 108 bytes
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the job's `python` is this interpreter
    # Token auth, as Ray 2.60 clusters run by default; the token lives in the env of this head and its clients only.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    ports = dict(zip(["node-manager", "object-manager", "metrics-export", "dashboard-agent-listen",
                      "dashboard-agent-grpc", "runtime-env-agent", "ray-client-server"], others))
    # 6 logical CPUs: what raydiff.train.driver.run_cpus asks for a 2-worker run (workers + their data pipelines).
    cmd = [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dash}", f"--temp-dir={temp_dir}", "--num-cpus=6", "--include-dashboard=true",
           "--disable-usage-stats", *(f"--{k}-port={v}" for k, v in ports.items())]
    head = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    return head, psutil.Process(head.pid), temp_dir, JobsCLI(f"http://127.0.0.1:{dash}", env)


@pytest.fixture(scope="module")
def ray_head():
    """A head whose job server answers. The raylet aborts if the dashboard agent is slower to start than its fixed
    wait (a heavily loaded machine): that attempt is stopped and a fresh head started, at most three times."""
    failures = []
    for attempt in range(3):
        head, root, temp_dir, jobs = start_head(attempt)
        try:
            wait_for(lambda: _job_server_up(jobs, head, temp_dir), "the job server", 300, every_s=5)
        except AssertionError as exc:
            failures.append(str(exc)[-2000:])
            stop_tree(root, temp_dir)
            shutil.rmtree(temp_dir, ignore_errors=True)
            continue
        try:
            yield jobs
        finally:
            stop_tree(root, temp_dir)
            shutil.rmtree(temp_dir, ignore_errors=True)
        return
    raise AssertionError("no Ray head came up:\n" + "\n".join(failures))


def _job_server_up(jobs, head, temp_dir) -> bool:
    if head.poll() is not None:
        logs = Path(temp_dir, "session_latest", "logs", "raylet.out")
        raise AssertionError("ray start --head exited: " + (logs.read_text()[-3000:] if logs.exists() else ""))
    return jobs.run("list", check=False).returncode == 0


class JobsCLI:
    """`ray job submit/stop` against this test's head; status and logs through the SDK. The token is passed
    explicitly, never put in the pytest process's environment (the session's `ray_local` shares it)."""

    def __init__(self, address: str, env: dict):
        self.address, self.env = address, env
        self._client = None

    @property
    def client(self):
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            self._client = JobSubmissionClient(
                self.address, headers={"authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"})
        return self._client

    def run(self, verb: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ray"), "job", verb, "--address", self.address, *args], cwd=REPO,
                              env=self.env, check=check, capture_output=True, text=True)

    def status(self, job_id: str) -> str:
        return str(self.client.get_job_status(job_id).value)

    def logs(self, job_id: str) -> str:
        return self.client.get_job_logs(job_id)

    def wait_terminal(self, job_id: str) -> str:
        return wait_for(lambda: (s := self.status(job_id)) in ("SUCCEEDED", "FAILED", "STOPPED") and s, job_id,
                        every_s=1)


def submit(jobs: JobsCLI, submission_id: str, storage: str, cache: str) -> None:
    runtime_env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())  # the shipped excludes
    runtime_env["env_vars"].update(RAYDIFF_STORAGE_PATH=storage, RAYDIFF_CACHE=cache)
    # Validation (with its sample images) only at the start and the end: the job's stop and resume are under test.
    overrides = ["run.storage_path=$RAYDIFF_STORAGE_PATH", "run.name=job", f"train.max_steps={STEPS}",
                 f"checkpoint.every_n_steps={CKPT_EVERY}", f"validation.every_n_steps={STEPS}",
                 "data.demo_num_images=96", "data.val_fraction=0.15", "logging.sample_denoising_steps=2"]
    jobs.run("submit", "--submission-id", submission_id, "--no-wait", "--working-dir", ".",
             "--runtime-env-json", json.dumps(runtime_env), "--",
             "python", "-m", "raydiff.train", *(a for o in overrides for a in ("--set", o)))


def registered_checkpoint(run_dir: Path) -> bool:
    """The Train controller has recorded a checkpoint: a relaunch resumes from it."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    return snapshot.is_file() and "checkpoint_" in snapshot.read_text()


def test_submit_stop_resubmit_resumes_and_succeeds(ray_head, raydiff_cache, tmp_path):
    jobs, run_dir = ray_head, tmp_path / "job"

    submit(jobs, "raydiff-first", str(tmp_path), raydiff_cache)
    try:
        wait_for(lambda: registered_checkpoint(run_dir) or jobs.status("raydiff-first") in ("FAILED", "SUCCEEDED"),
                 "the first checkpoint", every_s=0.5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{jobs.logs('raydiff-first')[-5000:]}") from None
    assert jobs.status("raydiff-first") == "RUNNING", jobs.logs("raydiff-first")[-5000:]
    jobs.run("stop", "raydiff-first")
    assert jobs.wait_terminal("raydiff-first") == "STOPPED"
    stopped_at = max(r["step"] for r in read_metrics(str(run_dir / "metrics.jsonl")))
    assert CKPT_EVERY <= stopped_at < STEPS
    # A stop while Ray Train rewrites its checkpoint list leaves it empty (it happened here in CI), and Ray would
    # refuse the relaunch: the resubmitted job sets it aside and resumes from the newest complete checkpoint.
    (run_dir / "checkpoint_manager_snapshot.json").write_bytes(b"")

    submit(jobs, "raydiff-second", str(tmp_path), raydiff_cache)  # the same command
    final = jobs.wait_terminal("raydiff-second")
    logs = jobs.logs("raydiff-second")
    assert final == "SUCCEEDED", logs[-5000:]
    assert "checkpoint_manager_snapshot.json is unreadable" in logs
    assert len(list(run_dir.glob("checkpoint_manager_snapshot.json.torn-*"))) == 1

    resumed = int(re.search(r"resumed from \S+ at step (\d+)", logs).group(1))
    assert resumed >= CKPT_EVERY and resumed % CKPT_EVERY == 0
    assert f"step {STEPS}/{STEPS} | loss" in logs and "samples/s" in logs and "ETA" in logs
    assert re.search(r"step 1/", logs) is None, "the resubmitted job must not start over"
    assert "Reporting training result" not in logs, "Ray Train's per-rank report lines repeat the progress lines"
    assert "[raydiff] run finished" in logs and f"steps:          {STEPS}" in logs
    rows = read_metrics(str(run_dir / "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(STEPS + 1)), "one metrics row per step across both jobs"
    assert (run_dir / "final" / "model_index.json").is_file()
    assert (run_dir / "loss_curve.png").is_file() and list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert str(run_dir / "final") in logs
