"""Checks of a run's export shared by the training tests: the exported UNet is the checkpoint's fp32 weights, and stock
diffusers generates from the exported pipeline."""

import os

import torch

from raydiff.train.checkpoint import DS_TAG


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
