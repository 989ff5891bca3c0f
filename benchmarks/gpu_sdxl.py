"""raydiff's own training step on one GPU at full SDXL size: images/s per GPU, step time, peak memory, MFU.

The prepared GPU run (one H100/H200, CUDA torch + the project's requirements, no internet; expected 2-5 minutes
including the model build, 4 cells of 13 micro-steps, one engine per variant):

    PYTHONPATH=. python benchmarks/gpu_sdxl.py --batch-size 2 --steps 10 --warmup 3 --json gpu_sdxl.json

(The `eager` cells may not fit an 80 GB GPU at batch 2 without gradient checkpointing: they are then reported as
"out of memory", which is a result; any other failed cell makes the exit status non-zero.)

Without a GPU (CPU, ~30 s):

    PYTHONPATH=. python benchmarks/gpu_sdxl.py --dry-run

What it times is `raydiff.train.step.TrainStep.__call__`, the micro-step `Worker.train_micro_step` runs: the frozen
VAE and both text encoders (unless the batch carries precomputed `latent_moments`, `prompt_embeds` and `pooled`), the
IP objective (the recipe's gamma 0.1), the UNet forward through the DeepSpeed engine, `engine.backward` and
`engine.step()`. The engine, optimizer and LR schedule are built as `Worker.__init__` builds them
(`raydiff.train.speed.apply_speed_settings`, `deepspeed_setup.deepspeed_config` / `build_optimizer` /
`initialize_engine`) from the recipe config `sdxl_pokemon_blip_ip` (bf16, ZeRO-2, fused AdamW, clip 1.0) with one
worker, `train.batch_size=--batch-size`, `train.grad_accum=--grad-accum` and `--set` overrides. The models are SDXL
base 1.0's at full size from their public configs written out below, random init (no download): UNet 2.57 B, VAE
(fp32, as the loop loads it), CLIP ViT-L/14 and OpenCLIP bigG/14 text encoders (bf16), at 1024 x 1024.

Cells: each variant (`--variants`: gradient checkpointing on/off; torch.compile on request) x each input kind
(`--inputs`: `online` = uint8 pixels + token ids through the frozen encoders, `precomputed` = latent moments and
embeddings as `data.precompute: latents` delivers them). Batches are CPU tensors, as the loop receives them, so the
host-to-device copy is in the step. Per cell: `--warmup` micro-steps, then `--steps` timed ones; images/s per GPU,
seconds per micro-step, peak allocated memory (weights, optimizer state and activations of this process), the
losses TrainStep returned. MFU = model FLOPs / time / the bf16 matmul FLOP/s measured at the start of the run
(8192^3 products: what this GPU really sustains). Model FLOPs = the UNet's forward + backward plus, for `online`,
the encoders' forward, counted with `torch.utils.flop_counter.FlopCounterMode` over one TrainStep call on the meta
device (no memory; gradient checkpointing's recompute is not counted, as MFU is defined).

Not in it: data loading and preprocessing (Ray Data), multi-GPU communication (with one process ZeRO-2's reduce-
scatter and all-gather are local), validation, checkpoints, EMA.

`--dry-run` (no GPU): the full-size components built on the meta device (parameter counts against the released
models, one step's FLOPs through TrainStep), then the very same benchmark code end to end at toy size on the CPU:
the tiny SDXL (`raydiff.models.load_components("tiny")`), a real one-process DeepSpeed engine (gloo, bf16, ZeRO-2),
both gradient-checkpointing variants and both input kinds, a few micro-steps each. Its timings mean nothing; it keeps
the wiring from rotting on machines without a GPU (tests/test_gpu_sdxl_dry_run.py).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import logging
import os
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from raydiff import models

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (public), as UNet2DConditionModel keyword arguments.
SDXL_UNET_CONFIG = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    only_cross_attention=False,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=2048,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),  # SDXL's config calls the number of heads this
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 6 time ids x 256 + the 1280-wide pooled text embedding
    resnet_time_scale_shift="default",
    time_embedding_type="positional",
    conv_in_kernel=3,
    conv_out_kernel=3,
)
# SDXL base 1.0's VAE (the recipe's fp16-fix VAE has the same shapes), vae/config.json.
SDXL_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                       block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                       up_block_types=["UpDecoderBlock2D"] * 4, sample_size=1024, scaling_factor=0.13025)
# text_encoder/config.json (CLIP ViT-L/14) and text_encoder_2/config.json (OpenCLIP ViT-bigG/14), as CLIPTextConfig.
_CLIP_COMMON = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1)
CLIP_L_CONFIG = dict(_CLIP_COMMON, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768)
CLIP_BIGG_CONFIG = dict(_CLIP_COMMON, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                        num_attention_heads=20, hidden_act="gelu", projection_dim=1280)
# Parameter counts of the released SDXL base 1.0 components: a wrong block, head or width setting changes them.
SDXL_PARAMS = {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840}
SDXL_UNET_PARAMS = SDXL_PARAMS["unet"]
RESOLUTION = 1024
RECIPE = "sdxl_pokemon_blip_ip"
SEED = 0
CAPTION_TOKENS = 20  # words per synthetic caption (between BOS and EOS)
# name -> train.* overrides (raydiff.train.speed applies them as Worker.__init__ does)
VARIANTS = {"gc": {"gradient_checkpointing": True, "compile": False},
            "eager": {"gradient_checkpointing": False, "compile": False},
            "compile": {"gradient_checkpointing": False, "compile": True},
            "gc+compile": {"gradient_checkpointing": True, "compile": True}}
DEFAULT_VARIANTS = ["gc", "eager"]  # compile adds minutes of compilation per variant: ask for it explicitly
INPUTS = ("precomputed", "online")
DRY_RUN = dict(steps=3, warmup=1)  # toy size: enough to pass the first optimizer step and time a few more
GPU_MATMUL_N, CPU_MATMUL_N = 8192, 512


# ---------------------------------------------------------------------------------------------- the models


@dataclass
class SDXL:
    """What TrainStep takes besides the engine, and a factory of fresh trainable UNets (one per variant)."""

    new_unet: Callable[[], torch.nn.Module]
    encoders: models.FrozenEncoders
    alphas_cumprod: torch.Tensor  # fp32, on the device
    prediction_type: str
    resolution: int
    vocab_size: int


def _frozen(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    if module.dtype != dtype:  # diffusers warns on no-op casts
        module = module.to(dtype=dtype)
    return module.requires_grad_(False).eval()


def build_unet(device: str | torch.device) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    with torch.device(device):  # parameters are created directly there: no CPU init of 2.6 B weights
        return UNet2DConditionModel(**SDXL_UNET_CONFIG)


def build_full(device: str | torch.device, dtype: torch.dtype) -> SDXL:
    """Full-size SDXL base 1.0, random init, in the dtypes Worker.__init__ loads it: text encoders in the training
    precision, VAE and UNet fp32 (the engine casts the UNet's parameters to the training precision)."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from raydiff import models

    torch.manual_seed(SEED)
    with torch.device(device):
        encoders = models.FrozenEncoders(
            _frozen(AutoencoderKL(**SDXL_VAE_CONFIG), torch.float32),
            _frozen(CLIPTextModel(CLIPTextConfig(**CLIP_L_CONFIG)), dtype),
            _frozen(CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG_CONFIG)), dtype))
    # SDXL's scheduler settings (scaled-linear betas 0.00085 -> 0.012, epsilon), as DDPMScheduler reads them.
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", prediction_type="epsilon")

    def new_unet() -> torch.nn.Module:
        torch.manual_seed(SEED)
        return build_unet(device).train()

    return SDXL(new_unet, encoders, scheduler.alphas_cumprod.to(device, torch.float32), "epsilon", RESOLUTION,
                CLIP_L_CONFIG["vocab_size"])


def build_tiny(device: str | torch.device, dtype: torch.dtype) -> SDXL:
    """The tiny SDXL (built offline), loaded as Worker.__init__ loads a model."""
    from raydiff import models

    comps = models.load_components("tiny", text_encoder_dtype=dtype, vae_dtype=torch.float32)
    encoders = models.FrozenEncoders(comps.vae.to(device), comps.text_encoder.to(device),
                                     comps.text_encoder_2.to(device))
    template = comps.unet
    return SDXL(lambda: copy.deepcopy(template).to(device).train(), encoders,
                comps.noise_scheduler.alphas_cumprod.to(device, torch.float32),
                comps.noise_scheduler.config.prediction_type, 8 * template.config.sample_size,
                comps.text_encoder.config.vocab_size)


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------- batches


def online_batch(model: SDXL, batch: int) -> dict:
    """A batch as the data pipeline hands it to the loop: uint8 pixels, token ids of both tokenizers, time ids.
    Captions are BOS, random words, EOS, then each tokenizer's padding (EOS for CLIP-L, "!" = 0 for bigG)."""
    gen = torch.Generator().manual_seed(SEED)
    r, v = model.resolution, model.vocab_size
    bos, eos = v - 2, v - 1  # CLIP's two last ids
    words = torch.randint(0, bos, (batch, CAPTION_TOKENS), generator=gen)
    head = torch.cat([torch.full((batch, 1), bos), words, torch.full((batch, 1), eos)], dim=1)
    pad = 77 - head.shape[1]
    return {"pixels": torch.randint(0, 256, (batch, 3, r, r), generator=gen, dtype=torch.uint8),
            "input_ids": torch.cat([head, torch.full((batch, pad), eos)], dim=1),
            "input_ids_2": torch.cat([head, torch.zeros(batch, pad, dtype=torch.long)], dim=1),
            "time_ids": torch.tensor([[r, r, 0, 0, r, r]] * batch, dtype=torch.float32)}


def precomputed_batch(model: SDXL, online: dict) -> dict:
    """The same rows as `data.precompute: latents` delivers them: fp32 latent moments and text embeddings, encoded
    by the frozen encoders (raydiff.data.precompute.Encoder), on the host."""
    from raydiff import models
    from raydiff.data.columns import LATENT_COLUMN

    e = model.encoders
    with torch.no_grad():
        moments = models.latent_moments(e.vae, online["pixels"])
        embeds, pooled = models.encode_prompt(e.text_encoder, e.text_encoder_2, online["input_ids"],
                                              online["input_ids_2"], zero_empty=True)

    def host(t: torch.Tensor) -> torch.Tensor:
        return t.float() if t.is_meta else t.float().cpu()

    return {LATENT_COLUMN: host(moments), "prompt_embeds": host(embeds), "pooled": host(pooled),
            "time_ids": online["time_ids"]}


def make_batches(model: SDXL, batch: int) -> dict[str, dict]:
    online = online_batch(model, batch)
    return {"online": online, "precomputed": precomputed_batch(model, online)}


# ---------------------------------------------------------------------------------------------- the step


def recipe_config(args, variant: str, use_gpu: bool):
    """The recipe's config with this benchmark's worker count, batch, variant and `--set` overrides."""
    from raydiff.config import load_config

    speed = VARIANTS[variant]
    overrides = ["scaling.num_workers=1", f"scaling.use_gpu={str(use_gpu).lower()}",
                 f"train.batch_size={args.batch_size}", f"train.grad_accum={args.grad_accum}",
                 f"train.gradient_checkpointing={str(speed['gradient_checkpointing']).lower()}",
                 f"train.compile={str(speed['compile']).lower()}", *args.set]
    return load_config(RECIPE, overrides, check=False)  # the recipe's placeholder storage paths do not matter here


def train_step(model: SDXL, engine, cfg, dtype: torch.dtype | None = None):
    """TrainStep with the arguments Worker.__init__ passes; `dtype`: the UNet compute dtype (default: the precision)."""
    from raydiff.train.deepspeed_setup import PRECISION_DTYPES
    from raydiff.train.step import TrainStep

    o = cfg.objective
    return TrainStep(engine, model.encoders, model.alphas_cumprod, o.prediction_type or model.prediction_type, o,
                     o.gamma_decay_steps or cfg.train.max_steps, dtype or PRECISION_DTYPES[cfg.deepspeed.precision],
                     zero_empty_prompt=True)  # SDXL base's force_zeros_for_empty_prompt (models.zeros_for_empty_prompt)


def build_train_step(model: SDXL, cfg):
    """A fresh UNet through the speed settings into a one-process DeepSpeed engine, as Worker.__init__ builds it."""
    from raydiff.train.deepspeed_setup import build_lr_scheduler, build_optimizer, deepspeed_config, initialize_engine
    from raydiff.train.speed import apply_speed_settings

    unet = apply_speed_settings(model.new_unet(), cfg)
    optimizer = build_optimizer(unet.parameters(), cfg)
    engine, _, _, _ = initialize_engine(model=unet, optimizer=optimizer,
                                        lr_scheduler=build_lr_scheduler(optimizer, cfg),
                                        config=deepspeed_config(cfg, 1), dist_init_required=False)
    return train_step(model, engine, cfg)


class _FlopCountingEngine(torch.nn.Module):
    """The engine's interface (forward, backward, step) around a meta-device UNet: what TrainStep computes, counted
    without memory, DeepSpeed or an optimizer (whose elementwise update FlopCounterMode would not count anyway)."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.module = unet

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        pass


def step_flops(meta: SDXL, batches: dict[str, dict], cfg) -> dict[str, dict[str, int]]:
    """Model FLOPs of one TrainStep call per input kind, on the meta device, without gradient checkpointing: the
    total and its parts (UNet forward + backward, text encoders, VAE encoder = the rest). The UNet stays fp32 there
    (FLOPs do not depend on the dtype)."""
    from torch.utils.flop_counter import FlopCounterMode

    engine = _FlopCountingEngine(meta.new_unet())
    step = train_step(meta, engine, cfg, dtype=torch.float32)
    e = meta.encoders
    out = {}
    for kind, batch in batches.items():
        counter = FlopCounterMode(display=False)
        with counter:
            step(batch, 0, torch.Generator().manual_seed(SEED))  # a CPU generator draws meta tensors too
        by_module = {name: sum(counts.values()) for name, counts in counter.get_flop_counts().items()}
        total, unet = counter.get_total_flops(), by_module.get(type(engine).__name__, 0)  # top-level modules by class
        text = sum(by_module.get(type(m).__name__, 0) for m in (e.text_encoder, e.text_encoder_2))
        out[kind] = {"total": total, "unet": unet, "text_encoders": text, "vae": total - unet - text}
    return out


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def profiled(directory: str | None, device: torch.device):
    """torch.profiler around a cell's timed micro-steps when `--profile DIR` is given (its timings then include the
    profiler's overhead), else nothing."""
    if directory is None:
        yield None
        return
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        yield prof


def write_profile(prof, directory: str, name: str, device: torch.device) -> None:
    """The ops that took the time, by device time and by host time (each op's own, then with what it called: the
    second shows which layer type, e.g. aten::convolution, the kernels' time sits under): where a step's seconds go."""
    os.makedirs(directory, exist_ok=True)
    table = prof.key_averages()
    keys = (["self_cuda_time_total"] if device.type == "cuda" else []) + ["self_cpu_time_total", "cpu_time_total"]
    with open(os.path.join(directory, f"{name}.txt"), "w") as f:
        for key in keys:
            f.write(f"# sorted by {key}\n{table.table(sort_by=key, row_limit=40)}\n")


def time_cell(step, batch: dict, args, device: torch.device, flops: int, peak_tflops: float,
              cell_name: str = "cell") -> dict:
    """`--warmup` then `--steps` micro-steps of TrainStep, each with its generator made as Worker.train_micro_step
    makes it; losses are read after the timed loop (no host sync inside it)."""
    from raydiff.train.step import step_generator

    engine, accum = step.engine, args.grad_accum
    first_optimizer_step = engine.global_steps

    def micro_step(i: int) -> torch.Tensor:
        gen = step_generator(device, SEED, i // accum, i % accum, 0)
        loss, _ = step(batch, i // accum, gen)
        return loss

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for i in range(args.warmup):
        micro_step(i)
    synchronize(device)
    warmup_s = time.perf_counter() - t0
    with profiled(args.profile, device) as prof:
        t0 = time.perf_counter()
        losses = [micro_step(i) for i in range(args.warmup, args.warmup + args.steps)]
        synchronize(device)
        seconds = time.perf_counter() - t0
    if prof is not None:
        write_profile(prof, args.profile, cell_name, device)
    achieved = flops * args.steps / seconds / 1e12  # model FLOPs of the micro-steps / their time
    return {"train_step": f"{type(step).__module__}.{type(step).__qualname__}", "steps": args.steps,
            "warmup_steps": args.warmup, "optimizer_steps": engine.global_steps - first_optimizer_step,
            "losses": [round(float(x), 6) for x in torch.stack(losses).float().cpu()],
            "images_per_s_per_gpu": round(args.batch_size * args.steps / seconds, 3),
            "step_s": round(seconds / args.steps, 4), "warmup_s": round(warmup_s, 1),
            "model_tflop_per_step": _sig(flops / 1e12), "model_tflop_per_s": _sig(achieved),
            "mfu": _sig(achieved / peak_tflops, 3),
            "peak_memory_gib": (round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                                if device.type == "cuda" else None)}


def destroy(engine) -> None:
    try:
        engine.destroy()  # removes ZeRO's gradient hooks, which hold the engine's buffers
    except Exception:  # an engine left mid-step by an error: the remaining variants still get measured
        traceback.print_exc()


def release_memory() -> None:
    gc.collect()  # DeepSpeed's engine and optimizer reference each other: only the collector frees them
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def describe(exc: BaseException) -> str:
    """A failed cell is a result (one GPU run must report every variant it can): out of memory, or the error."""
    first = (str(exc).splitlines() or [""])[0]
    if isinstance(exc, torch.cuda.OutOfMemoryError):  # = torch.OutOfMemoryError (torch >= 2.5), also older torch
        return f"out of memory: {first}"
    traceback.print_exception(exc)
    return f"{type(exc).__name__}: {first}"


def engine_facts(engine) -> dict:
    """What the engine really runs, not what was asked for."""
    return {"zero_stage": engine.zero_optimization_stage(), "bf16": engine.bfloat16_enabled(),
            "gradient_checkpointing": engine.module.is_gradient_checkpointing}


def run_variant(model: SDXL, variant: str, args, batches: dict, device, use_gpu: bool, flops: dict,
                peak_tflops: float) -> list:
    """One engine per variant (built as Worker.__init__ builds it), every input kind timed on it. After a failed cell
    the engine's state is undefined, so the variant's later cells are not run."""
    cfg = recipe_config(args, variant, use_gpu)
    rows, step, failure = [], None, None
    heads = [{"variant": variant, "inputs": kind, "batch_size": args.batch_size} for kind in args.inputs]
    try:
        step = build_train_step(model, cfg)
        facts = engine_facts(step.engine)
        for head in heads:
            head.update(facts)
            if failure is not None:
                rows.append({**head, "error": f"not run: {failure}"})
                continue
            try:
                rows.append({**head, **time_cell(step, batches[head["inputs"]], args, device,
                                                 flops[head["inputs"]]["total"], peak_tflops,
                                                 f"{variant}_{head['inputs']}_b{args.batch_size}")})
                print(json.dumps(rows[-1]), flush=True)
            except Exception as exc:
                failure = describe(exc)
                rows.append({**head, "error": failure})
    except Exception as exc:  # the engine did not build
        failure = describe(exc)
        rows = [{**head, "error": failure} for head in heads]
    finally:  # after the except blocks: their tracebacks (which hold the step's tensors) are gone by now
        if step is not None:
            destroy(step.engine)
        step = None
        release_memory()  # before the next variant's engine
    return rows


def matmul_tflops(device: torch.device, n: int, iters: int = 20) -> float:
    """Sustained bf16 dense matmul TFLOP/s of this device (the MFU denominator)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    synchronize(device)
    return 2 * n**3 * iters / (time.perf_counter() - start) / 1e12


def benchmark(build: Callable[[str | torch.device, torch.dtype], SDXL], device: torch.device, args,
              use_gpu: bool, matmul_n: int) -> dict:
    """The whole measurement, GPU or toy: matmul peak, models, batches, model FLOPs, then every variant."""
    from raydiff.train.deepspeed_setup import PRECISION_DTYPES

    cfg = recipe_config(args, args.variants[0], use_gpu)
    dtype = PRECISION_DTYPES[cfg.deepspeed.precision]
    peak = matmul_tflops(device, matmul_n)
    model = build(device, dtype)
    batches = {k: v for k, v in make_batches(model, args.batch_size).items() if k in args.inputs}
    flops = step_flops(build("meta", dtype), batches, cfg)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "deepspeed": _version("deepspeed"), "recipe": RECIPE,
              "precision": cfg.deepspeed.precision, "zero_stage": cfg.deepspeed.zero_stage,
              "resolution": model.resolution, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
              "matmul_bf16_tflop_per_s": _sig(peak),
              "model_tflop_per_step": {k: _tflop(v, 1) for k, v in flops.items()}, "variants": []}
    print(f"bf16 matmul {matmul_n}^3: {peak:.3g} TFLOP/s; model TFLOP per micro-step "
          f"{result['model_tflop_per_step']}", flush=True)
    for variant in args.variants:
        result["variants"] += run_variant(model, variant, args, batches, device, use_gpu, flops, peak)
    return result


def _sig(x: float, digits: int = 4) -> float:
    """Rounded to significant digits: the same fields hold toy (1e-4) and full-size (20) values."""
    return float(f"{x:.{digits}g}")


def _tflop(parts: dict[str, int], per: int) -> dict[str, float]:
    return {k: _sig(v / per / 1e12) for k, v in parts.items()}


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


# ---------------------------------------------------------------------------------------------- the process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(backend: str) -> None:
    """A one-process group (world 1) for DeepSpeed, from the usual env:// variables."""
    import torch.distributed as dist

    for key, value in {"MASTER_ADDR": "127.0.0.1", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
        os.environ.setdefault(key, value)
    if os.environ["WORLD_SIZE"] != "1":
        raise SystemExit(f"gpu_sdxl.py measures one GPU in one process; WORLD_SIZE is {os.environ['WORLD_SIZE']}")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    dist.init_process_group(backend)


def quiet() -> None:
    from raydiff import console

    console.quiet_process()
    console.disable_hf_progress_bars()
    if not console.is_verbose():
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its per-engine INFO start-up lines


def meta_check(batch: int, flops: bool = True) -> dict:
    """Full-size SDXL on the meta device (no memory): parameter counts against the released models, attention
    processors, and (optionally) one TrainStep's model FLOPs per input kind at 1024 x 1024."""
    model = build_full("meta", torch.bfloat16)
    unet = model.new_unet()
    e = model.encoders
    params = {"unet": count_params(unet), "vae": count_params(e.vae), "text_encoder": count_params(e.text_encoder),
              "text_encoder_2": count_params(e.text_encoder_2)}
    out = {"params": params, "params_expected": SDXL_PARAMS, "batch_size": batch,
           "attention_processors": sorted({type(p).__name__ for p in unet.attn_processors.values()})}
    if flops:
        args = argparse.Namespace(batch_size=batch, grad_accum=1, set=[])
        per_kind = step_flops(model, make_batches(model, batch), recipe_config(args, "gc", use_gpu=True))
        out["tflop_per_image"] = {k: _tflop(v, batch) for k, v in per_kind.items()}
    return out


def dry_run(args) -> dict:
    """No GPU: the meta-device check, then the benchmark at toy size on the CPU (gloo, bf16, ZeRO-2)."""
    result = {"full_size_meta": meta_check(args.batch_size, flops=not args.no_flops)}
    toy = argparse.Namespace(**{**vars(args), **DRY_RUN})
    init_process_group("gloo")
    try:
        result["toy"] = benchmark(build_tiny, torch.device("cpu"), toy, use_gpu=False, matmul_n=CPU_MATMUL_N)
    finally:
        import torch.distributed as dist

        dist.destroy_process_group()
    return result


def gpu_run(args) -> dict:
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    init_process_group("nccl")
    try:
        return benchmark(build_full, device, args, use_gpu=True, matmul_n=GPU_MATMUL_N)
    finally:
        import torch.distributed as dist

        dist.destroy_process_group()


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=2, help="images per micro-step (train.batch_size)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step (train.grad_accum)")
    p.add_argument("--steps", type=int, default=10, help="timed micro-steps per cell")
    p.add_argument("--warmup", type=int, default=3, help="untimed micro-steps per cell (compilation happens here)")
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    p.add_argument("--inputs", nargs="+", default=list(INPUTS), choices=INPUTS)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"an override of the {RECIPE} config (repeatable), e.g. deepspeed.zero_stage=3")
    p.add_argument("--dry-run", action="store_true",
                   help=f"no GPU: meta-device check, then the same code at toy size ({DRY_RUN['steps']} steps)")
    p.add_argument("--no-flops", action="store_true", help="--dry-run: skip the full-size meta FLOP count")
    p.add_argument("--json", default=None, help="also write the result here")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="torch.profiler over each cell's timed micro-steps: op tables to DIR/<cell>.txt")
    args = p.parse_args(argv)
    if min(args.batch_size, args.grad_accum, args.steps) < 1 or args.warmup < 0:
        p.error("--batch-size, --grad-accum and --steps must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_sdxl.py needs a CUDA GPU (torch.cuda.is_available() is False); "
                         "use --dry-run on a CPU machine")
    quiet()
    result = dry_run(args) if args.dry_run else gpu_run(args)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    broken = failed_cells(result)
    if broken:  # a cell that does not fit in memory is a result; any other error is a broken benchmark
        raise SystemExit("gpu_sdxl.py: cells failed: " + "; ".join(broken))
    return result


def failed_cells(result: dict) -> list[str]:
    rows = result.get("toy", result).get("variants", [])
    return [f"{r['variant']}/{r['inputs']}: {r['error']}" for r in rows
            if "error" in r and "out of memory" not in r["error"]]


if __name__ == "__main__":
    main()
    sys.exit(0)
