"""raydiff.spot_watcher against a real HTTP server on loopback that answers as the clouds' instance metadata does
(AWS IMDSv2 with its session tokens; GCP's `instance/preempted` with its ETag long-poll), run as its real entry point
(`python -m raydiff.spot_watcher`), with `ray drain-node` replaced by a script that records its arguments. No Ray."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from urllib.error import HTTPError
from urllib.request import urlopen

import pytest

from raydiff import spot_watcher as sw

from fake_metadata import WAIT_S, Metadata, iso, serving

NODE = "ab" * 28
ADDRESS = "10.0.0.1:6379"


@pytest.fixture
def metadata():
    with serving() as md:
        yield md


@pytest.fixture
def fake_ray(tmp_path: Path):
    """A `ray` executable that appends its argv to calls.jsonl; `exit`/`stderr` files make it fail like the CLI."""
    calls = tmp_path / "calls.jsonl"
    script = tmp_path / "ray"
    script.write_text(f"""#!{sys.executable}
import json, pathlib, sys
here = pathlib.Path({str(tmp_path)!r})
with open(here / "calls.jsonl", "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if (here / "exit").exists():
    sys.stderr.write((here / "stderr").read_text())
    sys.exit(int((here / "exit").read_text()))
""")
    script.chmod(0o755)

    def recorded() -> list[list[str]]:
        return [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []

    return script, recorded


def start(cloud: str, md: Metadata, ray_cli: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "raydiff.spot_watcher", "--cloud", cloud, "--node-id", NODE, "--address", ADDRESS,
           "--metadata-url", md.url, "--poll-s", "0.05", "--ray-cli", str(ray_cli), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=Path(__file__).resolve().parents[1])


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=WAIT_S)
    return proc.returncode, out


def drain_args(message: str, deadline: str) -> list[str]:
    return ["drain-node", "--address", ADDRESS, "--node-id", NODE, "--reason", "DRAIN_NODE_REASON_PREEMPTION",
            "--reason-message", message, "--deadline-remaining-seconds", deadline]


def test_deadline_is_the_time_left_less_the_margin_rounded_down_and_at_least_one_second():
    at = datetime(2026, 12, 4, 3, 4, 5, tzinfo=timezone.utc)
    seen = at.timestamp() - 120.4  # read 120.4 s before the reclaim
    assert sw.Notice("terminate", at, seen).deadline_s(10) == 110
    assert sw.Notice("terminate", at, seen).deadline_s(0) == 120
    assert sw.Notice("terminate", at, seen).deadline_s(200) == 1
    assert sw.Notice("stop", at, at.timestamp() + 5).deadline_s(10) == 1  # read late: the reclaim is due
    body = json.dumps({"action": "hibernate", "time": "2026-12-04T03:04:05Z"}).encode()
    notice = sw.aws_notice(body, seen)
    assert (notice.action, notice.at, notice.deadline_s(10)) == ("hibernate", at, 110)
    assert notice.message("aws") == "aws spot reclaim: hibernate at 2026-12-04T03:04:05Z"


def test_aws_polls_through_404s_then_drains_exactly_once_with_the_notice_deadline(metadata, fake_ray):
    ray_cli, recorded = fake_ray
    proc = start("aws", metadata, ray_cli, "--margin-s", "10")
    metadata.wait_until(lambda: metadata.counts["get"] >= 3)  # 404s: nothing scheduled, it keeps polling
    assert proc.poll() is None and recorded() == []
    at = time.time() + 1000
    metadata.set(action={"action": "terminate", "time": iso(at)})
    code, out = finish(proc)
    assert code == 0, out
    (call,) = recorded()  # once, and the watcher is gone
    deadline = int(call[-1])
    assert 900 <= deadline <= 990  # 1000 s ahead less the 10 s margin, less the moments since the notice was read
    assert call == drain_args(f"aws spot reclaim: terminate at {iso(at)}", str(deadline))
    assert metadata.counts["put"] == 1  # one IMDSv2 token for all the polls


def test_aws_without_a_valid_token_sees_no_notice_and_logs_the_401_once(metadata, fake_ray):
    ray_cli, recorded = fake_ray
    with pytest.raises(HTTPError) as err:  # as IMDSv2: a GET without the token header is refused
        urlopen(metadata.url + sw.AWS_ACTION_PATH, timeout=5)
    assert err.value.code == 401
    metadata.set(refuse_tokens=True, action={"action": "stop", "time": iso(time.time() + 100)})
    proc = start("aws", metadata, ray_cli, "--margin-s", "0")
    metadata.wait_until(lambda: metadata.counts["401"] >= 3 and metadata.counts["put"] >= 3)  # a new token each time
    assert proc.poll() is None and recorded() == []
    metadata.set(refuse_tokens=False)
    code, out = finish(proc)
    assert code == 0, out
    assert len(recorded()) == 1 and recorded()[0][-3].startswith("aws spot reclaim: stop at ")
    assert len(re.findall(r"WARNING: instance metadata: HTTP 401", out)) == 1, out


def test_a_failing_drain_exits_non_zero_with_the_cli_stderr_logged(metadata, fake_ray, tmp_path):
    ray_cli, recorded = fake_ray
    (tmp_path / "exit").write_text("1")
    (tmp_path / "stderr").write_text("Error: The drain request is not accepted: node is dead\n")
    metadata.set(action={"action": "terminate", "time": iso(time.time() + 120)})
    code, out = finish(start("aws", metadata, ray_cli))
    assert code == sw.EXIT_DRAIN_FAILED, out
    assert len(recorded()) == 1
    assert re.search(r"\[raydiff\] ERROR: ray drain-node failed \(exit 1\): .*not accepted: node is dead", out), out


def test_once_checks_without_waiting(metadata, fake_ray):
    ray_cli, recorded = fake_ray
    code, out = finish(start("aws", metadata, ray_cli, "--once"))
    assert (code, recorded(), metadata.counts["get"]) == (0, [], 1), out
    code, out = finish(start("gcp", metadata, ray_cli, "--once"))
    assert (code, recorded(), metadata.counts["wait"]) == (0, [], 0), out
    metadata.set(failures=["503"])  # once: an unanswered check is not "no notice"
    code, out = finish(start("gcp", metadata, ray_cli, "--once"))
    assert (code, recorded()) == (sw.EXIT_NO_ANSWER, []), out
    metadata.set(preempted="TRUE")
    code, out = finish(start("gcp", metadata, ray_cli, "--once", "--margin-s", "5"))
    assert code == 0 and len(recorded()) == 1 and recorded()[0][-1] == "25", out


def test_gcp_long_polls_until_preempted_then_drains_with_30_s_less_the_margin(metadata, fake_ray):
    ray_cli, recorded = fake_ray
    proc = start("gcp", metadata, ray_cli, "--margin-s", "10")
    metadata.wait_until(lambda: metadata.counts["wait"] >= 2)  # a wait that ended without a change is made again
    assert proc.poll() is None and recorded() == []
    metadata.set(preempted="TRUE")
    code, out = finish(proc)
    assert code == 0, out
    (call,) = recorded()
    assert call == drain_args(call[-3], "20")
    assert re.fullmatch(r"gcp spot reclaim: preempted at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", call[-3])


def test_gcp_retries_server_errors_and_dropped_connections_logging_each_once(metadata, fake_ray):
    ray_cli, recorded = fake_ray
    metadata.set(preempted="TRUE", failures=["503", "drop", "503"])
    code, out = finish(start("gcp", metadata, ray_cli))
    assert code == 0, out
    assert metadata.failures == [] and len(recorded()) == 1
    assert len(re.findall(r"WARNING: instance metadata: HTTP 503", out)) == 1, out
    assert len(re.findall(r"WARNING: instance metadata: RemoteDisconnected", out)) == 1, out


@pytest.mark.parametrize("args, option", [
    (["--cloud", "azure"], "--cloud"),
    (["--cloud", "aws", "--metadata-url", "169.254.169.254"], "--metadata-url"),
    (["--cloud", "aws", "--metadata-url", "ftp://host"], "--metadata-url"),
    (["--cloud", "gcp", "--node-id", "node-1"], "--node-id"),
    (["--cloud", "gcp", "--address", "ray://head:10001"], "--address"),
    (["--cloud", "aws", "--poll-s", "0"], "--poll-s"),
    (["--cloud", "aws", "--margin-s", "-1"], "--margin-s"),
    (["--cloud", "aws", "--ray-cli", "/nonexistent/ray"], "--ray-cli"),
])
def test_bad_options_are_refused_naming_the_option(args, option, capsys):
    with pytest.raises(SystemExit) as exit_:
        sw.main(args)
    assert exit_.value.code == 2
    assert f"argument {option}:" in capsys.readouterr().err


def test_a_bad_ray_address_in_the_environment_is_refused(monkeypatch, capsys):
    monkeypatch.setenv("RAY_ADDRESS", "head-without-port")
    with pytest.raises(SystemExit):
        sw.main(["--cloud", "aws", "--node-id", NODE])
    assert "argument --address:" in capsys.readouterr().err

