"""End to end on a real local Ray cluster: Ray Data -> TorchTrainer -> DeepSpeed ZeRO -> export -> stock diffusers."""

import glob
import os

import pytest
import torch

from raydiff import config as C
from raydiff.train.driver import run_training
from raydiff.train.loop import DS_TAG
from raydiff.train.metrics_log import read_metrics

pytestmark = pytest.mark.integration


def tiny_cfg(tmp_path, name, *overrides):
    return C.load_config("tiny_cpu", [f"run.storage_path={tmp_path}", f"run.name={name}", "train.max_steps=12",
                                      "validation.every_n_steps=6", "checkpoint.every_n_steps=6",
                                      "data.demo_num_images=64", "data.val_fraction=0.15", *overrides])


def checkpoint_fp32_weights(checkpoint_path):
    """Independent consolidation of the DeepSpeed shards (DeepSpeed's own zero_to_fp32)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(checkpoint_path, tag=DS_TAG)


def assert_export_matches_checkpoint(model_dir, checkpoint_path):
    from diffusers import UNet2DConditionModel

    exported = UNet2DConditionModel.from_pretrained(os.path.join(model_dir, "unet")).state_dict()
    reference = checkpoint_fp32_weights(checkpoint_path)
    assert set(reference) <= set(exported)
    for name, tensor in reference.items():
        assert torch.equal(exported[name], tensor.float()), name


def assert_generates(model_dir):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir)
    image = pipe("a red circle on a blue background", num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


def test_zero3_from_a_latent_cache_val_loss_falls_and_export_loads(ray_local, tmp_path):
    """ZeRO-3 trains from a latent cache (raydiff.data.precompute), which must still make val_loss fall. (The ZeRO-2
    run with online encoding is the default job of test_run_outputs.py, checked the same way there.)"""
    cache = ["data.precompute=latents", f"data.cache_dir={tmp_path / 'cache'}"]
    cfg = tiny_cfg(tmp_path, "zero3", "deepspeed.zero_stage=3", *cache)
    out = run_training(cfg)
    assert len(glob.glob(str(tmp_path / "cache" / "*" / "cache.json"))) == 1  # one complete cache, read by training
    rows = read_metrics(out.metrics_path)
    assert [r["step"] for r in rows] == list(range(0, 13))
    vals = [r["val_loss"] for r in rows if r.get("val_loss") is not None]
    assert len(vals) == 3 and vals[-1] < vals[0], vals
    assert all(r["gamma"] == 0.1 for r in rows)
    assert {"loss", "lr", "samples_per_s"} <= set(rows[-1])
    assert C.load_config(os.path.join(out.run_dir, "config.yaml")) == cfg
    assert_export_matches_checkpoint(out.model_dir, out.checkpoint_path)
    assert_generates(out.model_dir)
