"""The Input Perturbation objective as pure tensor functions (no Ray, no DeepSpeed), so each formula is testable alone.

Notation: x0 clean latents, eps the clean noise, xi the fresh perturbation noise, gamma the IP strength,
ab_t the scheduler's cumulative alpha product at timestep t.
IP trains on x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) (eps + gamma xi) while the target is built from the clean eps.
Also here: gamma schedules, offset noise, min-SNR weights, Epsilon Scaling and the exposure-bias measure delta_t
(docs/objective.md states each formula and its source).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from raydiff.config import GammaSchedule, choices

GAMMA_SCHEDULES = choices(GammaSchedule)


def sample_noise(shape, generator: torch.Generator | None = None, device=None, dtype=torch.float32,
                 noise_offset: float = 0.0) -> torch.Tensor:
    """The clean noise eps ~ N(0, I), plus `noise_offset` * a per-(sample, channel) constant when set.

    The offset is part of eps itself, so it is in the input and in the target; the IP term is added afterwards.
    """
    eps = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    if noise_offset:
        shift = torch.randn((*shape[:2], *([1] * (len(shape) - 2))), generator=generator, device=device, dtype=dtype)
        eps = eps + noise_offset * shift
    return eps


def gamma_at(schedule: str, gamma: float, step: int, decay_steps: int = 0, batch: int = 1,
             per_sample: bool = False, generator: torch.Generator | None = None) -> float | torch.Tensor:
    """The IP strength in force at optimizer step `step` (0-based).

    constant: gamma. linear_decay: gamma * (1 - step / N) for step < N, then 0. random_strength: u ~ U(0, gamma),
    one per batch (a 0-dim tensor) or, with `per_sample`, one per sample (a tensor of shape [batch]); both stay on
    the generator's device, so a training step never waits for the GPU to hand back a Python float.
    """
    if schedule == "constant":
        return float(gamma)
    if schedule == "linear_decay":
        return float(gamma) * max(0.0, 1.0 - step / decay_steps) if decay_steps > 0 else 0.0
    if schedule == "random_strength":
        u = torch.rand(batch if per_sample else 1, generator=generator, device=getattr(generator, "device", None),
                       dtype=torch.float64) * gamma
        return u.float() if per_sample else u[0].float()
    raise ValueError(f"unknown gamma schedule {schedule!r} ({' | '.join(GAMMA_SCHEDULES)})")


def perturb_noise(eps: torch.Tensor, gamma: float | torch.Tensor,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Input noise eps + gamma * xi with xi fresh and independent of eps (not gamma * xi alone: a known bug elsewhere).

    `gamma` may be a scalar or a per-sample tensor of shape [B].
    """
    if isinstance(gamma, (int, float)) and gamma == 0:
        return eps
    xi = torch.randn(eps.shape, generator=generator, device=eps.device, dtype=eps.dtype)
    if isinstance(gamma, torch.Tensor):
        gamma = gamma.to(eps.device, eps.dtype).reshape(-1, *([1] * (eps.dim() - 1)))
    return eps + gamma * xi


def sample_timesteps(batch: int, num_train_timesteps: int, generator: torch.Generator | None = None,
                     device=None) -> torch.Tensor:
    return torch.randint(0, num_train_timesteps, (batch,), generator=generator, device=device, dtype=torch.long)


def _per_sample(values: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Gather values[t] and broadcast to `like`'s shape."""
    out = values.to(like.device)[timesteps.to(like.device)]
    return out.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
              alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Forward process q(x_t | x0) with the given noise: sqrt(ab_t) x0 + sqrt(1 - ab_t) noise."""
    ab = _per_sample(alphas_cumprod, timesteps, x0)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def velocity(x0: torch.Tensor, eps: torch.Tensor, timesteps: torch.Tensor,
             alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """v = sqrt(ab_t) eps - sqrt(1 - ab_t) x0, built from the CLEAN eps."""
    ab = _per_sample(alphas_cumprod, timesteps, x0)
    return ab.sqrt() * eps - (1 - ab).sqrt() * x0


def target(prediction_type: str, x0: torch.Tensor, eps: torch.Tensor, timesteps: torch.Tensor,
           alphas_cumprod: torch.Tensor) -> torch.Tensor:
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return velocity(x0, eps, timesteps, alphas_cumprod)
    raise ValueError(f"unknown prediction_type {prediction_type!r} (epsilon | v_prediction)")


def mse_per_sample(pred: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample, computed in fp32 whatever the model dtype."""
    err = F.mse_loss(pred.float(), tgt.float(), reduction="none")
    return err.mean(dim=tuple(range(1, err.dim())))


@dataclass
class NoisedBatch:
    """What the UNet sees (`noisy`, `timesteps`) and what it is scored against (`target`)."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor


def make_training_batch(x0: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str,
                        gamma: float | torch.Tensor, generator: torch.Generator | None = None,
                        timesteps: torch.Tensor | None = None, noise_offset: float = 0.0) -> NoisedBatch:
    """Noise, perturb and build the target for one batch of latents.

    gamma = 0 gives the standard objective; validation always uses gamma = 0 with a fixed generator and timesteps.
    """
    if timesteps is None:
        timesteps = sample_timesteps(x0.shape[0], alphas_cumprod.shape[0], generator, x0.device)
    eps = sample_noise(x0.shape, generator, x0.device, x0.dtype, noise_offset)
    noisy = add_noise(x0, perturb_noise(eps, gamma, generator), timesteps, alphas_cumprod)
    return NoisedBatch(noisy=noisy, timesteps=timesteps,
                       target=target(prediction_type, x0, eps, timesteps, alphas_cumprod))


# ---------------------------------------------------------------- loss weighting


def snr(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ab_t / (1 - ab_t) of the clean forward process (IP does not change the timestep's SNR)."""
    ab = alphas_cumprod.to(timesteps.device, torch.float64)[timesteps]  # gathered on-device: no host sync
    return ab / (1 - ab)


def min_snr_weights(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, snr_gamma: float,
                    prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma per-sample loss weights (Hang et al. 2023), in the form common trainers use.

    epsilon: min(snr, g) / snr. v_prediction: min(snr, g) / (snr + 1), because the v-MSE equals (snr + 1) times the
    eps-MSE, so this gives the same effective weight on the x0 error as the epsilon form.
    """
    s = snr(timesteps, alphas_cumprod)
    clipped = torch.clamp(s, max=snr_gamma)
    if prediction_type == "epsilon":
        return (clipped / s).float()
    if prediction_type == "v_prediction":
        return (clipped / (s + 1)).float()
    raise ValueError(f"unknown prediction_type {prediction_type!r} (epsilon | v_prediction)")


def weighted_loss(pred: torch.Tensor, batch: NoisedBatch, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the batch of the per-sample MSE, each sample weighted when `weights` is given."""
    losses = mse_per_sample(pred, batch.target)
    return (losses * weights.to(losses.device)).mean() if weights is not None else losses.mean()


# ---------------------------------------------------------------- sampling-side formulas (Ning et al., ICLR 2024)


def predicted_eps_x0(pred: torch.Tensor, sample: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor,
                     prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps_hat, x0_hat) implied by a model output at the VP sample x_t."""
    ab = _per_sample(alphas_cumprod, timesteps, sample)
    a, s = ab.sqrt(), (1 - ab).sqrt()
    if prediction_type == "epsilon":
        return pred, (sample - s * pred) / a
    if prediction_type == "v_prediction":
        return a * pred + s * sample, a * sample - s * pred
    raise ValueError(f"unknown prediction_type {prediction_type!r} (epsilon | v_prediction)")


def eps_scale_output(pred: torch.Tensor, sample: torch.Tensor, timesteps: torch.Tensor,
                     alphas_cumprod: torch.Tensor, prediction_type: str, lam: float) -> torch.Tensor:
    """Epsilon Scaling: the model output re-expressed with its noise prediction divided by `lam`.

    x0 is then predicted as (x_t - sqrt(1 - ab_t) eps_hat / lam) / sqrt(ab_t). lam = 1 returns `pred` itself.
    """
    if lam == 1:
        return pred
    if prediction_type == "epsilon":
        return pred / lam
    eps_hat, _ = predicted_eps_x0(pred.double(), sample.double(), timesteps, alphas_cumprod.double(), prediction_type)
    eps_hat = eps_hat / lam
    ab = _per_sample(alphas_cumprod.double(), timesteps, eps_hat)
    x0 = (sample.double() - (1 - ab).sqrt() * eps_hat) / ab.sqrt()
    return (ab.sqrt() * eps_hat - (1 - ab).sqrt() * x0).to(pred.dtype)


def ddim_step(sample: torch.Tensor, pred: torch.Tensor, t: int, t_prev: int, alphas_cumprod: torch.Tensor,
              prediction_type: str) -> torch.Tensor:
    """One deterministic DDIM step x_t -> x_{t_prev} (t_prev < 0 means the clean end, ab = 1)."""
    ts = torch.full((sample.shape[0],), t, dtype=torch.long)
    eps_hat, x0_hat = predicted_eps_x0(pred, sample, ts, alphas_cumprod, prediction_type)
    ab_prev = alphas_cumprod[t_prev].to(sample.dtype) if t_prev >= 0 else torch.ones((), dtype=sample.dtype)
    return ab_prev.to(sample.device).sqrt() * x0_hat + (1 - ab_prev.to(sample.device)).sqrt() * eps_hat


def sampling_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """`num_steps` evenly spaced descending timesteps from the last one: T-1, T-1-k, ... (k = T // num_steps)."""
    stride = num_train_timesteps // num_steps
    return [num_train_timesteps - 1 - i * stride for i in range(num_steps)]


def noise_moments(sampled: torch.Tensor, x0: torch.Tensor, alpha_cumprod_t: float) -> torch.Tensor:
    """[sum, sum of squares, count] (float64) of the noise part x_hat_t - sqrt(ab_t) x0; summable across ranks."""
    noise = sampled.double() - math.sqrt(alpha_cumprod_t) * x0.double()
    return torch.stack([noise.sum(), (noise * noise).sum(), torch.tensor(float(noise.numel()), dtype=torch.float64,
                                                                         device=noise.device)])


def delta_from_moments(moments: torch.Tensor, alpha_cumprod_t: float) -> float:
    """delta_t = (sqrt(var_hat_t) - sqrt(1 - ab_t))^2 (Ning et al., ICLR 2024: the variance-error metric).

    var_hat_t is the numerical variance of the noise part x_hat_t - sqrt(ab_t) x0 of chain samples that started
    from forward-noised x0; 1 - ab_t is its variance under the forward process q(x_t | x0).
    """
    total, squares, count = (float(v) for v in moments)
    var = max(squares / count - (total / count) ** 2, 0.0)
    return (math.sqrt(var) - math.sqrt(1 - alpha_cumprod_t)) ** 2


def exposure_bias_delta(sampled: torch.Tensor, x0: torch.Tensor, alpha_cumprod_t: float) -> float:
    return delta_from_moments(noise_moments(sampled, x0, alpha_cumprod_t), alpha_cumprod_t)


def ema_update_(ema: dict[str, torch.Tensor], params: dict[str, torch.Tensor], decay: float) -> None:
    """In place: ema <- decay * ema + (1 - decay) * param, per tensor (fp32 shadow, any param dtype)."""
    with torch.no_grad():
        for name, shadow in ema.items():
            shadow.mul_(decay).add_(params[name].detach().to(shadow.device, shadow.dtype), alpha=1 - decay)
