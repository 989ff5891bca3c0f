"""One training micro-step of raydiff, as the loop, the benchmarks and the tests run it: the frozen encoders (unless
a precompute stage already encoded the batch), the input-perturbation objective, the UNet through the DeepSpeed engine,
backward and the engine's step (which applies the optimizer at the accumulation boundary).

Everything it needs is passed in; its randomness comes from the generator the caller gives it, so a step is a
function of (weights, batch, step number, generator) and a resumed run redraws the same noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raydiff import models, objective
from raydiff.config import Config, ObjectiveSection
from raydiff.data.columns import LATENT_COLUMN
from raydiff.train.deepspeed_setup import PRECISION_DTYPES


@dataclass
class Conditioning:
    latents: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    time_ids: torch.Tensor


def step_generator(device: torch.device, *keys: int) -> torch.Generator:
    """A generator seeded from (seed, step, micro-step, rank, ...): randomness that needs no state to resume."""
    seed = 0
    for k in keys:
        seed = (seed * 1_000_003 + int(k)) % (2**63 - 1)
    return torch.Generator(device=device).manual_seed(seed)


@dataclass
class TrainStep:
    """`step(batch, step_number, generator) -> (loss, gamma)`: one micro-step's forward, backward and engine step."""

    engine: torch.nn.Module  # the DeepSpeed engine around the UNet (anything with forward/backward/step)
    encoders: models.FrozenEncoders
    alphas_cumprod: torch.Tensor  # fp32, on the device
    prediction_type: str  # epsilon | v_prediction
    objective: ObjectiveSection
    gamma_decay_steps: int  # linear_decay reaches 0 here (objective.gamma_decay_steps or train.max_steps)
    dtype: torch.dtype  # the UNet's compute dtype (bf16/fp16/fp32)
    zero_empty_prompt: bool = True  # a dropped caption conditions on zeros (models.encode_prompt)

    @classmethod
    def build(cls, cfg: Config, engine: torch.nn.Module, encoders: models.FrozenEncoders,
              alphas_cumprod: torch.Tensor, scheduler_prediction_type: str, dtype: torch.dtype | None = None,
              zero_empty_prompt: bool | None = None) -> TrainStep:
        """The step Worker.__init__ builds from the run config, around any engine: benchmarks and tests build it
        without a Ray worker. `dtype` defaults to deepspeed.precision's, `zero_empty_prompt` to the model's
        force_zeros_for_empty_prompt; `scheduler_prediction_type` counts unless objective.prediction_type is set."""
        o = cfg.objective
        if zero_empty_prompt is None:
            zero_empty_prompt = models.zeros_for_empty_prompt(cfg.model.pretrained, cfg.model.revision)
        return cls(engine, encoders, alphas_cumprod, o.prediction_type or scheduler_prediction_type, o,
                   o.gamma_decay_steps or cfg.train.max_steps, dtype or PRECISION_DTYPES[cfg.deepspeed.precision],
                   zero_empty_prompt)

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    def encode(self, batch: dict, generator: torch.Generator) -> Conditioning:
        """Frozen VAE and text encoders, no grad: pixels -> latents, token ids -> SDXL prompt embeddings. Whatever
        a precompute stage already encoded (raydiff.data.precompute) is taken from the batch instead."""
        vae, device = self.encoders.vae, self.device
        with torch.no_grad():
            if LATENT_COLUMN in batch:
                moments = batch[LATENT_COLUMN].to(device, vae.dtype)
            else:
                moments = models.latent_moments(vae, batch["pixels"])
            latents = models.sample_latents(moments, vae.config.scaling_factor, generator)
            if "prompt_embeds" in batch:
                prompt_embeds, pooled = batch["prompt_embeds"].to(device), batch["pooled"].to(device)
            else:
                prompt_embeds, pooled = models.encode_prompt(
                    self.encoders.text_encoder, self.encoders.text_encoder_2, batch["input_ids"].to(device),
                    batch["input_ids_2"].to(device), self.zero_empty_prompt)
        return Conditioning(latents, prompt_embeds, pooled, batch["time_ids"].to(device, torch.float32))

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        # time_ids stay fp32: sizes above 256 are not exact in bf16 (833 -> 832); the UNet embeds them in fp32.
        added = {"text_embeds": cond.pooled.to(self.dtype), "time_ids": cond.time_ids}
        return self.engine(noisy.to(self.dtype), timesteps, encoder_hidden_states=cond.prompt_embeds.to(self.dtype),
                           added_cond_kwargs=added, return_dict=False)[0]

    def gamma(self, step: int, batch_size: int = 1, generator: torch.Generator | None = None):
        o = self.objective
        return objective.gamma_at(o.gamma_schedule, o.gamma, step, self.gamma_decay_steps, batch_size,
                                  o.gamma_per_sample, generator)

    def __call__(self, batch: dict, step: int, generator: torch.Generator) -> tuple[torch.Tensor, float | torch.Tensor]:
        """The detached loss and the gamma used (a tensor under random strength: read it at log time, no sync)."""
        o = self.objective
        cond = self.encode(batch, generator)
        gamma = self.gamma(step, cond.latents.shape[0], generator)
        noised = objective.make_training_batch(cond.latents, self.alphas_cumprod, self.prediction_type, gamma,
                                               generator, noise_offset=o.noise_offset)
        weights = None if o.snr_gamma is None else objective.min_snr_weights(
            noised.timesteps, self.alphas_cumprod, o.snr_gamma, self.prediction_type)
        loss = objective.weighted_loss(self.predict(noised.noisy, noised.timesteps, cond), noised, weights)
        self.engine.backward(loss)
        self.engine.step()
        return loss.detach(), gamma.mean() if isinstance(gamma, torch.Tensor) else gamma


class PlainEngine(torch.nn.Module):
    """The DeepSpeed engine's interface (forward, backward, step) over a plain torch optimizer in one process: the
    same TrainStep without DeepSpeed, for benchmarks that measure what DeepSpeed costs or must stay small. Every
    micro-step is an optimizer step (no accumulation), clipped as DeepSpeed's gradient_clipping clips (0: off)."""

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float = 0.0,
                 lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None):
        super().__init__()
        self.module, self.optimizer, self.grad_clip, self.lr_scheduler = module, optimizer, grad_clip, lr_scheduler

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
