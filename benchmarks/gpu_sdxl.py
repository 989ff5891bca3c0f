"""Full-size SDXL UNet training step on one GPU: images/s, FLOPs per step, MFU, peak memory.

    PYTHONPATH=. python benchmarks/gpu_sdxl.py --batch-size 2 --steps 10 --warmup 3 --json gpu_sdxl.json
    PYTHONPATH=. python benchmarks/gpu_sdxl.py --dry-run      # CPU: meta-device build, parameter and FLOP count

The UNet is built from SDXL base 1.0's public UNet config (written out below, random init: no download, no
internet) at 1024 x 1024 (latents 4 x 128 x 128), trained with raydiff's IP objective (`raydiff.objective`, gamma
0.1, epsilon target) under bf16 autocast with fp32 master weights and fused AdamW: the arithmetic of a DeepSpeed bf16
step on one GPU, without the VAE and text encoders (their inputs are random tensors of SDXL's shapes).

Variants: eager, + gradient checkpointing, + torch.compile, + both (`--variants`). For each: steady-state images/s
after `--warmup` steps (compilation happens there), peak allocated memory. FLOPs per step come from
`torch.utils.flop_counter.FlopCounterMode` over one eager forward + backward without checkpointing (model FLOPs; the
recompute of checkpointing is not counted, as MFU is defined). MFU = achieved FLOP/s / the bf16 matmul FLOP/s
measured at the start of the same run (8192^3 products), so it is relative to what this GPU really sustains.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time

import torch

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
SDXL_UNET_PARAMS = 2_567_463_684  # parameter count of the released SDXL base 1.0 UNet
TEXT_TOKENS, TEXT_DIM, POOLED_DIM = 77, 2048, 1280
GAMMA = 0.1
VARIANTS = {"eager": (False, False), "gc": (True, False), "compile": (False, True), "gc+compile": (True, True)}


def build_unet(device: str | torch.device):
    from diffusers import UNet2DConditionModel

    with torch.device(device):  # parameters are created directly there: no CPU init of 2.6 B weights
        return UNet2DConditionModel(**SDXL_UNET_CONFIG)


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def random_inputs(batch: int, device, generator: torch.Generator | None = None) -> dict:
    kw = dict(device=device, generator=generator)
    return dict(latents=torch.randn(batch, 4, 128, 128, **kw),
                prompt_embeds=torch.randn(batch, TEXT_TOKENS, TEXT_DIM, **kw),
                pooled=torch.randn(batch, POOLED_DIM, **kw),
                time_ids=torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * batch, device=device))


def loss_fn(unet, x: dict, alphas_cumprod: torch.Tensor, generator: torch.Generator | None):
    """raydiff's IP loss on one batch (what Worker.train_micro_step computes after encoding)."""
    from raydiff import objective

    noised = objective.make_training_batch(x["latents"], alphas_cumprod, "epsilon", GAMMA, generator)
    pred = unet(noised.noisy, noised.timesteps, encoder_hidden_states=x["prompt_embeds"],
                added_cond_kwargs={"text_embeds": x["pooled"], "time_ids": x["time_ids"]}, return_dict=False)[0]
    return objective.weighted_loss(pred, noised)


def sdxl_alphas_cumprod(device) -> torch.Tensor:
    """SDXL's scaled-linear beta schedule (0.00085 -> 0.012 over 1000 steps)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float().to(device)


def step_flops(unet, batch: int, device, dtype: torch.dtype | None) -> int:
    """FLOPs of one forward + backward (FlopCounterMode counts matmuls, convolutions and attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = random_inputs(batch, device)
    counter = FlopCounterMode(display=False)
    amp = torch.autocast("cuda", dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with counter, amp:
        loss_fn(unet, x, sdxl_alphas_cumprod(device), None).backward()
    unet.zero_grad(set_to_none=True)
    return counter.get_total_flops()


# SDXL base 1.0's VAE (the fp16-fix VAE has the same shapes): what a latent cache saves per image and step.
SDXL_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                       block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                       up_block_types=["UpDecoderBlock2D"] * 4, sample_size=1024)


def vae_encode_flops(resolution: int = 1024) -> int:
    """FLOPs of the SDXL VAE encoder's forward on one image, counted on the meta device."""
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        vae = AutoencoderKL(**SDXL_VAE_CONFIG)
        counter = FlopCounterMode(display=False)
        with counter:
            vae.encode(torch.zeros(1, 3, resolution, resolution))
    return counter.get_total_flops()


def dry_run(batch: int, flops: bool = True) -> dict:
    """CPU-only: build the UNet on the meta device (no memory), count parameters and (optionally) one step's FLOPs."""
    unet = build_unet("meta")
    out = {"params": count_params(unet), "params_expected": SDXL_UNET_PARAMS, "batch_size": batch,
           "attention_processors": sorted({type(p).__name__ for p in unet.attn_processors.values()})}
    if flops:
        total = step_flops(unet, batch, "meta", None)
        out.update(tflop_per_step=round(total / 1e12, 2), tflop_per_image=round(total / batch / 1e12, 3),
                   vae_encode_tflop_per_image=round(vae_encode_flops() / 1e12, 2))
    return out


def matmul_tflops(n: int = 8192, iters: int = 20) -> float:
    """Sustained bf16 dense matmul TFLOP/s of this GPU (the MFU denominator)."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - start) / 1e12


def run_variant(name: str, args, model_flops: int, peak_tflops: float) -> dict:
    checkpointing, compiled = VARIANTS[name]
    torch.manual_seed(0)
    unet = build_unet("cuda").train()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    if compiled:
        unet.compile()  # in place, as raydiff.train.speed does
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5, fused=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    x, ac = random_inputs(args.batch_size, "cuda", gen), sdxl_alphas_cumprod("cuda")
    torch.cuda.reset_peak_memory_stats()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(unet, x, ac, gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    achieved = model_flops * args.steps / seconds / 1e12
    out = {"variant": name, "batch_size": args.batch_size, "images_per_s": round(args.batch_size * args.steps / seconds, 3),
           "step_s": round(seconds / args.steps, 4), "warmup_s": round(warmup_s, 1),
           "model_tflop_per_s": round(achieved, 1), "mfu_vs_measured_matmul": round(achieved / peak_tflops, 3),
           "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    del unet, opt, x
    gc.collect()
    torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=2, help="images per step (the reference recipe: 2 per GPU)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--dry-run", action="store_true", help="no GPU: meta-device build, parameter and FLOP count")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    if args.dry_run:
        result = dry_run(args.batch_size)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_sdxl.py needs a CUDA GPU (torch.cuda.is_available() is False); "
                             "use --dry-run on a CPU machine")
        torch.backends.cuda.matmul.allow_tf32 = True
        peak = matmul_tflops()
        print(f"bf16 matmul 8192^3: {peak:.0f} TFLOP/s", flush=True)
        unet = build_unet("cuda")
        n = count_params(unet)
        flops = step_flops(unet, args.batch_size, "cuda", torch.bfloat16)
        del unet
        gc.collect()
        torch.cuda.empty_cache()
        print(f"UNet {n / 1e9:.3f} B parameters; {flops / 1e12:.1f} TFLOP per step at batch {args.batch_size}",
              flush=True)
        result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "params": n,
                  "matmul_bf16_tflop_per_s": round(peak, 1), "tflop_per_step": round(flops / 1e12, 2),
                  "variants": []}
        for name in args.variants:
            try:
                row = run_variant(name, args, flops, peak)
            except torch.cuda.OutOfMemoryError as exc:  # a variant that does not fit is a result, not a crash
                row = {"variant": name, "error": f"out of memory: {str(exc).splitlines()[0]}"}
                gc.collect()
                torch.cuda.empty_cache()
            result["variants"].append(row)
            print(json.dumps(row), flush=True)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
