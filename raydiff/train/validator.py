"""A worker's validation: the unperturbed loss at fixed timesteps and noise, the exposure bias of a short sampling
chain, rank 0's sample images, and when to run (every `validation.every_n_steps`, at step 0 and at the last step).

The held-out split is encoded once (`Validator.load`); every validation reuses it, so runs with any gamma are scored
on the same loss terms. The maths is raydiff.validation's and raydiff.objective's.
"""

from __future__ import annotations

import functools
import io
import logging
import math
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

from raydiff import models, objective, storage, validation
from raydiff.config import ValidationSection
from raydiff.data import stats
from raydiff.train.step import Conditioning, TrainStep, step_generator

logger = logging.getLogger(__name__)
METRIC_PREFIXES = ("val_loss", "exposure_bias")  # the keys Validator.run adds to a step's metrics


def val_loss_sums(predict: validation.Predict, x0: torch.Tensor, cond, alphas_cumprod: torch.Tensor,
                  prediction_type: str, timesteps: list[int],
                  generator_for: Callable[[int], torch.Generator]) -> torch.Tensor:
    """One batch's unperturbed loss (gamma 0, no offset noise, unweighted) at each of `timesteps`, with the noise of
    `generator_for(t)`: rows of [summed per-sample MSE, samples], float64, for validation.loss_metrics once summed
    over batches (and ranks)."""
    rows = []
    for t in timesteps:
        ts = torch.full((x0.shape[0],), t, dtype=torch.long, device=x0.device)
        noised = objective.make_training_batch(x0, alphas_cumprod, prediction_type, 0.0, generator_for(t),
                                               timesteps=ts)
        losses = objective.mse_per_sample(predict(noised.noisy, ts, cond), noised.target)
        count = torch.tensor(float(losses.numel()), dtype=torch.float64, device=x0.device)
        rows.append(torch.stack([losses.sum().double(), count]))
    return torch.stack(rows)


def rank_share(num_batches: int, rank: int, world: int) -> list[tuple[int, float]]:
    """(batch index, weight) of `rank`'s batches, padded to the same count on every rank: every rank runs as many
    forwards (ZeRO-3 gathers need all ranks). A padding entry has weight 0 (its batch: batch 0)."""
    rounds = math.ceil(num_batches / world)
    return [(i * world + rank, 1.0 if i * world + rank < num_batches else 0.0) for i in range(rounds)]


class Validator:
    """Runs validation through the training step's model (`TrainStep.predict`) on this rank's share of the held-out
    batches; sums across ranks, so every rank returns the same metrics."""

    def __init__(self, v: ValidationSection, max_steps: int, step: TrainStep, comps: models.SDXLComponents,
                 zero_stage: int, run_dir: str, rank: int, world: int):
        self.v, self.max_steps, self.step = v, max_steps, step
        self.comps = comps  # tokenizers and scheduler config for the sample images
        self.zero_stage, self.run_dir = zero_stage, run_dir
        self.rank, self.world = rank, world
        self.num_train_timesteps = comps.noise_scheduler.config.num_train_timesteps
        self.batches: list[Conditioning] = []  # the held-out split, encoded (load)

    @property
    def device(self) -> torch.device:
        return self.step.device

    def due(self, step: int) -> bool:
        return step % self.v.every_n_steps == 0 or step >= self.max_steps

    def load(self, batches: Iterable[dict], stats_actor: str | None) -> None:
        """Encode this worker's held-out batches once (of `validation.batch_size` rows: the loop passes its shard of
        Ray Train's "val" dataset): frozen encoders, fixed generator. `stats_actor`: the run's data counters, for the
        error when the split came out empty."""
        gen = step_generator(self.device, self.v.seed)
        self.batches = [self.step.encode(b, gen) for b in batches]
        if not self.batches:
            raise stats.no_data_error(stats_actor, "validation")

    def run(self, step: int) -> dict:
        """Unperturbed loss at fixed timesteps with fixed noise, overall and per timestep band, plus the exposure bias
        of a short sampling chain: comparable across runs with any gamma. Then rank 0's sample images. Collective:
        every rank runs the same number of forwards (ZeRO-3 gathers need all ranks)."""
        v, s = self.v, self.step
        s.engine.eval()
        sums = torch.zeros(len(v.timesteps), 2, dtype=torch.float64, device=self.device)
        chain_steps = v.exposure_bias_denoising_steps
        moments = torch.zeros(max(chain_steps, 1), 3, dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for index, cond, weight in self.my_batches():
                noise_for = functools.partial(step_generator, self.device, v.seed, index)  # (timestep) -> generator
                batch = val_loss_sums(s.predict, cond.latents, cond, s.alphas_cumprod, s.prediction_type,
                                      v.timesteps, noise_for)
                sums += batch * weight
                if chain_steps:
                    moments += weight * validation.exposure_bias_moments(
                        s.predict, cond.latents, cond, s.alphas_cumprod, s.prediction_type, chain_steps,
                        v.eps_scale, step_generator(self.device, v.seed, index, -1))
        s.engine.train()
        dist.all_reduce(sums)
        metrics = validation.loss_metrics(v.timesteps, sums, self.num_train_timesteps)
        if chain_steps:
            dist.all_reduce(moments)
            metrics["exposure_bias"], _ = validation.exposure_bias(moments, s.alphas_cumprod.cpu())
        self.render_samples(step)
        return metrics

    def my_batches(self) -> Iterator[tuple[int, Conditioning, float]]:
        """(index, batch, weight) of this rank's share (rank_share)."""
        for index, weight in rank_share(len(self.batches), self.rank, self.world):
            yield index, self.batches[index if weight else 0], weight

    def render_samples(self, step: int) -> None:
        """Rank 0 renders validation.prompts into samples/step_XXXXXX.png (and TensorBoard) with a fixed seed."""
        v = self.v
        if not v.prompts or self.rank != 0:
            return
        if self.zero_stage == 3:  # rank 0 alone cannot run a sharded UNet (its forwards gather)
            logger.info("validation images skipped: ZeRO-3 shards the UNet across ranks")
            return
        c, e, unet = self.comps, self.step.encoders, self.step.engine.module
        scheduler = EulerDiscreteScheduler.from_config(c.noise_scheduler.config,
                                                       prediction_type=self.step.prediction_type)
        pipe = StableDiffusionXLPipeline(vae=e.vae, text_encoder=e.text_encoder, text_encoder_2=e.text_encoder_2,
                                         tokenizer=c.tokenizer, tokenizer_2=c.tokenizer_2, unet=unet,
                                         scheduler=scheduler, add_watermarker=False)
        pipe.set_progress_bar_config(disable=True)
        was_training = unet.training
        unet.eval()
        try:
            grid = validation.render_grid(pipe, v.prompts, v.image_denoising_steps, v.seed, v.eps_scale,
                                          self.step.prediction_type)
        finally:
            unet.train(was_training)
        self.save_grid(grid, step)

    def save_grid(self, grid, step: int) -> None:
        buf = io.BytesIO()
        grid.save(buf, format="PNG")
        path = storage.join(self.run_dir, "samples", f"step_{step:06d}.png")
        storage.write_bytes(path, buf.getvalue())  # before the step's report: the controller adds it to TensorBoard
