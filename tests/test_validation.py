"""Validation helpers, Epsilon Scaling inside the stock diffusers pipeline, caption dropout, config keys."""

import math

import numpy as np
import pytest
import torch

from raydiff import config as C
from raydiff import objective as O
from raydiff import validation as V
from raydiff.data.pipeline import drop_caption


def _ac():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def test_band_losses():
    ts = [125, 375, 600, 625, 875]
    sums = torch.tensor([[2.0, 2], [4.0, 2], [1.0, 1], [3.0, 1], [8.0, 4]], dtype=torch.float64)
    m = V.loss_metrics(ts, sums)
    assert m["val_loss"] == pytest.approx(18 / 10)
    assert m["val_loss_t0_249"] == 1.0 and m["val_loss_t250_499"] == 2.0
    assert m["val_loss_t500_749"] == 2.0 and m["val_loss_t750_999"] == 2.0


def test_exposure_bias_chain_with_oracle_is_near_zero_and_scaling_raises_it():
    """A model that predicts the true eps of a single-point dataset follows the forward process: delta ~ 0.
    Epsilon Scaling of that oracle leaves signal-noise mismatch, so delta grows with |lambda - 1|."""
    ac = _ac()
    x0 = torch.full((32, 4, 8, 8), 0.5, dtype=torch.float32)

    def oracle(x, t, _cond):
        ab = ac.float()[t].reshape(-1, 1, 1, 1)
        return (x - ab.sqrt() * x0) / (1 - ab).sqrt()

    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    stock = V.exposure_bias_moments(oracle, x0, None, ac, "epsilon", 5, 1.0, gen())
    mean, deltas = V.exposure_bias(stock, ac)
    assert len(deltas) == 5 and mean < 1e-4  # finite-sample variance noise only
    scaled, _ = V.exposure_bias(V.exposure_bias_moments(oracle, x0, None, ac, "epsilon", 5, 1.1, gen()), ac)
    assert scaled > 10 * mean and scaled > 1e-4


def test_frechet_distance_reference():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=g, dtype=torch.float64)
    b = 2 * torch.randn(4000, 3, generator=g, dtype=torch.float64) + 1
    # Gaussians N(0, I) and N(1, 4I) in 3-d: |1|^2 * 3 + tr(I + 4I - 2 * 2I) = 3 + 3.
    assert V.frechet_distance(a, b) == pytest.approx(6.0, rel=0.1)
    assert V.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_caption_dropout_rate():
    dropped = [drop_caption(0, 0, key, 0.1) for key in range(20000)]
    rate = sum(dropped) / len(dropped)
    assert abs(rate - 0.1) < 5 * math.sqrt(0.1 * 0.9 / len(dropped))
    assert dropped == [drop_caption(0, 0, key, 0.1) for key in range(20000)]  # deterministic
    assert dropped != [drop_caption(0, 1, key, 0.1) for key in range(20000)]  # reseeded per epoch
    assert not any(drop_caption(0, 0, key, 0.0) for key in range(100))


def test_config_keys_validated():
    cfg = C.load_config("tiny_cpu", ["objective.gamma_schedule=linear_decay", "objective.snr_gamma=5",
                                     "train.ema_decay=0.99", "data.caption_dropout=0.1"])
    assert cfg.objective.gamma_schedule == "linear_decay" and cfg.train.ema_decay == 0.99
    with pytest.raises(C.ConfigError, match="objective.gamma_schedule"):
        C.load_config("tiny_cpu", ["objective.gamma_schedule=cosine"])
    assert C.load_config("tiny_cpu", ["train.ema_decay=0.999", "deepspeed.zero_stage=3"]).train.ema_decay == 0.999
    with pytest.raises(C.ConfigError, match="deepspeed.precision.*zero_stage 1-3"):  # no fp32 masters at ZeRO-0
        C.load_config("tiny_cpu", ["deepspeed.precision=bf16", "deepspeed.zero_stage=0"])
    with pytest.raises(C.ConfigError, match="deepspeed.offload_optimizer"):
        C.load_config("tiny_cpu", ["deepspeed.offload_optimizer=true", "deepspeed.zero_stage=0"])
    with pytest.raises(C.ConfigError, match="data.caption_dropout"):
        C.load_config("tiny_cpu", ["data.caption_dropout=1.5"])


# ---------------------------------------------------------------- Epsilon Scaling in the stock pipeline


@pytest.fixture(scope="module")
def pipe(tiny_sdxl):
    from raydiff.generate import load_pipeline

    return load_pipeline(tiny_sdxl)


def _latents(pipe, **kw):
    from raydiff.generate import _prepare_pipeline

    p, hook = _prepare_pipeline(pipe, **kw)
    try:
        return p("a red circle", num_inference_steps=3, height=64, width=64, output_type="latent",
                 generator=torch.Generator().manual_seed(0)).images
    finally:
        if hook is not None:
            hook.remove()


def test_eps_scale_one_is_bit_identical_to_stock(pipe):
    stock = pipe("a red circle", num_inference_steps=3, height=64, width=64, output_type="latent",
                 generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(_latents(pipe, eps_scale=1.0), stock)
    assert not torch.equal(_latents(pipe, eps_scale=1.05), stock)
    assert torch.equal(_latents(pipe, eps_scale=1.0), stock)  # the hook was removed


def test_eps_scale_hook_divides_unet_noise_prediction(pipe):
    unet, ac = pipe.unet, pipe.scheduler.alphas_cumprod
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    cond = dict(encoder_hidden_states=torch.randn(1, 77, unet.config.cross_attention_dim),
                added_cond_kwargs={"text_embeds": torch.randn(1, 32),
                                   "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])})
    with torch.no_grad():
        stock = unet(x, 500, **cond, return_dict=False)[0]
        handle = V.eps_scale_hook(unet, pipe.scheduler, "epsilon", 1.25)
        try:
            scaled = unet(x, 500, **cond, return_dict=False)[0]
        finally:
            handle.remove()
    assert torch.allclose(scaled, stock / 1.25)
    _, x0_stock = O.predicted_eps_x0(stock, x, torch.tensor([500]), ac, "epsilon")
    _, x0_scaled = O.predicted_eps_x0(scaled, x, torch.tensor([500]), ac, "epsilon")
    ab = ac[500].item()
    assert torch.allclose(x0_scaled, (x - math.sqrt(1 - ab) * stock / 1.25) / math.sqrt(ab), atol=1e-5)
    assert not torch.allclose(x0_scaled, x0_stock)


def test_generate_cli_eps_scale(tiny_sdxl, tmp_path):
    from PIL import Image

    from raydiff.generate import main

    outs = []
    for lam in ("1.0", "1.1"):
        out = tmp_path / f"img{lam}.png"
        assert main(["--model", tiny_sdxl, "--prompt", "a red circle", "--out", str(out), "--steps", "3",
                     "--eps-scale", lam]) == 0
        outs.append(np.asarray(Image.open(out)))
    assert outs[0].shape == outs[1].shape
    assert main(["--model", tiny_sdxl, "--prompt", "x", "--out", str(tmp_path / "x.png"), "--eps-scale", "0"]) == 2
