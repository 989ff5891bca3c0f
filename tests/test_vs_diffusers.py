"""benchmarks/vs_diffusers.py without its peer: the inputs it builds, the configs it runs raydiff with, its rates."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from raydiff import config as C
from raydiff.data import sources

SPEC = importlib.util.spec_from_file_location(
    "vs_diffusers", Path(__file__).resolve().parent.parent / "benchmarks" / "vs_diffusers.py")
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)


def test_inputs_are_a_diffusers_pipeline_and_an_image_folder_raydiff_reads(tmp_path):
    model, data = bench.prepare_inputs(str(tmp_path), images=6)
    assert json.loads(Path(model, "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    rows = [json.loads(line) for line in Path(data, "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(Path(data, r["file_name"]).is_file() and r["text"] for r in rows)
    assert sources.resolve(data).format == "imagefolder"


@pytest.mark.parametrize("layout", sorted(bench.LAYOUTS))
def test_every_layout_is_a_valid_raydiff_config_on_the_shared_settings(layout, tmp_path):
    args = bench.parse_args(["--skip-peer", "--steps", "500", "--batch-size", "4"])
    model, data = (str(tmp_path / d) for d in ("model", "data"))
    os.makedirs(model), os.makedirs(data)
    cfg = C.load_config("tiny_cpu", bench.raydiff_overrides(args, model, data, str(tmp_path), "n", layout))
    assert (cfg.train.max_steps, cfg.data.source, cfg.model.pretrained) == (500, data, model)
    assert cfg.train.batch_size * cfg.scaling.num_workers == 4  # every layout trains the peer's global batch
    assert (cfg.data.center_crop, cfg.data.random_flip, cfg.data.resolution) == (True, False, 64)


def test_rates_from_every_step_and_from_every_tenth():
    every = {s: 10.0 + 0.5 * s for s in range(1, 101)}  # step 1 ends 10.5 s after the start; 0.5 s per step
    dense = bench.rates(every, 0.0, 20, 4)
    sparse = bench.rates({s: t for s, t in every.items() if s % 10 == 0}, 0.0, 20, 4)
    for r in (dense, sparse):
        assert r["steady_samples_per_s"] == pytest.approx(8.0) and r["median_step_s"] == pytest.approx(0.5)
        assert r["startup_s"] == pytest.approx(10.5) and r["steps"] == 100


def test_floor_trains_the_pipelines_unet_in_a_bare_loop_and_times_every_step(tmp_path):
    model, _ = bench.prepare_inputs(str(tmp_path), images=2)
    args = bench.parse_args(["--skip-peer", "--floor", "--steps", "4", "--steady-from", "1", "--batch-size", "2"])
    assert bench.trainers(args) == [bench.FLOOR, "raydiff:default", "raydiff:best"]
    res = bench.run_floor(args, model, str(tmp_path), "r0")
    times = json.loads(Path(tmp_path, "floor-r0-steps.json").read_text())
    assert len(times) == 4 and times == sorted(times)
    assert res["steps"] == 4 and res["steady_samples_per_s"] > 0 and 0 < res["startup_s"] < res["wall_s"]
