"""Every shipped GPU config, run on CPU "in shape" (raydiff.shape): all its settings (bf16, ZeRO-2/3, gradient
checkpointing, accumulation, EMA, optimizer offload, precompute, buckets, validation images, a Tune trial) through the
CLI and the same code path as on the cluster, with the tiny SDXL, the demo data and a few steps."""

import json
from pathlib import Path

import pytest
import yaml

from raydiff import config as C
from raydiff.export import EXPORT_INFO, HALF_VARIANT
from raydiff.shape import SHAPE_RESOLUTION, SHAPE_STEPS
from raydiff.train.metrics_log import read_metrics

REPO = Path(__file__).resolve().parent.parent
TRAIN_CONFIGS = ["sdxl_pokemon_blip_ip", "sdxl_pokemon_blip_ip_zero3"]
TUNE_CONFIGS = ["tune_gamma_lr"]
# CPU configs run as shipped by other tests (a shape run would change nothing but the step counts).
RUN_AS_SHIPPED = {"tiny_cpu": "test_run_outputs.py", "tune_tiny_cpu": "test_tune.py"}


def shipped(name: str) -> C.Config:
    return C.from_dict(yaml.safe_load(C.resolve_config_path(name).read_text()))


def test_every_shipped_config_is_run():
    names = {p.stem for p in C.CONFIG_DIR.glob("*.yaml")}
    assert names == set(TRAIN_CONFIGS) | set(TUNE_CONFIGS) | set(RUN_AS_SHIPPED)
    for name, test_file in RUN_AS_SHIPPED.items():
        cfg = shipped(name)
        assert not cfg.scaling.use_gpu and cfg.model.pretrained == "tiny", name
        source = (REPO / "tests" / test_file).read_text()
        assert f'"{name}"' in source or name == C.DEFAULT_CONFIG and "raydiff.train" in source, (name, test_file)


def check_trained_run(run_dir: Path, cfg: C.Config) -> list[dict]:
    """A finished shape run: every step logged, validation on its cadence, a final checkpoint, a loadable export."""
    rows = read_metrics(str(run_dir / "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(SHAPE_STEPS + 1))
    assert [r["step"] for r in rows if "val_loss" in r] == [0, SHAPE_STEPS // 2, SHAPE_STEPS]
    assert all(r["loss"] > 0 for r in rows[1:])
    checkpoints = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
    assert state["step"] == SHAPE_STEPS
    from diffusers import StableDiffusionXLPipeline

    model = run_dir / "final"
    pipe = StableDiffusionXLPipeline.from_pretrained(model)
    assert pipe.unet.dtype.itemsize == 4
    import torch

    half = StableDiffusionXLPipeline.from_pretrained(model, variant=HALF_VARIANT, dtype=torch.float16)
    assert half.unet.dtype == torch.float16  # bf16 runs also ship diffusers' 16-bit variant
    info = json.loads((model / EXPORT_INFO).read_text())
    assert info["ema"] is (cfg.train.ema_decay is not None)
    return rows


@pytest.mark.parametrize("name", TRAIN_CONFIGS)
def test_training_config_runs_in_shape(ray_local, tmp_path, name):
    from raydiff.train.driver import main

    assert main(["--config", name, "--shape-check", str(tmp_path)]) == 0
    cfg = shipped(name)
    run_dir = tmp_path / f"{cfg.run.name}-shape"
    rows = check_trained_run(run_dir, cfg)
    assert rows[-1]["epoch"] >= 0
    if cfg.validation.prompts and cfg.deepspeed.zero_stage < 3:  # bf16 UNet, fp32 VAE: the images decode
        for step in (0, SHAPE_STEPS // 2, SHAPE_STEPS):
            assert (run_dir / "samples" / f"step_{step:06d}.png").stat().st_size > 0
    if cfg.logging.sample_prompts:
        from PIL import Image

        grid = Image.open(run_dir / "samples.png")  # rendered at the training resolution, not the model's 1024 px
        assert max(grid.size) <= 2 * SHAPE_RESOLUTION and grid.size[0] % SHAPE_RESOLUTION == 0


@pytest.mark.parametrize("name", TUNE_CONFIGS)
def test_tune_config_runs_one_trial_in_shape(ray_local, tmp_path, name):
    from raydiff.tune.sweep import main

    assert main(["--config", name, "--shape-check", str(tmp_path)]) == 0
    cfg = shipped(name)
    sweep_dir = tmp_path / f"{cfg.run.name}-shape"
    trials = sorted((sweep_dir / "runs").iterdir())
    assert len(trials) == 1
    check_trained_run(trials[0], cfg)
    if cfg.data.cache_dir:  # the precompute cache every trial reads was built once, by the sweep, before the trials
        builds = [d for d in (tmp_path / "precompute-cache").glob("*/*") if d.is_dir()]
        assert len(builds) == 1 and list(builds[0].glob("*.parquet"))
        assert (sweep_dir / "data_manifest.json").exists()
