"""Shared pytest fixtures."""

from __future__ import annotations

import os

import pytest


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
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()
