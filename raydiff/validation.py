"""Fair validation helpers: timestep-band losses, the exposure-bias chain, Fréchet distance, sample-image grids.

No Ray here: the training loop (and benchmarks/ip_effect.py) pass in a `predict(noisy, timesteps, cond)` callable
and do any cross-rank summing themselves. Formulas live in `raydiff.objective`.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from PIL import Image

from raydiff import objective

NUM_BANDS = 4
Predict = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]


def band_key(band: int, num_train_timesteps: int = 1000) -> str:
    """`val_loss_t<lo>_<hi>`: the loss over validation timesteps in [lo, hi] (quarters of the schedule)."""
    width = num_train_timesteps // NUM_BANDS
    return f"val_loss_t{band * width}_{(band + 1) * width - 1 if band < NUM_BANDS - 1 else num_train_timesteps - 1}"


def band_of(t: int, num_train_timesteps: int = 1000) -> int:
    return min(t * NUM_BANDS // num_train_timesteps, NUM_BANDS - 1)


def loss_metrics(timesteps: list[int], sums: torch.Tensor, num_train_timesteps: int = 1000) -> dict[str, float]:
    """`val_loss` and one `val_loss_t…` per band that has validation timesteps, from per-timestep [sum, count] rows."""
    sums = sums.double().cpu()
    out = {"val_loss": (sums[:, 0].sum() / sums[:, 1].sum()).item()}
    for band in range(NUM_BANDS):
        rows = [i for i, t in enumerate(timesteps) if band_of(t, num_train_timesteps) == band]
        if rows:
            part = sums[rows]
            out[band_key(band, num_train_timesteps)] = (part[:, 0].sum() / part[:, 1].sum()).item()
    return out


def exposure_bias_moments(predict: Predict, x0: torch.Tensor, cond, alphas_cumprod: torch.Tensor,
                          prediction_type: str, num_steps: int, eps_scale: float,
                          generator: torch.Generator) -> torch.Tensor:
    """Run a DDIM chain from x_T ~ q(x_T | x0) and return per-step noise moments, shape [num_steps, 3].

    Row i holds [sum, sum of squares, count] of x_hat_t - sqrt(ab_t) x0 at the i-th state the chain reaches
    (the last row is the clean estimate, ab = 1). Sum rows across batches/ranks, then `deltas_from_moments`.
    """
    ts = objective.sampling_timesteps(num_steps, alphas_cumprod.shape[0])
    ac = alphas_cumprod.to(x0.device, torch.float32)
    eps = objective.sample_noise(x0.shape, generator, x0.device, x0.dtype)
    sample = objective.add_noise(x0, eps, torch.full((x0.shape[0],), ts[0], device=x0.device), ac)
    rows = []
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        timesteps = torch.full((x0.shape[0],), t, dtype=torch.long, device=x0.device)
        pred = predict(sample, timesteps, cond).float()
        pred = objective.eps_scale_output(pred, sample, timesteps, ac, prediction_type, eps_scale)
        sample = objective.ddim_step(sample, pred, t, t_prev, ac, prediction_type)
        rows.append(objective.noise_moments(sample, x0, _ab(ac, t_prev)))
    return torch.stack(rows)


def _ab(alphas_cumprod: torch.Tensor, t: int) -> float:
    return float(alphas_cumprod[t]) if t >= 0 else 1.0


def chain_targets(num_steps: int, alphas_cumprod: torch.Tensor) -> list[float]:
    """ab of each state the chain reaches (matching the rows of `exposure_bias_moments`)."""
    ts = objective.sampling_timesteps(num_steps, alphas_cumprod.shape[0])
    return [_ab(alphas_cumprod, t) for t in ts[1:]] + [1.0]


def exposure_bias(moments: torch.Tensor, alphas_cumprod: torch.Tensor) -> tuple[float, list[float]]:
    """(mean delta_t over the chain's noisy states, every delta_t). The clean end (ab = 1) is left out of the mean:
    the forward process has no variance there, so its 'delta' is a reconstruction error, not a variance error."""
    abs_ = chain_targets(moments.shape[0], alphas_cumprod)
    deltas = [objective.delta_from_moments(m, ab) for m, ab in zip(moments.cpu(), abs_)]
    noisy = deltas[:-1] or deltas
    return sum(noisy) / len(noisy), deltas


def generate_latents(predict: Predict, shape, cond, alphas_cumprod: torch.Tensor, prediction_type: str,
                     num_steps: int, eps_scale: float, generator: torch.Generator, device=None) -> torch.Tensor:
    """Generate latents from pure noise with the same DDIM chain (for the Fréchet distance)."""
    ac = alphas_cumprod.to(device, torch.float32)
    sample = torch.randn(shape, generator=generator, device=device)
    ts = objective.sampling_timesteps(num_steps, ac.shape[0])
    for i, t in enumerate(ts):
        timesteps = torch.full((shape[0],), t, dtype=torch.long, device=device)
        pred = objective.eps_scale_output(predict(sample, timesteps, cond).float(), sample, timesteps, ac,
                                          prediction_type, eps_scale)
        sample = objective.ddim_step(sample, pred, t, ts[i + 1] if i + 1 < len(ts) else -1, ac, prediction_type)
    return sample


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two sets of feature rows ([N, D] each), in float64.

    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), the matrix roots by symmetric eigendecomposition.
    """
    a, b = a.double().flatten(1), b.double().flatten(1)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    root_a = _psd_sqrt(s_a)
    cross = _psd_sqrt(root_a @ s_b @ root_a)
    return float(((mu_a - mu_b) ** 2).sum() + torch.trace(s_a + s_b - 2 * cross))


def _psd_sqrt(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


# ---------------------------------------------------------------- sample images


def eps_scale_hook(unet: torch.nn.Module, scheduler, prediction_type: str, lam: float):
    """Make `unet` return Epsilon-Scaled outputs inside any diffusers pipeline; returns the hook handle (or None).

    Works with any scheduler because only the UNet output changes: diffusers feeds the UNet the VP-scaled sample
    x_t (`scale_model_input`), so the training alphas_cumprod converts its output to (eps, x0) and back.
    lam = 1 installs nothing, so sampling is exactly the stock pipeline.
    """
    if lam == 1:
        return None
    ac = getattr(scheduler, "alphas_cumprod", None)
    if ac is None:
        raise ValueError(f"{type(scheduler).__name__} has no alphas_cumprod; Epsilon Scaling needs a DDPM-family "
                         "scheduler")

    def hook(_module, args, kwargs, output):
        sample = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        t = torch.as_tensor(t, device=sample.device).round().long().clamp(0, ac.shape[0] - 1).expand(sample.shape[0])
        pred = output[0] if isinstance(output, tuple) else output.sample
        scaled = objective.eps_scale_output(pred, sample, t, ac, prediction_type, lam)
        if isinstance(output, tuple):
            return (scaled, *output[1:])
        output.sample = scaled
        return output

    return unet.register_forward_hook(hook, with_kwargs=True)


def render_grid(pipe, prompts: list[str], steps: int, seed: int, eps_scale: float, prediction_type: str):
    """One image per prompt with a fixed seed, tiled into one PIL grid."""
    handle = eps_scale_hook(pipe.unet, pipe.scheduler, prediction_type, eps_scale)
    try:
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        latents = pipe(prompt=list(prompts), num_inference_steps=steps, height=size, width=size, output_type="latent",
                       generator=torch.Generator(device="cpu").manual_seed(seed)).images
    finally:
        if handle is not None:
            handle.remove()
    return image_grid(decode_images(pipe, latents), cols=math.ceil(math.sqrt(len(prompts))))


def image_grid(images: Sequence[Image.Image], cols: int | None = None) -> Image.Image:
    """Tile equally sized images row-major into one image."""
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, img in enumerate(images):
        grid.paste(img, ((i % cols) * w, (i // cols) * h))
    return grid


@torch.no_grad()
def decode_images(pipe, latents: torch.Tensor) -> list:
    """Latents from a bf16/fp16 UNet -> PIL images through the VAE in its own dtype. The stock pipeline hands
    16-bit latents to an fp32 VAE unconverted (a dtype error), which the training run's sample images would hit."""
    vae = pipe.vae
    latents = latents.to(vae.device, vae.dtype)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        shape = (1, -1, 1, 1)
        latents = latents * torch.tensor(std).view(shape).to(latents) / vae.config.scaling_factor + \
            torch.tensor(mean).view(shape).to(latents)
    else:
        latents = latents / vae.config.scaling_factor
    return pipe.image_processor.postprocess(vae.decode(latents, return_dict=False)[0], output_type="pil")
