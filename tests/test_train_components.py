"""The training loop's components, built directly (no Ray): when each acts (checkpointer, validator, metrics logger),
the validator's fixed, unperturbed loss on the tiny SDXL and its share of batches per rank, and the metrics logger's
rows and progress lines. Saving and restoring through Ray Train are tested by the runs of test_resume.py."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist

from raydiff import config as C
from raydiff import models, validation
from raydiff.train.checkpointer import Checkpointer
from raydiff.train.loop import as_torch
from raydiff.train.deepspeed_setup import build_optimizer
from raydiff.train.metrics_log import read_metrics
from raydiff.train.metrics_logger import MetricsLogger
from raydiff.train.step import PlainEngine, TrainStep, step_generator
from raydiff.train.validator import Validator, rank_share

CPU = torch.device("cpu")


def cfg_with(*overrides: str) -> C.Config:
    cfg = C.Config()
    for text in overrides:
        C.set_value(cfg, *C.parse_override(text))
    return C.validate(cfg)


@pytest.fixture(scope="module")
def comps(tiny_sdxl):
    torch.manual_seed(0)
    return models.load_components("tiny")


@pytest.fixture
def one_rank(tmp_path):
    """A one-process gloo group: the components' collectives run as on a one-worker run."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/group", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def train_step(cfg: C.Config, comps) -> TrainStep:
    engine = PlainEngine(comps.unet, build_optimizer(comps.unet.parameters(), cfg))
    encoders = models.FrozenEncoders(comps.vae, comps.text_encoder, comps.text_encoder_2)
    return TrainStep.build(cfg, engine, encoders, comps.noise_scheduler.alphas_cumprod.float(),
                           comps.noise_scheduler.config.prediction_type)


def val_batches(comps, rows: int, batch_size: int) -> list[dict]:
    """Held-out batches as the validation dataset delivers them: uint8 pixels, token ids, time ids."""
    gen = torch.Generator().manual_seed(5)
    pixels = torch.randint(0, 256, (rows, 3, 64, 64), dtype=torch.uint8, generator=gen)
    ids = [tok(["a red cube"] * rows, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids for tok in (comps.tokenizer, comps.tokenizer_2)]
    time_ids = torch.tensor([[64, 64, 0, 0, 64, 64]] * rows, dtype=torch.float32)
    return [{"pixels": pixels[i:i + batch_size], "input_ids": ids[0][i:i + batch_size],
             "input_ids_2": ids[1][i:i + batch_size], "time_ids": time_ids[i:i + batch_size]}
            for i in range(0, rows, batch_size)]


def test_each_component_acts_on_its_own_cadence_and_all_at_the_last_step(comps):
    cfg = cfg_with("train.max_steps=12", "train.log_every_n_steps=2", "train.report_every_n_steps=5",
                   "checkpoint.every_n_steps=4", "validation.every_n_steps=6")
    checkpointer = Checkpointer(cfg.checkpoint.every_n_steps, cfg.train.max_steps, rank=0, world=1)
    validator = Validator(cfg.validation, cfg.train.max_steps, train_step(cfg, comps), comps, 2, "unused", 0, 1)
    metrics = MetricsLogger(cfg.train, "unused", 0, 1, CPU, None, cfg.objective.gamma)
    steps = range(1, 13)
    saves, vals = [s for s in steps if checkpointer.due(s)], [s for s in steps if validator.due(s)]
    assert saves == [4, 8, 12] and vals == [6, 12] and validator.due(0)
    due = {s: metrics.due(s, must_report=s in saves or s in vals) for s in steps}
    assert [s for s in steps if due[s][1]] == [4, 5, 6, 8, 10, 12]  # reports: its own, and every save/validation
    assert [s for s in steps if due[s][0]] == [2, 4, 5, 6, 8, 10, 12]  # logged: its own, and every report
    assert not checkpointer.resumed


def test_validation_batches_are_split_over_ranks_padded_to_one_count():
    for batches, world in [(4, 3), (2, 4), (6, 2), (1, 1)]:
        shares = [rank_share(batches, rank, world) for rank in range(world)]
        assert len({len(share) for share in shares}) == 1  # as many forwards on every rank
        counted = sorted(index for share in shares for index, weight in share if weight == 1.0)
        assert counted == list(range(batches))  # each batch once, under its own index (its noise)
        assert all(index >= batches for share in shares for index, weight in share if weight == 0.0)


def test_validation_loss_is_fixed_and_unperturbed(comps, one_rank, tmp_path):
    """The same numbers every time and for any gamma (gamma 0 and fixed noise per batch and timestep), equal to the
    plain epsilon loss computed by hand with the (seed, batch, timestep) generators. The engine is left training."""
    results = []
    for gamma in (0.0, 0.5):
        cfg = cfg_with(f"objective.gamma={gamma}", "validation.exposure_bias_denoising_steps=2",
                       "validation.timesteps=[100,600,900]", "validation.batch_size=2")
        step = train_step(cfg, comps)
        validator = Validator(cfg.validation, 10, step, comps, 2, str(tmp_path), 0, 1)
        validator.load(val_batches(comps, 3, cfg.validation.batch_size), None)
        assert len(validator.batches) == 2
        results += [validator.run(1), validator.run(2)]
        assert step.engine.training
    assert all(r == results[0] for r in results) and math.isfinite(results[0]["exposure_bias"])
    v, step = validator.v, validator.step
    assert step.prediction_type == "epsilon"
    sums = torch.zeros(len(v.timesteps), 2, dtype=torch.float64)
    with torch.no_grad():  # by hand: x_t = sqrt(ab) x0 + sqrt(1 - ab) eps with the clean eps as input and target
        for i, cond in enumerate(validator.batches):
            x0 = cond.latents
            for row, t in enumerate(v.timesteps):
                eps = torch.randn(x0.shape, generator=step_generator(CPU, v.seed, i, t))
                ab = step.alphas_cumprod[t]
                ts = torch.full((x0.shape[0],), t, dtype=torch.long)
                pred = step.predict(ab.sqrt() * x0 + (1 - ab).sqrt() * eps, ts, cond).float()
                sums[row] += torch.tensor([(pred - eps).square().mean(dim=(1, 2, 3)).sum().item(), x0.shape[0]])
    assert sums[:, 1].tolist() == [3.0, 3.0, 3.0]  # every held-out sample at every timestep
    expected = validation.loss_metrics(v.timesteps, sums)
    assert {k: results[0][k] for k in expected} == pytest.approx(expected, rel=1e-5)
    with pytest.raises(RuntimeError, match="validation"):
        validator.load([], None)  # an empty held-out split is an error, not a silent nan


def test_metrics_logger_rows_progress_lines_and_resume(one_rank, tmp_path, capsys):
    cfg = cfg_with("train.max_steps=10", "train.batch_size=3", "train.grad_accum=2")
    logger = MetricsLogger(cfg.train, str(tmp_path), 0, 1, CPU, None, 0.1)
    logger.start(0, resumed=False)
    baseline = logger.baseline({"val_loss": 0.5}, 0.05)
    assert list(baseline) == ["step", "epoch", "val_loss", "gamma", "world_size", "global_batch", "time"]
    for loss in (1.0, 2.0, 3.0, 6.0):
        logger.add(torch.tensor(loss), torch.tensor(0.2))
    logger.step_done()
    logger.step_done()
    row = logger.collect(2, 0, 1e-3, refresh_data=True)
    assert list(row) == ["step", "epoch", "loss", "lr", "samples_per_s", "gamma", "world_size", "global_batch", "time",
                         "data_skipped", "data_upscaled", "data_null_captions"]
    assert (row["world_size"], row["global_batch"]) == (1, 6)  # 1 worker x batch 3 x accumulation 2
    assert row["loss"] == 3.0 and row["gamma"] == pytest.approx(0.2) and row["samples_per_s"] > 0
    logger.write({**row, "val_loss": 0.25})
    assert logger.collect(3, 0, 1e-3, refresh_data=False)["loss"] == 0.0  # a new window: nothing added since
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "[raydiff] step 0/10 | val_loss 0.5000 (untrained)"
    assert lines[1].startswith("[raydiff] step 2/10 | loss 3.0000 | val_loss 0.2500 | ")
    assert " samples/s | lr 1.00e-03 | ETA " in lines[1] and lines[1].endswith("s")
    # Progress lines by time (train.progress_every_s): a plain step this soon after a line gets a row, no line; a step
    # with val_loss and the last step always get one.
    logger.progress_every_s = 3600
    for step, extra in ((3, {}), (4, {"val_loss": 0.2}), (10, {})):
        logger.write({**logger.collect(step, 0, 1e-3, refresh_data=False), **extra})
    assert [line.split(" | ")[0] for line in capsys.readouterr().out.splitlines()] == [
        "[raydiff] step 4/10", "[raydiff] step 10/10"]
    path = tmp_path / "metrics.jsonl"
    assert [r["step"] for r in read_metrics(str(path))] == [0, 2, 3, 4, 10]
    resumed = MetricsLogger(cfg.train, str(tmp_path), 0, 1, CPU, None, 0.1)
    resumed.start(0, resumed=True)  # resumed from a step-0 checkpoint: the later rows go
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [0]
    other_rank = MetricsLogger(cfg.train, str(tmp_path), 1, 2, CPU, None, 0.1)
    other_rank.start(0, resumed=False)
    assert other_rank.log is None and path.read_text()  # only rank 0 writes


def test_the_stream_is_read_up_to_the_runs_last_micro_step_and_closed():
    """A worker reads no batch past its last step (a further Ray Data execution would start), then closes the stream
    (its execution ends)."""
    pulled, closed = [], []

    def stream():
        try:
            for i in range(10):
                pulled.append(i)
                yield {"x": np.full((2, 3), i, dtype=np.float32)}, (i, []), 0
        finally:
            closed.append(True)

    got = list(as_torch(stream(), 4))
    assert [int(b["x"][0, 0]) for b, _, _ in got] == [0, 1, 2, 3] and got[0][0]["x"].dtype == torch.float32
    assert pulled == [0, 1, 2, 3] and closed == [True]
