"""Spot reclaim notice -> Ray drain: one small process per spot GPU node on the AWS/GCP cluster launcher.

Nothing in Ray reads the cloud's reclaim notice on a launcher VM; without it the node vanishes and an elastic run falls
back to its periodic checkpoint. This watcher polls the instance metadata and, on a notice, runs Ray's CLI

    ray drain-node --address ADDRESS --node-id NODE --reason DRAIN_NODE_REASON_PREEMPTION
                   --reason-message "<cloud> spot reclaim: <action> at <time>" --deadline-remaining-seconds N

once (what the autoscaler does before it terminates a node; Ray Train hears it through `get_preemption_info`), then
exits 0; a failed drain exits 1 with the CLI's stderr in the log. `ray drain-node` is a hidden, developer-facing
command of Ray (2.60): it can change between Ray versions; it is the only way to drain from outside the GCS.

    python -m raydiff.spot_watcher --cloud aws|gcp [--node-id ID] [--address HOST:PORT] [--poll-s 5] [--margin-s 10]

- AWS (IMDSv2): `spot/instance-action` answers 404 until a stop/terminate/hibernate is scheduled, then
  {"action": ..., "time": ...} about 2 minutes ahead. Only that is a notice: a rebalance recommendation says the risk
  went up, often hours ahead or never followed by a reclaim, with no deadline; draining on it would restart the group
  without a node the run may have kept.
- GCP: `instance/preempted` turns "TRUE" when the 30 s notice starts; the watcher waits on it with the metadata
  server's long-poll (`wait_for_change`).
- N: the time the cloud acts, minus now, minus `--margin-s` (the drain's and the restart's own latency), at least 1.
- `--address` (default `$RAY_ADDRESS`, else "auto"): what `ray drain-node --address` takes: the GCS's host:port
  (the head's port 6379 by default), or "auto", which Ray resolves to `$RAY_ADDRESS`, then to the address the last
  `ray start` on this node recorded (`ray start --address=<head>:6379` on a worker records it too).
- `--node-id` (default: this node's): found once at start by `local_node_id`, a driver connected for a moment.
- `--once`: check once, without waiting, and exit (0: drained or no notice; 3: the metadata server did not answer).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass
from datetime import datetime, timezone
from http.client import HTTPException
from urllib.error import HTTPError
from urllib.request import Request, urlopen

log = logging.getLogger("raydiff.spot_watcher")  # not __name__: run with -m it is "__main__", outside raydiff's

METADATA_URLS = {"aws": "http://169.254.169.254", "gcp": "http://metadata.google.internal"}
AWS_TOKEN_PATH = "/latest/api/token"
AWS_ACTION_PATH = "/latest/meta-data/spot/instance-action"
AWS_TOKEN_TTL_S = 21600  # IMDSv2's longest: one token for 6 hours, not one PUT per poll
AWS_NOTICE_S = 120  # when an instance-action's time cannot be read: the documented 2 minutes
GCP_PREEMPTED_PATH = "/computeMetadata/v1/instance/preempted"
GCP_NOTICE_S = 30
GCP_WAIT_S = 300  # one long-poll's timeout_sec; the server answers the current value when it runs out
REQUEST_TIMEOUT_S = 5  # a plain metadata request; a long-poll gets GCP_WAIT_S more
BACKOFF_CAP_S = 30.0
NODE_ID_HEX = re.compile(r"[0-9a-f]{56}")  # a Ray NodeID: 28 bytes
EXIT_DRAIN_FAILED, EXIT_NO_ANSWER = 1, 3
PROBLEMS = (OSError, HTTPException, ValueError)  # URLError, HTTPError and socket timeouts are OSErrors


@dataclass(frozen=True)
class Notice:
    action: str  # terminate | stop | hibernate (AWS); preempted (GCP)
    at: datetime  # when the cloud acts (UTC)
    seen: float  # time.time() when the notice was read

    def deadline_s(self, margin_s: float) -> int:
        """Seconds Ray gets before the node goes: rounded down, so the drain never promises time the VM lacks."""
        left = round(self.at.timestamp() - self.seen - margin_s, 3)  # to the ms: GCP's seen + 30 - seen is 30
        return max(1, math.floor(left))

    def message(self, cloud: str) -> str:
        return f"{cloud} spot reclaim: {self.action} at {self.at.strftime('%Y-%m-%dT%H:%M:%SZ')}"


def aws_notice(body: bytes, seen: float) -> Notice:
    """A 200 from spot/instance-action is a notice even if its body cannot be read: then the documented 2 minutes."""
    try:
        doc = json.loads(body)
        at = datetime.fromisoformat(doc["time"].replace("Z", "+00:00")).astimezone(timezone.utc)
        return Notice(str(doc["action"]), at, seen)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        log.warning("spot/instance-action answered %r (%r): taking it as a notice %d s ahead", body[:200], err,
                    AWS_NOTICE_S)
        return Notice("unknown", datetime.fromtimestamp(seen + AWS_NOTICE_S, timezone.utc), seen)


class Aws:
    """IMDSv2: a session token (PUT), then spot/instance-action with it. A 401 means the token expired or was
    refused: the next check asks for a new one."""

    def __init__(self, base: str):
        self.base, self.token, self.token_at = base, None, 0.0

    def _token(self) -> str:
        if self.token is None or time.monotonic() - self.token_at > AWS_TOKEN_TTL_S - 60:
            req = Request(self.base + AWS_TOKEN_PATH, method="PUT",
                          headers={"X-aws-ec2-metadata-token-ttl-seconds": str(AWS_TOKEN_TTL_S)})
            with urlopen(req, timeout=REQUEST_TIMEOUT_S) as resp:
                self.token, self.token_at = resp.read().decode().strip(), time.monotonic()
        return self.token

    def check(self) -> Notice | None:
        req = Request(self.base + AWS_ACTION_PATH, headers={"X-aws-ec2-metadata-token": self._token()})
        try:
            with urlopen(req, timeout=REQUEST_TIMEOUT_S) as resp:
                return aws_notice(resp.read(), time.time())
        except HTTPError as err:
            if err.code == 404:  # nothing scheduled
                return None
            if err.code == 401:
                self.token = None
            raise


class Gcp:
    """instance/preempted: a plain read first (a notice may already be on), then long-polls from the value's ETag, so
    a change between two polls is never missed (the server answers at once when the ETag is no longer current)."""

    def __init__(self, base: str):
        self.base, self.etag = base, None

    def check(self) -> Notice | None:
        url, timeout = self.base + GCP_PREEMPTED_PATH, REQUEST_TIMEOUT_S
        if self.etag is not None:
            query = {"wait_for_change": "true", "last_etag": self.etag, "timeout_sec": str(GCP_WAIT_S)}
            url, timeout = f"{url}?{urllib.parse.urlencode(query)}", REQUEST_TIMEOUT_S + GCP_WAIT_S
        with urlopen(Request(url, headers={"Metadata-Flavor": "Google"}), timeout=timeout) as resp:
            value, self.etag = resp.read().decode().strip(), resp.headers.get("ETag")
        if value.upper() != "TRUE":
            return None
        seen = time.time()
        return Notice("preempted", datetime.fromtimestamp(seen + GCP_NOTICE_S, timezone.utc), seen)


class Problems:
    """Each distinct problem with the metadata server logged once: a watcher runs for days, retrying."""

    def __init__(self):
        self.seen: set[str] = set()

    def report(self, err: Exception) -> None:
        reason = getattr(err, "reason", None)  # a URLError's: the socket error under it
        kind = f"HTTP {err.code}" if isinstance(err, HTTPError) else type(
            reason if isinstance(reason, BaseException) else err).__name__
        if kind not in self.seen:
            self.seen.add(kind)
            log.warning("instance metadata: %s (%s); retrying with backoff up to %.0f s, logged once", kind, err,
                        BACKOFF_CAP_S)


def wait_for_notice(source: Aws | Gcp, poll_s: float, once: bool) -> Notice | None:
    """Polls (AWS) or long-polls (GCP) until a notice; with `once`, one check without waiting. Never gives up on
    errors: a metadata server down for a while must not leave the node without its watcher."""
    problems, failures = Problems(), 0
    while True:
        start = time.monotonic()
        try:
            notice = source.check()
            failures = 0
        except PROBLEMS as err:
            problems.report(err)
            failures, notice = failures + 1, None
            if once:
                raise
        if notice is not None or once:
            return notice
        if failures:
            time.sleep(min(poll_s * 2 ** min(failures, 16), max(BACKOFF_CAP_S, poll_s)))  # days of errors: no overflow
        else:  # at most one check per poll_s; a GCP long-poll that waited goes again at once
            time.sleep(max(0.0, poll_s - (time.monotonic() - start)))


def drain(notice: Notice, cloud: str, node_id: str, address: str, margin_s: float, ray_cli: str) -> int:
    """Runs `ray drain-node` once for the notice: 0 when Ray accepted the drain, else 1 with the CLI's output logged."""
    deadline = notice.deadline_s(margin_s)
    cmd = [ray_cli, "drain-node", "--address", address, "--node-id", node_id, "--reason",
           "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", notice.message(cloud),
           "--deadline-remaining-seconds", str(deadline)]
    log.info("%s: draining node %s with a deadline of %d s", notice.message(cloud), node_id, deadline)
    try:  # past the deadline a drain no longer helps
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=max(deadline, 10))
    except (OSError, subprocess.TimeoutExpired) as err:
        log.error("ray drain-node did not run: %s", err)
        return EXIT_DRAIN_FAILED
    if done.returncode != 0:
        log.error("ray drain-node failed (exit %d): %s", done.returncode,
                  done.stderr.strip() or done.stdout.strip() or "no output")
        return EXIT_DRAIN_FAILED
    log.info("node %s drained: Ray Train checkpoints at its next step", node_id)
    return 0


def watch(cloud: str, node_id: str, address: str, metadata_url: str | None = None, poll_s: float = 5.0,
          margin_s: float = 10.0, ray_cli: str | None = None, once: bool = False) -> int:
    """Waits for this VM's spot reclaim notice and drains `node_id` once. Returns the exit code (see the module)."""
    base = (metadata_url or METADATA_URLS[cloud]).rstrip("/")
    ray_cli = ray_cli or default_ray_cli()
    if ray_cli is None:
        raise FileNotFoundError(f"no `ray` executable next to {sys.executable} or on PATH")
    source = Aws(base) if cloud == "aws" else Gcp(base)
    log.info("watching %s for a %s spot reclaim notice of node %s (Ray at %s)", base, cloud, node_id, address)
    try:
        notice = wait_for_notice(source, poll_s, once)
    except PROBLEMS:
        return EXIT_NO_ANSWER
    if notice is None:
        log.info("no spot reclaim notice")
        return 0
    return drain(notice, cloud, node_id, address, margin_s, ray_cli)


def default_ray_cli() -> str | None:
    """The `ray` of this Python's environment (a venv's bin/), else the one on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "ray")
    return beside if os.access(beside, os.X_OK) else shutil.which("ray")


def local_node_id(address: str) -> str:
    """This node's Ray node id: a driver connects to the local raylet for a moment (it starts no Ray). The only
    place this module imports Ray."""
    import ray

    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    try:
        return ray.get_runtime_context().get_node_id()
    finally:
        ray.shutdown()


def _metadata_url(value: str) -> str:
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise argparse.ArgumentTypeError(f"{value!r} is not a base URL like http://169.254.169.254")
    return value


def _seconds(minimum: float, strict: bool):
    def parse(value: str) -> float:
        try:
            out = float(value)
        except ValueError:
            out = math.nan
        if not (out > minimum if strict else out >= minimum):
            raise argparse.ArgumentTypeError(f"{value!r}: seconds {'>' if strict else '>='} {minimum:g} expected")
        return out

    return parse


def _node_id(value: str) -> str:
    if not NODE_ID_HEX.fullmatch(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a Ray node id (56 hex digits)")
    return value


def _address(value: str) -> str:
    host, _, port = value.rpartition(":")
    if value != "auto" and not (host and port.isdigit() and "://" not in host):
        raise argparse.ArgumentTypeError(f"{value!r}: host:port of the Ray GCS, or auto, expected")
    return value


def _ray_cli(value: str) -> str:
    if not (os.path.isfile(value) and os.access(value, os.X_OK)):
        raise argparse.ArgumentTypeError(f"{value!r} is not an executable file")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m raydiff.spot_watcher", description=__doc__.split("\n")[0])
    p.add_argument("--cloud", required=True, choices=sorted(METADATA_URLS))
    p.add_argument("--node-id", type=_node_id, help="Ray node id to drain (default: this node's)")
    p.add_argument("--address", type=_address, default=os.environ.get("RAY_ADDRESS") or "auto",
                   help="Ray GCS host:port, or auto (default: $RAY_ADDRESS, else auto)")
    p.add_argument("--metadata-url", type=_metadata_url, help="instance metadata base URL (default: the cloud's)")
    p.add_argument("--poll-s", type=_seconds(0, strict=True), default=5.0, help="AWS poll and retry interval")
    p.add_argument("--margin-s", type=_seconds(0, strict=False), default=10.0,
                   help="seconds taken off the cloud's deadline")
    p.add_argument("--ray-cli", type=_ray_cli, default=None,
                   help="the `ray` executable to run (default: next to this Python, else on PATH); for wrappers, tests")
    p.add_argument("--once", action="store_true", help="check once without waiting, then exit")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    ray_cli = args.ray_cli or default_ray_cli()
    if ray_cli is None:  # checked now, not when the notice comes
        p.error(f"--ray-cli: no `ray` executable next to {sys.executable} or on PATH")
    node_id = args.node_id
    if node_id is None:
        try:
            node_id = local_node_id(args.address)
        except Exception as err:  # any failure to join: say what to do
            p.error(f"--node-id: this node's Ray node id could not be found ({err!r}); is Ray started here?")
    return watch(args.cloud, node_id, args.address, args.metadata_url, args.poll_s, args.margin_s, ray_cli, args.once)


if __name__ == "__main__":
    sys.exit(main())
