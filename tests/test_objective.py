"""Objective math against independent float64 references."""

import math

import pytest
import torch

from raydiff import objective as O


def _alphas_cumprod(n=1000):
    # SDXL's scaled-linear schedule, written out independently of diffusers.
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def test_perturbed_noise_adds_gamma_xi_uncorrelated_with_eps():
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(64, 4, 32, 32, generator=g, dtype=torch.float64)
    for gamma in (0.05, 0.1, 0.2):
        diff = O.perturb_noise(eps, gamma, g) - eps
        assert diff.std().item() == pytest.approx(gamma, rel=0.02)
        corr = torch.corrcoef(torch.stack([diff.flatten(), eps.flatten()]))[0, 1].item()
        assert abs(corr) < 0.01
        # Input noise keeps eps: its variance is 1 + gamma^2, not gamma^2.
        assert (eps + diff).var().item() == pytest.approx(1 + gamma**2, rel=0.02)


def test_zero_gamma_is_the_standard_objective():
    eps = torch.randn(2, 4, 8, 8)
    assert O.perturb_noise(eps, 0.0) is eps


def test_per_sample_gamma_scales_each_sample():
    g = torch.Generator().manual_seed(1)
    eps = torch.zeros(3, 4, 64, 64, dtype=torch.float64)
    out = O.perturb_noise(eps, torch.tensor([0.0, 0.1, 0.3]), g)
    stds = out.flatten(1).std(dim=1)
    assert stds[0].item() == 0.0
    assert stds[1].item() == pytest.approx(0.1, rel=0.05) and stds[2].item() == pytest.approx(0.3, rel=0.05)


def test_add_noise_matches_reference_and_diffusers():
    from diffusers import DDPMScheduler

    ac = _alphas_cumprod()
    x0 = torch.randn(4, 4, 8, 8, dtype=torch.float64)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 10, 500, 999])
    out = O.add_noise(x0, noise, t, ac)
    for i, ti in enumerate(t.tolist()):
        ref = math.sqrt(ac[ti]) * x0[i] + math.sqrt(1 - ac[ti]) * noise[i]
        assert torch.allclose(out[i], ref, atol=1e-12)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    assert torch.allclose(O.add_noise(x0.float(), noise.float(), t, sched.alphas_cumprod),
                          sched.add_noise(x0.float(), noise.float(), t), atol=1e-6)


def test_velocity_target_uses_clean_eps():
    ac = _alphas_cumprod()
    x0 = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    t = torch.tensor([1, 400, 900])
    g = torch.Generator().manual_seed(3)
    batch = O.make_training_batch(x0, ac, "v_prediction", gamma=0.2, generator=g, timesteps=t)
    # Re-derive eps from the same generator sequence: eps first, then xi.
    g2 = torch.Generator().manual_seed(3)
    eps = torch.randn(x0.shape, generator=g2, dtype=x0.dtype)
    xi = torch.randn(x0.shape, generator=g2, dtype=x0.dtype)
    for i, ti in enumerate(t.tolist()):
        a, s = math.sqrt(ac[ti]), math.sqrt(1 - ac[ti])
        assert torch.allclose(batch.target[i], a * eps[i] - s * x0[i], atol=1e-12)
        assert torch.allclose(batch.noisy[i], a * x0[i] + s * (eps[i] + 0.2 * xi[i]), atol=1e-12)


def test_epsilon_target_is_clean_eps_not_input_noise():
    ac = _alphas_cumprod()
    x0 = torch.zeros(2, 4, 8, 8, dtype=torch.float64)
    t = torch.tensor([999, 999])
    g = torch.Generator().manual_seed(5)
    batch = O.make_training_batch(x0, ac, "epsilon", gamma=0.1, generator=g, timesteps=t)
    g2 = torch.Generator().manual_seed(5)
    eps = torch.randn(x0.shape, generator=g2, dtype=x0.dtype)
    assert torch.equal(batch.target, eps)
    input_noise = batch.noisy / math.sqrt(1 - ac[999])
    assert not torch.allclose(input_noise, eps, atol=1e-3)


def test_unknown_prediction_type_is_rejected():
    with pytest.raises(ValueError, match="sample"):
        O.target("sample", torch.zeros(1), torch.zeros(1), torch.zeros(1, dtype=torch.long), _alphas_cumprod())


def test_mse_per_sample():
    pred = torch.zeros(2, 3, 2, 2)
    tgt = torch.ones(2, 3, 2, 2)
    tgt[1] *= 2
    assert O.mse_per_sample(pred, tgt).tolist() == [1.0, 4.0]
