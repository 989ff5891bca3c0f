"""One real run (local Ray, DeepSpeed ZeRO-2, 1 worker): linear-decay IP, v-prediction, min-SNR, EMA, caption
dropout, validation images; checks the metrics, the sample grids and that the export holds the EMA weights. Its export
first fails at the last step: the relaunch resumes from the last step's checkpoint and only exports."""

import json
import os

import pytest
import torch

from raydiff import config as C
from raydiff.export import EXPORT_INFO
from raydiff.train import driver
from raydiff.train.driver import run_training
from raydiff.train.ema import saved_state_dict
from raydiff.train.metrics_log import read_metrics

pytestmark = pytest.mark.integration


def test_linear_decay_v_prediction_min_snr_ema(ray_local, tmp_path, monkeypatch):
    # Its held-out rows take the path of a large validation split (a materialized dataset through Ray Train's
    # ingest); every other run's few rows go from the driver to the workers as one object.
    monkeypatch.setattr(driver, "IN_DRIVER_VAL_ROWS", 0)
    cfg = C.load_config("tiny_cpu", [
        f"run.storage_path={tmp_path}", "run.name=ip", "train.max_steps=8", "validation.every_n_steps=4",
        "checkpoint.every_n_steps=8", "data.demo_num_images=64", "data.val_fraction=0.15",
        "objective.gamma_schedule=linear_decay", "objective.gamma_decay_steps=6",
        "objective.prediction_type=v_prediction",
        "objective.snr_gamma=5", "objective.noise_offset=0.05", "train.ema_decay=0.9", "data.caption_dropout=0.1",
        "validation.exposure_bias_denoising_steps=4", "validation.prompts=[a red circle, a blue square]",
        "validation.image_denoising_steps=2", "logging.sample_prompts=[]",  # the end-of-run grid: test_run_outputs
        "scaling.num_workers=1"])  # the objective, EMA and images are under test; the resume tests cover 2 workers
    # The export fails at the last step (a file where the model directory goes): the run's last step must already be
    # in a checkpoint, so that the relaunch only exports, and trains nothing again.
    blocker = tmp_path / "ip" / "final"
    blocker.parent.mkdir()
    blocker.write_text("in the way")
    with pytest.raises(Exception, match="final"):
        run_training(cfg)
    checkpoints = sorted(p for p in (tmp_path / "ip").glob("checkpoint_*") if p.is_dir())
    assert json.loads((checkpoints[-1] / "trainer_state.json").read_text())["step"] == 8
    blocker.unlink()
    out = run_training(cfg)
    assert sorted(p for p in (tmp_path / "ip").glob("checkpoint_*") if p.is_dir()) == checkpoints  # nothing retrained
    rows = read_metrics(out.metrics_path)
    assert [r["step"] for r in rows] == list(range(0, 9))
    # Step s was trained with gamma(s - 1) = 0.1 (1 - (s - 1) / 6), 0 from step 7 on; row 0 is the schedule's start.
    expected = [0.1] + [0.1 * max(0.0, 1 - (s - 1) / 6) for s in range(1, 9)]
    assert [r["gamma"] for r in rows] == pytest.approx(expected, abs=1e-12)
    val_rows = [r for r in rows if r.get("val_loss") is not None]
    assert [r["step"] for r in val_rows] == [0, 4, 8]
    bands = ["val_loss_t0_249", "val_loss_t250_499", "val_loss_t500_749", "val_loss_t750_999"]
    for r in val_rows:
        assert r["exposure_bias"] >= 0 and all(r[b] > 0 for b in bands)
        assert r["val_loss"] == pytest.approx(sum(r[b] for b in bands) / 4, rel=1e-6)  # one timestep per band
    assert val_rows[-1]["val_loss"] < val_rows[0]["val_loss"]
    for step in (0, 4, 8):
        assert os.path.getsize(os.path.join(out.run_dir, "samples", f"step_{step:06d}.png")) > 0

    info = json.load(open(os.path.join(out.model_dir, EXPORT_INFO)))
    assert info["ema"] is True and info["prediction_type"] == "v_prediction"
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(os.path.join(out.model_dir, "unet"))
    exported = unet.state_dict()
    ema = saved_state_dict(out.checkpoint_path, {n: p.shape for n, p in unet.named_parameters()})
    for name, tensor in ema.items():
        assert torch.equal(exported[name], tensor), name
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    live = get_fp32_state_dict_from_zero_checkpoint(out.checkpoint_path, tag="deepspeed")
    assert any(not torch.equal(live[n].float(), ema[n]) for n in ema), "EMA must differ from the live weights"
