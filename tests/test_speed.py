"""Speed switches (raydiff/train/speed.py), their config keys and hook, fused AdamW, and no host sync per step.

No Ray and no DeepSpeed engine: the tiny UNet on CPU, a few forwards at most.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from raydiff import config as C
from raydiff import models
from raydiff.train import speed


@pytest.fixture()
def comps(tiny_sdxl):
    return models.load_components(models.TINY)


def cfg_with(*overrides: str) -> C.Config:
    cfg = C.Config()
    for text in overrides:
        C.set_value(cfg, *C.parse_override(text))
    return C.validate(cfg)


def unet_inputs(unet, batch: int = 2):
    g = torch.Generator().manual_seed(0)
    cross = unet.config.cross_attention_dim
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    return dict(sample=torch.randn(batch, 4, 8, 8, generator=g), timestep=torch.tensor([10, 500]),
                encoder_hidden_states=torch.randn(batch, 77, cross, generator=g),
                added_cond_kwargs={"text_embeds": torch.randn(batch, pooled, generator=g),
                                   "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * batch)})


class SdpaCounter:
    """Wraps F.scaled_dot_product_attention (looked up at call time by diffusers' AttnProcessor2_0) and counts."""

    def __init__(self, monkeypatch):
        self.calls, original = 0, F.scaled_dot_product_attention

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(F, "scaled_dot_product_attention", counted)


def test_loaded_unet_runs_every_attention_layer_through_sdpa(comps, monkeypatch):
    unet = comps.unet
    assert speed.uses_sdpa(unet), {type(p).__name__ for p in unet.attn_processors.values()}
    counter = SdpaCounter(monkeypatch)
    with torch.no_grad():
        unet(**unet_inputs(unet))
    assert counter.calls == len(unet.attn_processors) > 0


def test_speed_settings_restore_sdpa_and_eager_opts_out(comps, monkeypatch):
    unet = comps.unet
    unet.set_default_attn_processor()  # diffusers' explicit-softmax AttnProcessor
    assert not speed.uses_sdpa(unet)
    speed.apply_speed_settings(unet, cfg_with())
    assert speed.uses_sdpa(unet)
    speed.apply_speed_settings(unet, cfg_with("train.attention=eager"))
    counter = SdpaCounter(monkeypatch)
    with torch.no_grad():
        unet(**unet_inputs(unet))
    assert counter.calls == 0


def test_sdpa_and_eager_attention_agree(comps):
    unet, inputs = comps.unet, unet_inputs(comps.unet)
    with torch.no_grad():
        sdpa = unet(**inputs).sample
        speed.apply_speed_settings(unet, cfg_with("train.attention=eager"))
        eager = unet(**inputs).sample
    torch.testing.assert_close(sdpa, eager, rtol=1e-4, atol=1e-5)


def test_channels_last_converts_conv_weights_and_keeps_outputs(comps):
    unet, inputs = comps.unet, unet_inputs(comps.unet)
    convs = [p for p in unet.parameters() if p.dim() == 4 and p.shape[-1] > 1 and p.shape[1] > 1]
    assert convs and not any(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    with torch.no_grad():
        before = unet(**inputs).sample
        speed.apply_speed_settings(unet, cfg_with("train.channels_last=true"))
        after = unet(**inputs).sample
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_switch(comps):
    assert not comps.unet.is_gradient_checkpointing
    speed.apply_speed_settings(comps.unet, cfg_with("train.gradient_checkpointing=true"))
    assert comps.unet.is_gradient_checkpointing


def test_compile_is_in_place_and_keeps_parameter_names(comps):
    unet = comps.unet
    names = list(unet.state_dict())
    out = speed.apply_speed_settings(unet, cfg_with("train.compile=true"))
    # The same module (DeepSpeed wraps it, the export reads its .config) with the same checkpoint keys.
    assert out is unet and speed.is_compiled(unet)
    assert list(unet.state_dict()) == names
    assert not speed.is_compiled(speed.apply_speed_settings(models.load_components(models.TINY).unet, cfg_with()))


def test_speed_config_keys_and_validation():
    t = C.Config().train
    assert (t.attention, t.channels_last, t.compile) == ("sdpa", False, False)
    assert cfg_with("train.channels_last=true", "train.compile=true").train.compile is True
    with pytest.raises(C.ConfigError, match="train.attention"):
        cfg_with("train.attention=flash")
    with pytest.raises(C.ConfigError, match="train.compile"):
        cfg_with("train.compile=true", "deepspeed.zero_stage=3")


def test_worker_applies_speed_settings(tiny_sdxl, monkeypatch, tmp_path):
    """The hook in Worker.__init__: the module handed to deepspeed.initialize carries the configured switches, and
    the process runs as many torch threads as the worker holds CPUs."""
    from raydiff.train import loop

    seen = {}

    def fake_initialize(model, optimizer, lr_scheduler, config, dist_init_required):
        seen["model"] = model
        return model, optimizer, None, lr_scheduler

    monkeypatch.setattr(loop, "initialize_engine", fake_initialize)
    monkeypatch.setattr(loop.ray.train, "get_checkpoint", lambda: None)  # a fresh run
    monkeypatch.setattr(loop.Worker, "start_batches", lambda *args: None)  # no data stream: the model is under test
    cfg = cfg_with("train.channels_last=true", "train.attention=eager", "train.gradient_checkpointing=true",
                   "scaling.cpus_per_worker=2")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        # Rank 0 of one, on the CPU: no Ray Train context needed.
        loop.Worker(cfg, str(tmp_path), None, {}, loop.Place(0, 1, torch.device("cpu")))
        assert torch.get_num_threads() == 2  # the worker's CPUs, whatever the process had
    finally:
        torch.set_num_threads(threads)
    unet = seen["model"]
    assert not speed.uses_sdpa(unet) and unet.is_gradient_checkpointing
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("use_gpu, cuda", [(True, True), (False, True), (False, False)])
def test_adamw_is_fused_on_gpu_and_cpu_workers(monkeypatch, use_gpu, cuda):
    """One fused kernel for all tensors, on both devices (the per-tensor loop is ~4x slower for the tiny UNet)."""
    from raydiff.train.deepspeed_setup import build_optimizer

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    cfg = cfg_with(f"scaling.use_gpu={use_gpu}")
    param = torch.nn.Parameter(torch.zeros(3))
    opt = build_optimizer([param], cfg)
    assert opt.defaults["fused"] is True
    param.grad = torch.ones(3)
    opt.step()  # the fused CPU kernel exists
    assert param.detach().lt(0).all()


def test_torch_threads_follow_the_cpus_a_process_holds():
    assert [speed.worker_threads(c) for c in (0.25, 0.5, 1, 1.5, 2, 8)] == [1, 1, 1, 1, 2, 8]


def _no_host_sync(monkeypatch):
    """Every way our step code could copy a tensor value to the host (a GPU sync) raises instead."""
    def refuse(name):
        def method(*args, **kwargs):
            raise AssertionError(f"host sync in the training step: Tensor.{name}")
        return method

    for name in ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, refuse(name))


@pytest.mark.parametrize("schedule, per_sample", [("random_strength", True), ("random_strength", False),
                                                   ("linear_decay", False)])
def test_train_step_makes_no_host_sync(comps, monkeypatch, schedule, per_sample):
    from raydiff.train.step import PlainEngine, TrainStep, step_generator

    cfg = cfg_with(f"objective.gamma_schedule={schedule}", f"objective.gamma_per_sample={per_sample}",
                   "objective.snr_gamma=5.0", "objective.noise_offset=0.05", "train.batch_size=2")
    encoders = models.FrozenEncoders(comps.vae, comps.text_encoder, comps.text_encoder_2)
    engine = PlainEngine(comps.unet, torch.optim.SGD(comps.unet.parameters(), lr=1e-3))
    step = TrainStep(engine, encoders, comps.noise_scheduler.alphas_cumprod.float(), "epsilon", cfg.objective,
                     cfg.train.max_steps, torch.float32, zero_empty_prompt=True)
    ids = torch.from_numpy(models.tokenize((comps.tokenizer, comps.tokenizer_2), ["a red circle", ""])[0])
    batch = {"pixels": torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8), "input_ids": ids,
             "input_ids_2": ids.clone(), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    with monkeypatch.context() as m:
        _no_host_sync(m)
        loss, gamma = step(batch, 3, step_generator(torch.device("cpu"), 0, 3, 0, 0))
    # Read at log time only (step_metrics): a float for metrics.jsonl and Ray reports.
    gamma = float(gamma)
    assert 0.0 <= gamma <= 0.1 and torch.isfinite(loss)
