"""The Input Perturbation objective as pure tensor functions (no Ray, no DeepSpeed), so each formula is testable alone.

Notation: x0 clean latents, eps the clean noise, xi the fresh perturbation noise, gamma the IP strength,
ab_t the scheduler's cumulative alpha product at timestep t.
IP trains on x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) (eps + gamma xi) while the target is built from the clean eps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def sample_noise(shape, generator: torch.Generator | None = None, device=None, dtype=torch.float32) -> torch.Tensor:
    """The clean noise eps ~ N(0, I)."""
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def perturb_noise(eps: torch.Tensor, gamma: float | torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Input noise eps + gamma * xi with xi fresh and independent of eps (not gamma * xi alone: a known bug elsewhere).

    `gamma` may be a scalar or a per-sample tensor of shape [B].
    """
    if isinstance(gamma, (int, float)) and gamma == 0:
        return eps
    xi = torch.randn(eps.shape, generator=generator, device=eps.device, dtype=eps.dtype)
    if isinstance(gamma, torch.Tensor):
        gamma = gamma.to(eps.device, eps.dtype).reshape(-1, *([1] * (eps.dim() - 1)))
    return eps + gamma * xi


def sample_timesteps(batch: int, num_train_timesteps: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    return torch.randint(0, num_train_timesteps, (batch,), generator=generator, device=device, dtype=torch.long)


def _per_sample(values: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Gather values[t] and broadcast to `like`'s shape."""
    out = values.to(like.device)[timesteps.to(like.device)]
    return out.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Forward process q(x_t | x0) with the given noise: sqrt(ab_t) x0 + sqrt(1 - ab_t) noise."""
    ab = _per_sample(alphas_cumprod, timesteps, x0)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def velocity(x0: torch.Tensor, eps: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
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


def make_training_batch(x0: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str, gamma: float,
                        generator: torch.Generator | None = None, timesteps: torch.Tensor | None = None) -> NoisedBatch:
    """Noise, perturb and build the target for one batch of latents.

    gamma = 0 gives the standard objective; validation always uses gamma = 0 with a fixed generator and timesteps.
    """
    if timesteps is None:
        timesteps = sample_timesteps(x0.shape[0], alphas_cumprod.shape[0], generator, x0.device)
    eps = sample_noise(x0.shape, generator, x0.device, x0.dtype)
    noisy = add_noise(x0, perturb_noise(eps, gamma, generator), timesteps, alphas_cumprod)
    return NoisedBatch(noisy=noisy, timesteps=timesteps, target=target(prediction_type, x0, eps, timesteps, alphas_cumprod))
