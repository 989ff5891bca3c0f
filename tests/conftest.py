"""Shared pytest fixtures, and the lanes: a test that starts or joins Ray is `integration` (see docs/testing.md)."""

from __future__ import annotations

import os

from raydiff import console

# Before Ray is imported: the suite's output shows raydiff's lines and the tests', not Ray's chatter.
console.configure()

import pytest  # noqa: E402

# A test that uses one of these starts or joins a Ray cluster: it is marked `integration` (the full lane only).
RAY_FIXTURES = {"ray_local", "ray_head"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """The fast lane runs beside the integration lane's clusters (scripts/test.sh): a test that starts Ray without
    being marked `integration` would put a second cluster on the machine, and two break each other."""
    before = _ray_initialized()  # a whole-suite run in one process: the session's cluster may be up already
    yield
    if item.get_closest_marker("integration") is None and not before and _ray_initialized():
        import ray

        ray.shutdown()
        pytest.fail(f"{item.nodeid} started Ray: mark it integration (docs/testing.md)")


def _ray_initialized() -> bool:
    import sys

    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


@pytest.fixture(scope="session", autouse=True)
def raydiff_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Point ``$RAYDIFF_CACHE`` at a session tmp dir so no test writes into ``~/.cache/raydiff``."""
    path = str(tmp_path_factory.mktemp("raydiff-cache"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAYDIFF_CACHE", path)
        yield path


@pytest.fixture(scope="session")
def tiny_sdxl(raydiff_cache: str) -> str:
    """Path of the tiny random SDXL pipeline, built once per session through ``resolve_pretrained("tiny")``."""
    from raydiff.models import TINY, resolve_pretrained

    path = resolve_pretrained(TINY)
    assert os.path.dirname(path) == raydiff_cache
    return path


@pytest.fixture(scope="session")
def ray_local(raydiff_cache: str):
    """One local Ray cluster for the whole session; workers inherit RAYDIFF_CACHE from this process."""
    import ray

    if not ray.is_initialized():
        # 6 CPUs: raydiff.train.driver.run_cpus of a 2-worker run; "local": never a cluster some other run left behind
        ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_bucket():
    """A moto S3 server on loopback (127.0.0.1 only) with one bucket; AWS_* variables point this process at it.

    Module-scoped on purpose: the session's Ray workers never see these variables, so the code under test has to
    hand endpoint and credentials to them explicitly.
    """
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket="raydiff-data")
        yield "s3://raydiff-data"
    server.stop()
