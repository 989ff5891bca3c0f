"""Config: YAML round trip, --set coercion, and every rejection names its key."""

import dataclasses
import re
import typing
from pathlib import Path

import pytest
import yaml

from raydiff import config as C


def test_default_config_is_tiny_cpu_and_valid():
    cfg = C.load_config()
    assert cfg.model.pretrained == "tiny"
    assert cfg.scaling.use_gpu is False and cfg.deepspeed.zero_stage == 2


def test_yaml_round_trip_preserves_every_field(tmp_path):
    cfg = C.load_config(None, ["objective.gamma=0.15", "validation.timesteps=[10, 20]", "model.vae=some/vae"])
    path = tmp_path / "rt.yaml"
    path.write_text(cfg.to_yaml())
    again = C.load_config(str(path))
    assert again == cfg
    assert again.validation.timesteps == [10, 20] and again.model.vae == "some/vae"


def test_set_coerces_to_field_types():
    cfg = C.load_config(None, ["train.max_steps=7", "optim.lr=3e-5", "scaling.use_gpu=false",
                               "train.gradient_checkpointing=yes", "objective.prediction_type=v_prediction",
                               "model.vae=null"])
    assert cfg.train.max_steps == 7 and isinstance(cfg.train.max_steps, int)
    assert cfg.optim.lr == pytest.approx(3e-5)
    assert cfg.train.gradient_checkpointing is True
    assert cfg.objective.prediction_type == "v_prediction" and cfg.model.vae is None


def test_named_configs_resolve_from_configs_dir():
    for name in ("tiny_cpu", "sdxl_pokemon_blip_ip", "sdxl_pokemon_blip_ip_zero3"):
        path = C.resolve_config_path(name)
        raw = yaml.safe_load(path.read_text())
        C.from_dict(raw)  # every key in the shipped configs is a real key


def test_gpu_recipe_matches_published_ip_settings():
    cfg = C.from_dict(yaml.safe_load(C.resolve_config_path("sdxl_pokemon_blip_ip").read_text()))
    assert cfg.objective.gamma == 0.1 and cfg.deepspeed.precision == "bf16"
    # diffengine: 1 x accumulation 4 on 4 GPUs; here 8 workers fill an 8-GPU node at the same global batch
    assert cfg.train.batch_size * cfg.train.grad_accum * cfg.scaling.num_workers == 16
    assert cfg.optim.lr == 1e-5 and cfg.optim.weight_decay == 1e-2 and cfg.train.grad_clip == 1.0
    assert cfg.data.resolution == 1024 and cfg.scaling.use_gpu and cfg.train.gradient_checkpointing
    assert "fp16-fix" in cfg.model.vae
    z3 = C.from_dict(yaml.safe_load(C.resolve_config_path("sdxl_pokemon_blip_ip_zero3").read_text()))
    assert z3.deepspeed.zero_stage == 3 and cfg.deepspeed.zero_stage == 2


NARUTO_ROWS = 1221  # lambdalabs/naruto-blip-captions, the recipe's stand-in for the taken-down pokemon set


@pytest.mark.parametrize("name", ["sdxl_pokemon_blip_ip", "sdxl_pokemon_blip_ip_zero3"])
def test_recipe_trains_about_50_epochs(name):
    """diffengine's recipe trains 50 epochs; max_steps must say the same at the recipe's global batch."""
    from raydiff.train.summary import epochs_of

    cfg = C.from_dict(yaml.safe_load(C.resolve_config_path(name).read_text()))
    train_rows = NARUTO_ROWS - min(cfg.data.val_max_samples, round(NARUTO_ROWS * cfg.data.val_fraction))
    assert 49 <= epochs_of(cfg, train_rows) <= 52


@pytest.mark.parametrize("name", ["sdxl_pokemon_blip_ip", "sdxl_pokemon_blip_ip_zero3", "tune_gamma_lr"])
def test_placeholder_paths_are_refused_before_ray(monkeypatch, name):
    monkeypatch.setenv("RAYDIFF_STORAGE_PATH", "s3://YOUR-BUCKET/raydiff")
    with pytest.raises(C.ConfigError, match="run.storage_path.*placeholder"):
        C.load_config(name)
    monkeypatch.setenv("RAYDIFF_STORAGE_PATH", "s3://team-bucket/raydiff")
    with pytest.raises(C.ConfigError, match="data.source.*placeholder"):
        C.load_config(name)
    monkeypatch.delenv("RAYDIFF_STORAGE_PATH")
    with pytest.raises(C.ConfigError, match="run.storage_path.*unset environment variable"):
        C.load_config(name)
    cfg = C.load_config(name, ["run.storage_path=s3://team-bucket/raydiff", "data.source=s3://team-bucket/naruto",
                               "data.cache_dir=s3://team-bucket/cache"] if name.startswith("tune") else
                        ["run.storage_path=s3://team-bucket/raydiff", "data.source=s3://team-bucket/naruto"])
    assert cfg.data.source == "s3://team-bucket/naruto"


@pytest.mark.parametrize("override, key", [
    ("deepspeed.zero_stage=5", "deepspeed.zero_stage"),
    ("objective.gamma=-0.1", "objective.gamma"),
    ("train.batch_size=0", "train.batch_size"),
    ("data.source=/no/such/dataset", "data.source"),
    ("deepspeed.precision=fp8", "deepspeed.precision"),
    ("train.max_steps=ten", "train.max_steps"),
    ("scaling.use_gpu=maybe", "scaling.use_gpu"),
    ("deepspeed.precision=fp16", "deepspeed.precision"),  # fp16 on CPU
    ("model.pretrained=/no/such/model", "model.pretrained"),
    ("data.resolution=60", "data.resolution"),
    ("data.precompute=vae", "data.precompute"),
    ("data.cache_dir=/tmp/cache", "data.cache_dir"),  # a cache without data.precompute
    ("data.precompute_num_gpus=1", "data.precompute_num_gpus"),  # GPUs on a CPU run
    ("data.precompute_concurrency=0", "data.precompute_concurrency"),
])
def test_invalid_values_name_the_key(override, key):
    with pytest.raises(C.ConfigError, match=key.replace(".", r"\.")):
        C.load_config(None, [override])


def test_unknown_key_suggests_close_match():
    with pytest.raises(C.ConfigError, match=r"objective\.gama.*did you mean 'gamma'"):
        C.load_config(None, ["objective.gama=0.1"])
    with pytest.raises(C.ConfigError, match=r"unknown config section 'optimizer'.*did you mean 'optim'"):
        C.load_config(None, ["optimizer.lr=1"])


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  max_step: 3\n")
    with pytest.raises(C.ConfigError, match=r"bad\.yaml.*train\.max_step.*did you mean 'max_steps'"):
        C.load_config(str(path))


def test_missing_config_name_and_file():
    with pytest.raises(C.ConfigError, match="tiny_cpuu.*did you mean 'tiny_cpu'"):
        C.resolve_config_path("tiny_cpuu")
    with pytest.raises(C.ConfigError, match="not found"):
        C.resolve_config_path("/nope/x.yaml")


def test_cli_exits_2_with_message_before_ray(capsys, monkeypatch):
    import ray

    from raydiff.train.driver import main

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray must not start when the config is invalid")

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(SystemExit) as exc:
        main(["--set", "deepspeed.zero_stage=5"])
    assert exc.value.code == 2
    assert "deepspeed.zero_stage" in capsys.readouterr().err


def test_run_dir_expands_home_and_keeps_uris():
    cfg = C.load_config(None, ["run.storage_path=~/runs", "run.name=abc"])
    assert C.run_dir(cfg).endswith("/runs/abc") and "~" not in C.run_dir(cfg)
    cfg.run.storage_path = "s3://bucket/prefix"
    assert C.run_dir(cfg) == "s3://bucket/prefix/abc"


def test_logging_section_defaults_and_validation():
    cfg = C.load_config(None)
    assert cfg.logging.tensorboard and cfg.logging.mlflow_uri is None and cfg.logging.sample_prompts
    assert C.load_config(None, ["logging.sample_prompts=[]"]).logging.sample_prompts == []
    for override, key in (("logging.sample_denoising_steps=0", "logging.sample_denoising_steps"),
                          ("logging.mlflow_experiment=", "logging.mlflow_experiment")):
        with pytest.raises(C.ConfigError, match=key):
            C.load_config(None, [override])


# ---------------------------------------------------------------- one source of truth: each field declares itself

REPO = Path(__file__).resolve().parent.parent


def test_every_key_and_section_says_what_it_is():
    for key, f, _ in C.keys():
        assert f.metadata.get("help", "").strip(), f"{key}: no help text (declare it with config.setting)"
    for f in dataclasses.fields(C.Config):
        section = f.default_factory
        # (a dataclass without a docstring gets its signature as one)
        assert section.__doc__ and not section.__doc__.startswith(section.__name__ + "("), f"{f.name}: no docstring"


def _literal_keys():
    return [(key, tp) for key, _, tp in C.keys() if typing.get_origin(C._unwrap_optional(tp)[0]) is typing.Literal]


def test_choices_are_the_literal_types_checked_at_set_and_at_validate():
    assert len(_literal_keys()) >= 12
    for key, tp in _literal_keys():
        for value in C.choices(tp):
            assert C.load_config(None, [f"{key}={value}"], check=False).get(key) == value
        bogus = 7 if isinstance(C.choices(tp)[0], int) else "bogus"
        with pytest.raises(C.ConfigError, match=rf"{re.escape(key)}' must be one of \[.*\], got {bogus!r}"):
            C.load_config(None, [f"{key}={bogus}"], check=False)
    assert C.load_config(None, ["deepspeed.zero_stage=3"]).deepspeed.zero_stage == 3  # "3" -> 3
    cfg = C.load_config()
    cfg.train.attention = "flash"  # set in code, past the coercion: validate still refuses it
    with pytest.raises(C.ConfigError, match=r"train\.attention' must be one of \['sdpa', 'eager'\]"):
        C.validate(cfg)


def test_declared_ranges_are_enforced():
    checked = 0
    for key, f, tp in C.keys():
        for bound, limit in ((b, f.metadata[b]) for b in C.BOUNDS if b in f.metadata):
            cfg = C.load_config()
            outside = {"gt": limit, "ge": limit - 1, "lt": limit, "le": limit + 1}[bound]
            section, name = key.split(".")
            setattr(getattr(cfg, section), name, outside)
            message = rf"'{re.escape(key)}' must be {re.escape(C._range_text(f.metadata))}"
            with pytest.raises(C.ConfigError, match=message):
                C.validate(cfg)
            checked += 1
    assert checked >= 30


def test_tables_keyed_by_a_choice_cover_exactly_its_choices():
    table = {"fp32": 32, "bf16": 16, "fp16": 16}
    assert C.per_choice(C.Precision, table) is table
    with pytest.raises(TypeError, match="fp8"):
        C.per_choice(C.Precision, {**table, "fp8": 8})
    with pytest.raises(TypeError, match="choices"):
        C.per_choice(C.Precision, {"fp32": 32})
    from raydiff.objective import GAMMA_SCHEDULES

    assert GAMMA_SCHEDULES == ("constant", "linear_decay", "random_strength") == C.choices(C.GammaSchedule)


REGENERATE = ("python -c 'import pathlib, raydiff.config as c; p = pathlib.Path(\"README.md\"); "
              "p.write_text(c.with_markdown_table(p.read_text()))'")


def test_readme_key_table_matches_config():
    readme = (REPO / "README.md").read_text()
    want = C.with_markdown_table(readme)
    table = C.markdown_table()
    for key, f, tp in C.keys():  # every key, with its type and default, is in what the README must hold
        assert f"| `{key}` | {C._type_text(tp, f.metadata)} | `{C._value_text(C.Config().get(key))}` |" in table
    if readme != want:
        have, need = set(readme.splitlines()), set(want.splitlines())
        pytest.fail("README.md's config key table disagrees with raydiff/config.py.\n  missing or changed:\n    "
                    + "\n    ".join(sorted(need - have)) + "\n  stale:\n    " + "\n    ".join(sorted(have - need))
                    + f"\nRegenerate it: {REGENERATE}")


def test_readme_table_check_catches_a_drifted_default():
    readme = (REPO / "README.md").read_text()
    row = "| `train.prefetch_batches` | int >= 0 | `2` |"
    drifted = readme.replace(row, row.replace("`2`", "`4`"))
    assert drifted != readme and C.with_markdown_table(drifted) == C.with_markdown_table(readme) != drifted


def test_help_config_prints_every_key_and_exits_0_before_ray(capsys, monkeypatch):
    import ray

    from raydiff.train.driver import main

    def no_ray(*args, **kwargs):
        raise AssertionError("--help-config must not start Ray")

    monkeypatch.setattr(ray, "init", no_ray)
    with pytest.raises(SystemExit) as exc:
        main(["--help-config"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for key, _, _ in C.keys():
        assert f"\n  {key} = " in out
    assert "  deepspeed.precision = fp32  [{fp32, bf16, fp16}]\n" in out
    assert "  train.ema_decay = null  [float in (0, 1) or null]\n" in out
    with pytest.raises(SystemExit) as exc:
        main(["--config", "sdxl_pokemon_blip_ip", "--set", "train.max_steps=7", "--help-config"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    assert "  data.resolution = 64  [int > 0]  (sdxl_pokemon_blip_ip: 1024)\n" in out
    assert "  train.max_steps = 60  [int > 0]  (sdxl_pokemon_blip_ip: 7)\n" in out
    with pytest.raises(SystemExit) as exc:
        main(["--help-config", "--markdown"])
    assert exc.value.code == 0 and capsys.readouterr().out == C.markdown_table() + "\n"


@pytest.mark.parametrize("old, new", [("validation.sample_steps", "validation.exposure_bias_denoising_steps"),
                                      ("validation.image_steps", "validation.image_denoising_steps"),
                                      ("logging.sample_steps", "logging.sample_denoising_steps")])
def test_step_keys_say_what_they_count(old, new):
    with pytest.raises(C.ConfigError, match=re.escape(old)):
        C.load_config(None, [f"{old}=3"])
    assert C.load_config(None, [f"{new}=3"]).get(new) == 3


def test_every_shipped_config_loads():
    for path in sorted(C.CONFIG_DIR.glob("*.yaml")):
        cfg = C.load_config(str(path), check=False)  # the GPU configs' placeholders are refused by validate
        if path.stem.startswith(("tiny", "tune_tiny")):
            C.validate(cfg)
