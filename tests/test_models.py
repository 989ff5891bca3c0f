"""Tiny SDXL build, the real loading path, SDXL conditioning and the sampling CLI (CPU, fast)."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load_file

from raydiff import generate as gen
from raydiff import models as m


def _weights_digest(model_dir: str, sub: str = "unet") -> str:
    """sha256 over every tensor of a saved component, in key order."""
    files = [f for f in os.listdir(os.path.join(model_dir, sub)) if f.endswith(".safetensors")]
    state = load_file(os.path.join(model_dir, sub, files[0]))
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].float().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def comps(tiny_sdxl: str) -> m.SDXLComponents:
    return m.load_components(tiny_sdxl)


@pytest.fixture(scope="module")
def pipe(tiny_sdxl: str) -> StableDiffusionXLPipeline:
    return gen.load_pipeline(tiny_sdxl)


# ------------------------------------------------------------------------------------------------ tiny build


def test_tiny_build_is_deterministic(tiny_sdxl: str, tmp_path) -> None:
    same = m.build_tiny_sdxl(str(tmp_path / "same"), seed=0)
    other = m.build_tiny_sdxl(str(tmp_path / "other"), seed=1)
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert _weights_digest(same, sub) == _weights_digest(tiny_sdxl, sub), sub
        assert _weights_digest(other, sub) != _weights_digest(tiny_sdxl, sub), sub
    for sub in ("tokenizer", "tokenizer_2"):
        for name in ("vocab.json", "merges.txt"):
            with open(os.path.join(tiny_sdxl, sub, name), "rb") as f:
                assert (tmp_path / "same" / sub / name).read_bytes() == f.read()


def test_tiny_layout_and_configs_are_sdxl_shaped(tiny_sdxl: str) -> None:
    index = json.load(open(os.path.join(tiny_sdxl, "model_index.json")))
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert sub in index and os.path.isdir(os.path.join(tiny_sdxl, sub)), sub
    # Same tokenizer file layout as the real SDXL repo.
    assert open(os.path.join(tiny_sdxl, "tokenizer", "merges.txt")).readline().startswith("#version: 0.2")
    sched = json.load(open(os.path.join(tiny_sdxl, "scheduler", "scheduler_config.json")))
    assert sched["_class_name"] == "EulerDiscreteScheduler"
    expected = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    prediction_type="epsilon", timestep_spacing="leading", steps_offset=1)
    assert {k: sched[k] for k in expected} == expected
    vae = json.load(open(os.path.join(tiny_sdxl, "vae", "config.json")))
    assert vae["scaling_factor"] == 0.13025 and 2 ** (len(vae["block_out_channels"]) - 1) == 8


# ------------------------------------------------------------------------------------------------ resolving


def test_resolve_tiny_reuses_the_cached_build(tiny_sdxl: str, raydiff_cache: str) -> None:
    stamp = os.stat(os.path.join(tiny_sdxl, "model_index.json")).st_mtime_ns
    assert m.resolve_pretrained(m.TINY) == tiny_sdxl
    assert os.path.basename(tiny_sdxl) == f"tiny-sdxl-v{m.TINY_VERSION}-seed0"
    assert os.stat(os.path.join(tiny_sdxl, "model_index.json")).st_mtime_ns == stamp
    entries = os.listdir(raydiff_cache)  # other tests may have cached demo datasets here too
    assert os.path.basename(tiny_sdxl) in entries
    assert not [e for e in entries if "tiny-sdxl" in e and e != os.path.basename(tiny_sdxl)]  # no temp dirs left


def test_resolve_tiny_race_loser_keeps_the_winner(tmp_path, monkeypatch) -> None:
    """If another process renames its build into place first, ours is discarded and theirs is used."""
    final = tmp_path / f"tiny-sdxl-v{m.TINY_VERSION}-seed0"

    def racing_build(out_dir: str, seed: int = 0) -> str:
        (tmp_path / "mine").mkdir()
        open(os.path.join(out_dir, "model_index.json"), "w").write("mine")
        final.mkdir()  # the other process wins the rename meanwhile
        (final / "model_index.json").write_text("winner")
        return out_dir

    monkeypatch.setattr(m, "build_tiny_sdxl", racing_build)
    assert m.resolve_pretrained(m.TINY, cache_dir=str(tmp_path)) == str(final)
    assert (final / "model_index.json").read_text() == "winner"
    assert sorted(os.listdir(tmp_path)) == sorted([final.name, "mine"])  # our temp dir is cleaned up


def test_resolve_passthrough_and_missing(tmp_path) -> None:
    hub = "stabilityai/stable-diffusion-xl-base-1.0"
    assert m.resolve_pretrained(hub) == hub
    assert m.resolve_pretrained(str(tmp_path)) == str(tmp_path)
    for missing in (str(tmp_path / "nope"), "./nope", "nope"):
        with pytest.raises(FileNotFoundError, match="nope"):
            m.resolve_pretrained(missing)


def test_default_cache_dir_honours_env(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("RAYDIFF_CACHE", str(tmp_path))
    assert m.default_cache_dir() == str(tmp_path)
    monkeypatch.delenv("RAYDIFF_CACHE")
    assert m.default_cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "raydiff")


# ------------------------------------------------------------------------------------------------ tokenizers


def test_tokenizers_round_trip_and_pad_like_sdxl(tiny_sdxl: str) -> None:
    tok, tok_2 = m.load_tokenizers(tiny_sdxl)
    captions = ["a red circle on a blue background", "", "Ünïcödé 😀 猫, naïve!", "word " * 200]
    ids, ids_2 = m.tokenize((tok, tok_2), captions)
    for t, x in ((tok, ids), (tok_2, ids_2)):
        assert x.dtype == np.int64 and x.shape == (len(captions), 77) and t.model_max_length == 77
        assert (x[:, 0] == t.bos_token_id).all()
        assert (x == t.eos_token_id).any(axis=1).all()  # every row (even truncated ones) ends its text with EOS
    assert tok.pad_token == "<|endoftext|>" and tok_2.pad_token == "!"
    assert ids_2[1].tolist() == [tok_2.bos_token_id, tok_2.eos_token_id] + [tok_2.pad_token_id] * 75
    assert ids[1].tolist() == [tok.bos_token_id] + [tok.eos_token_id] * 76
    # Unknown token is EOS for CLIP: unicode text must map to byte-level pieces, never to EOS mid-sentence.
    assert list(ids_2[2]).index(tok_2.eos_token_id) == len(tok_2(captions[2]).input_ids) - 1
    # (Decode with tokenizer 1: tokenizer 2's pad token "!" is special, so skip_special_tokens drops real "!"s too.)
    assert tok.decode(ids[2], skip_special_tokens=True).replace(" ", "") == captions[2].lower().replace(" ", "")
    # Common caption words are single tokens (the built-in merges work).
    assert len(tok("background").input_ids) == 3


# ------------------------------------------------------------------------------------------------ loading


def test_load_components_freezes_encoders_and_vae(comps: m.SDXLComponents) -> None:
    for name in ("vae", "text_encoder", "text_encoder_2"):
        module = getattr(comps, name)
        assert not any(p.requires_grad for p in module.parameters()), name
        assert not module.training, name
    assert all(p.requires_grad for p in comps.unet.parameters()) and comps.unet.training
    assert comps.unet.dtype == torch.float32
    assert type(comps.noise_scheduler) is DDPMScheduler
    cfg = comps.noise_scheduler.config
    assert (cfg.num_train_timesteps, cfg.beta_schedule, cfg.prediction_type) == (1000, "scaled_linear", "epsilon")


def test_load_components_dtypes_and_separate_vae(tiny_sdxl: str) -> None:
    c = m.load_components(tiny_sdxl, vae=os.path.join(tiny_sdxl, "vae"), text_encoder_dtype=torch.bfloat16,
                          vae_dtype=torch.bfloat16)
    assert c.text_encoder.dtype == c.text_encoder_2.dtype == c.vae.dtype == torch.bfloat16
    assert c.unet.dtype == torch.float32
    assert not any(p.requires_grad for p in c.vae.parameters())


def test_encode_prompt_matches_unet_and_stock_pipeline(comps, pipe) -> None:
    captions = ["a red circle", "a green square on a white background"]
    ids, ids_2 = m.tokenize((comps.tokenizer, comps.tokenizer_2), captions)
    with torch.no_grad():
        embeds, pooled = m.encode_prompt(comps.text_encoder, comps.text_encoder_2, ids, ids_2)
    ucfg = comps.unet.config
    assert embeds.shape == (2, 77, ucfg.cross_attention_dim)
    assert pooled.shape == (2, ucfg.projection_class_embeddings_input_dim - 6 * ucfg.addition_time_embed_dim)
    # Training conditioning must equal what the stock SDXL pipeline feeds the UNet at inference.
    ref_embeds, _, ref_pooled, _ = pipe.encode_prompt(captions, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(embeds, ref_embeds)
    torch.testing.assert_close(pooled, ref_pooled)


def test_dropped_caption_conditions_like_the_pipelines_empty_negative_prompt(comps, pipe, tiny_sdxl) -> None:
    """Caption dropout trains the unconditional that classifier-free guidance samples with: SDXL's pipeline gives an
    empty negative prompt as zeros (force_zeros_for_empty_prompt), so a dropped caption encodes to zeros too."""
    ids, ids_2 = m.tokenize((comps.tokenizer, comps.tokenizer_2), ["a red circle", ""])
    with torch.no_grad():
        embeds, pooled = m.encode_prompt(comps.text_encoder, comps.text_encoder_2, ids, ids_2, zero_empty=True)
        plain, _ = m.encode_prompt(comps.text_encoder, comps.text_encoder_2, ids, ids_2)
    _, negative, _, negative_pooled = pipe.encode_prompt("a red circle", device="cpu",
                                                         do_classifier_free_guidance=True)
    assert m.zeros_for_empty_prompt(tiny_sdxl)
    torch.testing.assert_close(embeds[1:], negative)
    torch.testing.assert_close(pooled[1:], negative_pooled)
    torch.testing.assert_close(embeds[:1], plain[:1])  # a real caption is untouched
    assert plain[1].abs().sum() > 0  # without the switch, the empty prompt's own encoding


def test_unet_forward_backward_with_added_cond(comps: m.SDXLComponents) -> None:
    bsz, unet = 4, comps.unet
    ids, ids_2 = m.tokenize((comps.tokenizer, comps.tokenizer_2), ["a photo"] * bsz)
    with torch.no_grad():
        embeds, pooled = m.encode_prompt(comps.text_encoder, comps.text_encoder_2, ids, ids_2)
    latents = torch.randn(bsz, 4, unet.config.sample_size, unet.config.sample_size)
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(bsz, 1)
    out = unet(latents, torch.tensor([1, 250, 500, 999]), encoder_hidden_states=embeds,
               added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    assert out.shape == latents.shape
    out.pow(2).mean().backward()
    assert unet.add_embedding.linear_1.weight.grad is not None  # the text_time path is in the graph
    unet.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------------------ sampling


def test_stock_pipeline_generates_64px(tiny_sdxl: str) -> None:
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


def test_generate_is_seeded(pipe) -> None:
    kw = dict(model_dir="tiny", prompts="a blue star", steps=2, pipe=pipe)
    a, b, c = (np.asarray(gen.generate(seed=s, **kw)[0]) for s in (3, 3, 4))
    assert (a == b).all() and not (a == c).all()


def test_generate_main_writes_png(tiny_sdxl: str, tmp_path, capsys) -> None:
    out = tmp_path / "img.png"
    rc = gen.main(["--model", tiny_sdxl, "--prompt", "a red circle", "--out", str(out), "--steps", "2"])
    assert rc == 0 and Image.open(out).size == (64, 64)
    assert str(out) in capsys.readouterr().out


def test_generate_main_several_images(tiny_sdxl: str, tmp_path) -> None:
    out = tmp_path / "grid.png"
    assert gen.main(["--model", tiny_sdxl, "--prompt", "a", "--prompt", "b", "--num-images", "2", "--out", str(out),
                     "--steps", "1", "--guidance", "1.0"]) == 0
    assert Image.open(out).size == (128, 128)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid-000.png", "grid-001.png", "grid-002.png",
                                                          "grid-003.png", "grid.png"]


def test_generate_main_missing_model(tmp_path, capsys) -> None:
    missing = str(tmp_path / "no-such-model")
    assert gen.main(["--model", missing, "--prompt", "x", "--out", str(tmp_path / "x.png")]) == 2
    assert missing in capsys.readouterr().err
