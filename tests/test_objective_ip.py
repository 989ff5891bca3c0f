"""γ schedules, offset noise, min-SNR weights, Epsilon Scaling, δ_t and EMA against independent float64 references."""

import math

import pytest
import torch

from raydiff import objective as O


def _alphas_cumprod(n=1000):
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


# ---------------------------------------------------------------- γ schedules


def test_constant_schedule():
    assert [O.gamma_at("constant", 0.1, s, 50) for s in (0, 10, 1000)] == [0.1, 0.1, 0.1]


def test_linear_decay_hits_zero_at_n_and_stays_there():
    n, g = 40, 0.1
    values = [O.gamma_at("linear_decay", g, s, n) for s in range(0, 60)]
    for s, v in enumerate(values):
        assert v == pytest.approx(g * (1 - s / n) if s < n else 0.0, abs=1e-15)
    assert values[0] == g and values[n] == 0.0 and values[n - 1] > 0
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_random_strength_per_batch_is_uniform_in_range():
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([O.gamma_at("random_strength", 0.1, s, 0, batch=8, generator=g) for s in range(20000)],
                         dtype=torch.float64)
    assert draws.min() >= 0 and draws.max() <= 0.1
    # U(0, γ): mean γ/2, variance γ²/12 (5 standard errors of slack).
    se = 0.1 / math.sqrt(12 * len(draws))
    assert abs(draws.mean().item() - 0.05) < 5 * se
    assert draws.var().item() == pytest.approx(0.1**2 / 12, rel=0.05)


def test_random_strength_per_sample_draws_one_per_sample():
    g = torch.Generator().manual_seed(1)
    u = O.gamma_at("random_strength", 0.2, 0, 0, batch=50000, per_sample=True, generator=g)
    assert u.shape == (50000,) and u.min() >= 0 and u.max() <= 0.2
    assert u.double().mean().item() == pytest.approx(0.1, abs=5 * 0.2 / math.sqrt(12 * 50000))
    assert len(torch.unique(u)) > 49000  # distinct per sample, not one value broadcast


def test_unknown_schedule_rejected():
    with pytest.raises(ValueError, match="cosine"):
        O.gamma_at("cosine", 0.1, 0, 10)


# ---------------------------------------------------------------- offset noise and targets


def test_offset_noise_is_in_input_and_target():
    ac = _alphas_cumprod()
    x0 = torch.randn(4, 4, 8, 8, dtype=torch.float64)
    t = torch.tensor([10, 200, 600, 999])
    batch = O.make_training_batch(x0, ac, "epsilon", 0.1, torch.Generator().manual_seed(7), t, noise_offset=0.3)
    g = torch.Generator().manual_seed(7)  # reference draw order: eps, offset, xi
    eps = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    eps = eps + 0.3 * torch.randn(4, 4, 1, 1, generator=g, dtype=x0.dtype)
    xi = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    assert torch.allclose(batch.target, eps, atol=1e-12)
    for i, ti in enumerate(t.tolist()):
        a, s = math.sqrt(ac[ti]), math.sqrt(1 - ac[ti])
        assert torch.allclose(batch.noisy[i], a * x0[i] + s * (eps[i] + 0.1 * xi[i]), atol=1e-12)


def test_offset_noise_statistics():
    g = torch.Generator().manual_seed(2)
    eps = O.sample_noise((4000, 4, 8, 8), g, dtype=torch.float64, noise_offset=0.1)
    channel_means = eps.mean(dim=(2, 3))  # offset std 0.1 plus the mean of 64 N(0,1): var 0.01 + 1/64
    assert channel_means.var().item() == pytest.approx(0.01 + 1 / 64, rel=0.05)


def test_v_target_with_per_sample_gamma_uses_clean_eps():
    ac = _alphas_cumprod()
    x0 = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    t = torch.tensor([5, 500, 995])
    gamma = torch.tensor([0.0, 0.1, 0.2])
    batch = O.make_training_batch(x0, ac, "v_prediction", gamma, torch.Generator().manual_seed(3), t)
    g = torch.Generator().manual_seed(3)
    eps = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    xi = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    for i, ti in enumerate(t.tolist()):
        a, s = math.sqrt(ac[ti]), math.sqrt(1 - ac[ti])
        assert torch.allclose(batch.target[i], a * eps[i] - s * x0[i], atol=1e-12)
        assert torch.allclose(batch.noisy[i], a * x0[i] + s * (eps[i] + gamma[i].item() * xi[i]), atol=1e-12)


# ---------------------------------------------------------------- min-SNR


@pytest.mark.parametrize("t", [0, 100, 300, 700, 999])
def test_min_snr_weights_hand_computed(t):
    ac = _alphas_cumprod()
    ab = ac[t].item()
    snr = ab / (1 - ab)
    ts = torch.tensor([t])
    assert O.snr(ts, ac).item() == pytest.approx(snr, rel=1e-12)
    assert O.min_snr_weights(ts, ac, 5.0, "epsilon").item() == pytest.approx(min(snr, 5.0) / snr, rel=1e-6)
    assert O.min_snr_weights(ts, ac, 5.0, "v_prediction").item() == pytest.approx(min(snr, 5.0) / (snr + 1), rel=1e-6)


def test_min_snr_weights_known_values():
    # ab = 0.5 -> snr 1; ab = 0.9 -> snr 9; ab = 0.1 -> snr 1/9.
    ac = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)
    ts = torch.tensor([0, 1, 2])
    assert O.min_snr_weights(ts, ac, 5.0, "epsilon").tolist() == pytest.approx([5 / 9, 1.0, 1.0])
    assert O.min_snr_weights(ts, ac, 5.0, "v_prediction").tolist() == pytest.approx([0.5, 0.5, 0.1])


def test_weighted_loss():
    batch = O.NoisedBatch(noisy=torch.zeros(2, 1, 2, 2), timesteps=torch.zeros(2, dtype=torch.long),
                          target=torch.stack([torch.ones(1, 2, 2), 2 * torch.ones(1, 2, 2)]))
    pred = torch.zeros(2, 1, 2, 2)
    assert O.weighted_loss(pred, batch).item() == pytest.approx(2.5)
    assert O.weighted_loss(pred, batch, torch.tensor([1.0, 0.5])).item() == pytest.approx((1 + 2) / 2)


# ---------------------------------------------------------------- Epsilon Scaling


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction"])
def test_eps_scale_one_is_identity(ptype):
    pred, x = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    assert O.eps_scale_output(pred, x, torch.tensor([3, 900]), _alphas_cumprod().float(), ptype, 1.0) is pred


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction"])
def test_eps_scale_changes_x0_by_the_formula(ptype):
    ac = _alphas_cumprod()
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    pred = torch.randn_like(x)
    t = torch.tensor([50, 400, 950])
    lam = 1.02
    scaled = O.eps_scale_output(pred, x, t, ac, ptype, lam)
    _, x0_scaled = O.predicted_eps_x0(scaled, x, t, ac, ptype)
    for i, ti in enumerate(t.tolist()):
        a, s = math.sqrt(ac[ti]), math.sqrt(1 - ac[ti])
        eps = pred[i] if ptype == "epsilon" else a * pred[i] + s * x[i]
        assert torch.allclose(x0_scaled[i], (x[i] - s * eps / lam) / a, atol=1e-10)


# ---------------------------------------------------------------- exposure bias δ_t


def test_delta_is_zero_for_forward_samples_and_matches_reference():
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(64, 4, 16, 16, dtype=torch.float64, generator=g)
    ab = 0.3
    forward = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    assert O.exposure_bias_delta(forward, x0, ab) < 1e-5
    # An over-dispersed chain: noise part with std 1.2 * sqrt(1 - ab).
    noise = 1.2 * math.sqrt(1 - ab) * torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    ref = (noise.flatten().std(unbiased=False).item() - math.sqrt(1 - ab)) ** 2
    assert O.exposure_bias_delta(math.sqrt(ab) * x0 + noise, x0, ab) == pytest.approx(ref, rel=1e-9)
    assert ref == pytest.approx((0.2 * math.sqrt(1 - ab)) ** 2, rel=0.2)


def test_moments_sum_across_parts():
    x0, xs = torch.randn(8, 4, 4, 4), torch.randn(8, 4, 4, 4)
    whole = O.noise_moments(xs, x0, 0.7)
    parts = O.noise_moments(xs[:3], x0[:3], 0.7) + O.noise_moments(xs[3:], x0[3:], 0.7)
    assert torch.allclose(whole, parts)


def test_ddim_step_with_perfect_eps_recovers_forward_sample():
    ac = _alphas_cumprod()
    x0 = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    eps = torch.randn_like(x0)
    x_t = math.sqrt(ac[900]) * x0 + math.sqrt(1 - ac[900]) * eps
    x_prev = O.ddim_step(x_t, eps, 900, 500, ac, "epsilon")
    assert torch.allclose(x_prev, math.sqrt(ac[500]) * x0 + math.sqrt(1 - ac[500]) * eps, atol=1e-10)
    v = math.sqrt(ac[900]) * eps - math.sqrt(1 - ac[900]) * x0
    assert torch.allclose(O.ddim_step(x_t, v, 900, -1, ac, "v_prediction"), x0, atol=1e-10)


def test_sampling_timesteps():
    assert O.sampling_timesteps(4, 1000) == [999, 749, 499, 249]


# ---------------------------------------------------------------- EMA


def test_ema_update_arithmetic():
    ema = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}
    params = {"w": torch.tensor([3.0, -2.0], dtype=torch.bfloat16), "b": torch.tensor([1.0])}
    O.ema_update_(ema, params, 0.9)
    assert ema["w"].tolist() == pytest.approx([0.9 * 1 + 0.1 * 3, 0.9 * 2 + 0.1 * -2])
    assert ema["b"].tolist() == pytest.approx([0.1])
    assert ema["w"].dtype == torch.float32
    for _ in range(200):  # converges geometrically to a constant parameter
        O.ema_update_(ema, params, 0.9)
    assert ema["b"].item() == pytest.approx(1.0, abs=1e-6)  # fp32 shadow
