"""Model loading for SDXL, plus a tiny random SDXL built offline for tests and CPU smoke runs.

The tiny model is a complete diffusers ``StableDiffusionXLPipeline`` directory with the same component classes and
config wiring as SDXL base 1.0 (two CLIP text encoders, ``text_time`` added conditioning, a VAE with an 8x downsampling
factor), so training and sampling code runs through the *same* loading path for ``"tiny"`` as for the real model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from raydiff import hub
from raydiff.compat import diffusers_dtype_kwarg
from raydiff.hub import TINY, TINY_VERSION, default_cache_dir, local_pretrained, model_ref, zeros_for_empty_prompt
from raydiff.tokens import load_tokenizers, tokenize  # models' callers get the one tokenizer path from here too

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MODEL_MAX_LENGTH = 77

# Words the tiny BPE is trained on: enough to give common caption words single tokens; anything else falls back to
# byte-level symbols, which are all in the vocab, so no text ever maps to an unknown token.
_WORDS = """
a an the of on in with and at by to from for is are its his her their this that
photo picture drawing painting illustration render sketch cartoon anime image art style digital oil watercolor
red orange yellow green blue purple pink brown black white gray grey gold silver dark light bright colorful
circle square triangle star heart cross line dot stripe shape round big small large tiny
background foreground center left right top bottom front back side close up view
man woman boy girl person people child face eyes hair smiling head hand holding wearing standing sitting
cat dog bird fish dragon pokemon naruto character monster flower tree grass sky cloud sun moon water sea
house car ball hat shirt jacket sword
high quality detailed simple plain solid cinematic lighting
""".split()


@dataclass
class SDXLComponents:
    """Everything a training step needs. Encoders and VAE are frozen; the UNet is trainable fp32."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection
    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    noise_scheduler: DDPMScheduler


# --------------------------------------------------------------------------------------------- tiny tokenizer


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-to-unicode table: one printable symbol per byte value, in CLIP's vocab order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + len(table) - len(printable))
    return table


def _byte_symbols() -> list[str]:
    return list(_bytes_to_unicode().values())


def _word_symbols(word: str) -> tuple[str, ...]:
    table = _bytes_to_unicode()
    syms = [table[b] for b in word.encode("utf-8")]
    syms[-1] += "</w>"
    return tuple(syms)


def _learn_merges(words: list[str], max_merges: int = 1000) -> list[tuple[str, str]]:
    """Plain BPE on a word list; ties broken lexicographically so the result is deterministic."""
    corpus = Counter(_word_symbols(w) for w in words)
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for syms, n in corpus.items():
            for pair in zip(syms, syms[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        corpus = Counter({_apply_merge(syms, best): n for syms, n in corpus.items()})
    return merges


def _apply_merge(syms: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(syms):
        if i + 1 < len(syms) and (syms[i], syms[i + 1]) == pair:
            out.append(syms[i] + syms[i + 1])
            i += 2
        else:
            out.append(syms[i])
            i += 1
    return tuple(out)


def _write_bpe_files(out_dir: str) -> tuple[str, str]:
    """Write CLIP-layout ``vocab.json`` (bytes, bytes+</w>, merges, BOS, EOS) and ``merges.txt``."""
    merges = _learn_merges(_WORDS)
    tokens = [*_byte_symbols(), *(s + "</w>" for s in _byte_symbols())]
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:
            seen.add(a + b)
            tokens.append(a + b)
    tokens += [BOS, EOS]  # last, like CLIP: EOS has the largest id, so argmax-pooling legacy code also works
    vocab_file, merges_file = os.path.join(out_dir, "vocab.json"), os.path.join(out_dir, "merges.txt")
    with open(vocab_file, "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f, ensure_ascii=False)
    with open(merges_file, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return vocab_file, merges_file


def _sdxl_tokenizer_layout(tok_dir: str, vocab_file: str, merges_file: str) -> None:
    """Rewrite a saved tokenizer dir into SDXL's layout: vocab.json + merges.txt + tokenizer_config.json.

    transformers 5 ``save_pretrained`` writes only ``tokenizer.json``; real SDXL repos ship vocab/merges and no
    tokenizer.json. Matching SDXL makes the tiny model exercise the same tokenizer load path as the real one (and
    keeps it readable by transformers 4, whose slow CLIPTokenizer needs vocab/merges).
    """
    shutil.copy(vocab_file, tok_dir)
    shutil.copy(merges_file, tok_dir)
    tok_json = os.path.join(tok_dir, "tokenizer.json")
    if os.path.exists(tok_json):
        os.remove(tok_json)


# --------------------------------------------------------------------------------------------- tiny networks


def _text_config(tok: CLIPTokenizer, hidden: int, layers: int, projection_dim: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=37,
        projection_dim=projection_dim,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        hidden_act="gelu",
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )


def _tiny_unet(cross_attention_dim: int, pooled_dim: int) -> UNet2DConditionModel:
    time_dim = 8
    return UNet2DConditionModel(
        sample_size=8,  # 64 px images through the 8x VAE
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        attention_head_dim=(2, 4),  # as in SDXL's config this field is really the number of heads
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        norm_num_groups=32,
        cross_attention_dim=cross_attention_dim,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + pooled_dim,  # 6 time ids + pooled text
    )


def _tiny_vae() -> AutoencoderKL:
    # 0.13025 is SDXL's latent scaling factor; for a random VAE it is nominal (latent std is not ~1/0.13025).
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=64,
        scaling_factor=0.13025,
    )


def _sdxl_scheduler() -> EulerDiscreteScheduler:
    """SDXL base 1.0's sampling scheduler settings."""
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        timestep_spacing="leading",
        steps_offset=1,
    )


def build_tiny_sdxl(out_dir: str, seed: int = 0) -> str:
    """Write a complete random-init SDXL pipeline to ``out_dir``; identical weights for identical ``seed``."""
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        vocab_file, merges_file = _write_bpe_files(scratch)
        # SDXL: tokenizer 1 (CLIP-L) pads with EOS, tokenizer 2 (OpenCLIP-bigG) pads with "!".
        tok = CLIPTokenizer(vocab_file, merges_file, pad_token=EOS, model_max_length=MODEL_MAX_LENGTH)
        tok_2 = CLIPTokenizer(vocab_file, merges_file, pad_token="!", model_max_length=MODEL_MAX_LENGTH)
        _tiny_pipeline(tok, tok_2, seed).save_pretrained(out_dir)
        for sub in ("tokenizer", "tokenizer_2"):
            _sdxl_tokenizer_layout(os.path.join(out_dir, sub), vocab_file, merges_file)
    return out_dir


def _tiny_pipeline(tok: CLIPTokenizer, tok_2: CLIPTokenizer, seed: int) -> StableDiffusionXLPipeline:
    # Different widths for the two encoders (as in SDXL: 768 vs 1280) so swapped/concatenated dims are caught.
    hidden_1, hidden_2, pooled_dim = 32, 64, 32
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config(tok, hidden_1, layers=2, projection_dim=pooled_dim))
    torch.manual_seed(seed)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tok_2, hidden_2, layers=3, projection_dim=pooled_dim))
    torch.manual_seed(seed)
    unet = _tiny_unet(cross_attention_dim=hidden_1 + hidden_2, pooled_dim=pooled_dim)
    torch.manual_seed(seed)
    vae = _tiny_vae()
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tok,
        tokenizer_2=tok_2,
        unet=unet,
        scheduler=_sdxl_scheduler(),
        add_watermarker=False,
    )


# --------------------------------------------------------------------------------------------- resolving


def resolve_pretrained(name_or_path: str, cache_dir: str | None = None) -> str:
    """``"tiny"`` -> path of the (built-once) tiny model; hub ids and existing paths are returned unchanged (a name:
    :func:`raydiff.hub.local_pretrained` turns it into this node's local directory)."""
    if name_or_path == TINY:
        return _ensure_tiny(cache_dir or default_cache_dir())
    if os.path.exists(name_or_path) or hub.HUB_ID.match(name_or_path):
        return name_or_path
    raise FileNotFoundError(f"model path {name_or_path!r} does not exist (and is not a hub id 'org/name')")


def _ensure_tiny(cache_dir: str, seed: int = 0) -> str:
    """Build into a private temp dir, then rename into place: racing processes never see a partial model."""
    final = hub.tiny_dir(cache_dir, seed)
    if os.path.isfile(os.path.join(final, "model_index.json")):
        return final
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.tmp-", dir=cache_dir)
    try:
        build_tiny_sdxl(tmp, seed=seed)
        try:
            os.rename(tmp, final)  # atomic; fails if another process already put a (non-empty) dir there
        except OSError:
            if not os.path.isfile(os.path.join(final, "model_index.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# --------------------------------------------------------------------------------------------- loading


def vae_location(vae: str) -> tuple[str, str | None]:
    """A standalone VAE repo has its config at the top; a full pipeline dir keeps it under ``vae/``."""
    if not os.path.isfile(os.path.join(vae, "config.json")) and os.path.isfile(os.path.join(vae, "vae", "config.json")):
        return vae, "vae"
    return vae, None


def _frozen(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    module.requires_grad_(False)
    if module.dtype != dtype:  # no-op casts make diffusers warn about fp32-pinned modules
        module = module.to(dtype=dtype)
    return module.eval()


# A weight variant that is exactly the training precision's cast of the fp32 weights. DeepSpeed bf16/fp16 casts the
# module it is given and builds its fp32 masters from that cast (engine._configure_distributed_model runs before the
# optimizer; ZeRO-1/2, ZeRO-3 and the bf16/fp16 optimizers copy the 16-bit partitions to fp32), so loading that
# variant in that dtype is the same model. fp16 files cast to bf16 are not: ~6 % of weights round differently
# (double rounding) and values below fp16's normal range lose bits; bf16 therefore takes only a "bf16" variant.
_EXACT_VARIANT = {torch.float16: "fp16", torch.bfloat16: "bf16"}


def load_components(
    pretrained: str,
    vae: str | None = None,
    revision: str | None = None,
    variant: str | None = None,
    text_encoder_dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype = torch.float32,
    unet_dtype: torch.dtype = torch.float32,
) -> SDXLComponents:
    """Load the training components of an SDXL checkpoint (hub id, local dir, or ``"tiny"``). A hub id is
    downloaded once per node, only the files loaded here (:mod:`raydiff.hub`).

    ``unet_dtype``: the trainable UNet's dtype. Under DeepSpeed bf16/fp16 pass that dtype: the engine casts the
    module to it and builds its fp32 master weights from the cast copy (every ZeRO stage), so an fp32 load only
    doubles download and host RAM. With it, the repo's ``fp16`` (float16) or ``bf16`` (bfloat16) UNet weights are
    loaded where the repo has them and ``variant`` is unset. fp32 training: keep the default.

    The noise scheduler is a ``DDPMScheduler`` built from the checkpoint's scheduler config (SDXL ships an Euler
    sampler config; the betas/timestep settings carry over, sampler-only keys are ignored).
    """
    prefer = {"unet": _EXACT_VARIANT[unet_dtype]} if unet_dtype in _EXACT_VARIANT else None
    parts = hub.PIPELINE if vae is None else tuple(p for p in hub.PIPELINE if p != "vae")
    path = local_pretrained(pretrained, revision, parts, variant, prefer)  # all of the run's files: one download
    unet_variant = hub.local_part_variant(path, "unet", variant, (prefer or {}).get("unet"))
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=unet_variant,
                                                **diffusers_dtype_kwarg(unet_dtype))
    enc = load_encoders(pretrained, vae, revision, variant, text_encoder_dtype, vae_dtype)
    tokenizer, tokenizer_2 = load_tokenizers(path)
    return SDXLComponents(
        unet=unet.train(),
        vae=enc.vae,
        text_encoder=enc.text_encoder,
        text_encoder_2=enc.text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        noise_scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler"),
    )


@dataclass
class FrozenEncoders:
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection


def load_encoders(
    pretrained: str,
    vae: str | None = None,
    revision: str | None = None,
    variant: str | None = None,
    text_encoder_dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype = torch.float32,
) -> FrozenEncoders:
    """The frozen VAE and both text encoders (eval mode, no grad), e.g. for a precompute actor; from this node's copy
    of their files (:mod:`raydiff.hub`)."""
    path = local_pretrained(pretrained, revision, tuple(p for p in hub.ENCODERS if vae is None or p != "vae"), variant)
    if vae is not None:  # a standalone VAE (e.g. the fp16-fix one): its own repo, so no revision/variant
        vae_path, vae_sub = vae_location(local_pretrained(vae, parts=(hub.STANDALONE_VAE,)))
        vae_model = AutoencoderKL.from_pretrained(vae_path, subfolder=vae_sub, **diffusers_dtype_kwarg(vae_dtype))
    else:
        vae_model = AutoencoderKL.from_pretrained(path, subfolder="vae", variant=variant,
                                                  **diffusers_dtype_kwarg(vae_dtype))
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", variant=variant)
    text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", variant=variant)
    return FrozenEncoders(_frozen(vae_model, vae_dtype), _frozen(text_encoder, text_encoder_dtype),
                          _frozen(text_encoder_2, text_encoder_dtype))


def encode_prompt(
    text_encoder: CLIPTextModel,
    text_encoder_2: CLIPTextModelWithProjection,
    input_ids: torch.Tensor | np.ndarray,
    input_ids_2: torch.Tensor | np.ndarray,
    zero_empty: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL conditioning: (penultimate hidden states of both encoders concatenated ``[B, 77, D1+D2]``,
    encoder 2's projected pooled output ``[B, P]``). Gradients follow the caller's grad mode.

    ``zero_empty``: an empty prompt (a dropped caption) is all zeros, both tensors, as SDXL's pipeline gives an empty
    negative prompt (``force_zeros_for_empty_prompt``): training's unconditional is then what guidance samples with."""
    ids_2 = _as_ids(input_ids_2, text_encoder_2)
    out_1 = text_encoder(_as_ids(input_ids, text_encoder), output_hidden_states=True)
    out_2 = text_encoder_2(ids_2, output_hidden_states=True)
    prompt_embeds = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
    pooled = out_2.text_embeds
    if zero_empty:
        # Right after BOS comes EOS, CLIP's largest token id, only when the prompt is empty.
        keep = (ids_2[:, 1] != ids_2.max(dim=1).values).to(prompt_embeds.dtype)
        prompt_embeds, pooled = prompt_embeds * keep[:, None, None], pooled * keep[:, None]
    return prompt_embeds, pooled


def latent_moments(vae: AutoencoderKL, pixels: torch.Tensor) -> torch.Tensor:
    """The VAE's latent distribution of uint8 ``[B, 3, H, W]`` pixels as its parameters (mean ‖ logvar channels):
    what a latent cache stores, so that training still draws a fresh latent sample each step."""
    x = pixels.to(vae.device, torch.float32) / 127.5 - 1.0
    return vae.encode(x.to(vae.dtype)).latent_dist.parameters


def sample_latents(moments: torch.Tensor, scaling_factor: float, generator: torch.Generator) -> torch.Tensor:
    """A scaled latent sample from stored moments: the same draw as sampling the VAE's own ``latent_dist``."""
    return DiagonalGaussianDistribution(moments).sample(generator=generator).float() * scaling_factor


def _as_ids(ids: torch.Tensor | np.ndarray, model: torch.nn.Module) -> torch.Tensor:
    return torch.as_tensor(ids, dtype=torch.long, device=model.device)


__all__ = [
    "TINY",
    "TINY_VERSION",
    "SDXLComponents",
    "build_tiny_sdxl",
    "default_cache_dir",
    "diffusers_dtype_kwarg",
    "encode_prompt",
    "load_components",
    "latent_moments",
    "load_encoders",
    "sample_latents",
    "load_tokenizers",
    "local_pretrained",
    "model_ref",
    "resolve_pretrained",
    "tokenize",
    "zeros_for_empty_prompt",
]
