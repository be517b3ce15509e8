"""Run configs: typed keys, YAML files, dotted overrides, errors that name the key, every shipped config."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from satlm.app.run_config import (LoRASection, RunConfig, SATSection, apply_overrides, config_keys, describe_key,
                                  find_config, key_specs, load_run_config, shipped_configs)
from satlm.config import SATConfig, SATConfigError
from satlm.data.config import DataConfig
from satlm.errors import RunConfigError

REPO = Path(__file__).resolve().parents[1]
TOP_CONFIGS = REPO / "configs"
REQUIRED_KEYS = ("task", "model", "output_dir", "max_steps", "batch_size", "grad_accum", "seq_len", "lr", "seed",
                 "save_steps", "eval_steps", "resume", "sat.enabled", "data.train", "data.eval")


def test_required_keys_and_every_sat_field_are_config_keys():
    keys = set(config_keys())
    assert set(REQUIRED_KEYS) <= keys
    assert {f"sat.{f.name}" for f in dataclasses.fields(SATConfig)} <= keys


def test_the_keys_are_generated_from_the_fields():
    """One declaration per key: the sat: section is SATConfig's fields (in order) plus `enabled`, and every key of the
    loader is a declared field with its help."""
    sat = [k.removeprefix("sat.") for k in config_keys() if k.startswith("sat.")]
    assert sat == [f.name for f in dataclasses.fields(SATConfig)] + ["enabled"]
    assert [f.name for f in dataclasses.fields(SATSection)] == sat
    sections = {"data": DataConfig, "lora": LoRASection}
    for name, section in sections.items():
        assert [k.removeprefix(f"{name}.") for k in config_keys() if k.startswith(f"{name}.")] == \
            [f.name for f in dataclasses.fields(section)]
    top = [f.name for f in dataclasses.fields(RunConfig) if f.name not in ("data", "sat", "lora")]
    assert [k for k in config_keys() if "." not in k] == top
    for key, spec in key_specs().items():
        assert len(spec.help) > 10, key
        assert describe_key(key).startswith(f"{key}: ")
    assert describe_key("sat.omission_rate").splitlines()[0] == "sat.omission_rate: a number in [0, 1); default 0.5"


def test_one_support_check_from_a_config_and_from_a_model(tmp_path):
    """satlm train's check of a model folder (config only) and apply_sat's are one function: the same words."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from satlm import apply_sat
    from satlm.app.model_io import check_supported
    from satlm.modeling.families import UnsupportedModelError

    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, architectures=["GPT2LMHeadModel"])
    config.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError) as from_config:
        check_supported(str(tmp_path))
    with pytest.raises(UnsupportedModelError) as from_model:
        apply_sat(GPT2LMHeadModel(config))
    assert str(from_config.value) == str(from_model.value).replace(" has no satlm layout)",
                                                                    f" has no satlm layout) from {tmp_path}")


@pytest.mark.parametrize("layers", ["[5]", "[1, -1]", "[0, 0]"])
def test_one_layers_check_for_the_run_and_the_model(make_model, tmp_path, layers):
    """The run's check against the model's config (before any weight is loaded) and apply_sat's are one function."""
    import yaml

    from satlm import apply_sat
    from satlm.app.model_io import check_run_fits_model

    model = make_model()  # 2 decoder layers
    model.config.save_pretrained(tmp_path)
    with pytest.raises(SATConfigError) as from_model:
        apply_sat(model, SATConfig(layers=yaml.safe_load(layers)))
    with pytest.raises(SATConfigError) as from_run:
        check_run_fits_model(load_run_config(None, ["seq_len=32", f"sat.layers={layers}"]), str(tmp_path))
    assert str(from_run.value) == str(from_model.value).replace("SATConfig.layers", "sat.layers")


def test_defaults_round_trip_through_yaml():
    cfg = RunConfig().validate()
    again = RunConfig.from_dict(yaml.safe_load(cfg.to_yaml(header="satlm train x.yaml")))
    assert again == cfg
    assert cfg.sat.to_sat_config() == SATConfig(**{f.name: getattr(cfg.sat, f.name)
                                                   for f in dataclasses.fields(SATConfig)})


def test_overrides_are_parsed_as_yaml_and_coerced_to_the_field_type():
    cfg = load_run_config(None, ["lr=1e-3", "max_steps=50", "sat.enabled=false", "sat.omission_rate=0.3",
                                 "sat.layers=[0, -1]", "data.train=corpus/", "data.eval=null", "resume=true",
                                 "warmup=10", "trainer_args.fsdp=full_shard"])
    assert cfg.lr == pytest.approx(1e-3) and isinstance(cfg.lr, float)  # YAML 1.1 reads 1e-3 as a string
    assert cfg.max_steps == 50 and cfg.sat.enabled is False and cfg.sat.omission_rate == 0.3
    assert cfg.sat.layers == [0, -1] and cfg.data.train == "corpus/" and cfg.data.eval is None
    assert cfg.resume is True and cfg.warmup == 10.0 and cfg.trainer_args == {"fsdp": "full_shard"}
    assert load_run_config(None, ["resume=runs/x/checkpoint-8"]).resume == "runs/x/checkpoint-8"
    assert load_run_config(None, ["sat.attn_omission_rate=0.25"]).sat.max_attn_rate == 0.25


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("# satlm train run.yaml\ntask: sft\nmax_steps: 7\nsat:\n  omission_rate: 0.25\n")
    cfg = load_run_config(path, ["max_steps=9"])
    assert (cfg.task, cfg.max_steps, cfg.sat.omission_rate) == ("sft", 9, 0.25)


@pytest.mark.parametrize("override, fragment", [
    ("sat.omision_rate=0.5", "'sat.omision_rate' (did you mean 'sat.omission_rate'?)"),
    ("omission_rate=0.5", "(did you mean 'sat.omission_rate'?)"),
    ("data.trian=x", "(did you mean 'data.train'?)"),
    ("max_step=3", "(did you mean 'max_steps'?)"),
])
def test_unknown_key_names_it_and_suggests_the_closest(override, fragment):
    with pytest.raises(RunConfigError, match="unknown config key") as e:
        load_run_config(None, [override])
    assert fragment in str(e.value)


def test_unknown_key_in_a_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("task: cpt\nsat:\n  omision_rate: 0.5\n")
    with pytest.raises(RunConfigError, match="sat.omision_rate.*did you mean 'sat.omission_rate'"):
        load_run_config(path)


@pytest.mark.parametrize("override, error, fragment", [
    ("max_steps=abc", RunConfigError, "'max_steps' expects an integer"),
    ("batch_size=0", RunConfigError, "'batch_size' must be >= 1"),
    ("lr=0", RunConfigError, "'lr' must be > 0"),
    ("task=pretrain", RunConfigError, "'task' is 'pretrain'"),
    ("sat.enabled=maybe", RunConfigError, "'sat.enabled' expects true or false"),
    ("sat.omission_rate=1.5", SATConfigError, "sat.omission_rate=1.5"),
    ("sat.omission_rate=half", RunConfigError, "config key 'sat.omission_rate' expects a number, got 'half'"),
    ("sat.source=history sat.forward=dense", SATConfigError, "sat.forward='dense' needs source='current'"),
    ("data.format=csv", RunConfigError, "'data.format' is 'csv'; choose one of auto, alpaca, messages"),
    ("lora.r=0", RunConfigError, "config key 'lora.r' must be >= 1 or null (no LoRA), got 0"),
    ("epochs=0", RunConfigError, "config key 'epochs' must be > 0 or null (use max_steps), got 0.0"),
    ("interleaved_pairs=2", RunConfigError, "'interleaved_pairs' must be >= 4 or 0"),
    ("sat.schedule=cosine", SATConfigError, "sat.schedule='cosine'"),
    ("data=x", RunConfigError, "is a section"),
    ("novalue", RunConfigError, "is not key=value"),
])
def test_bad_values_name_the_key(override, error, fragment):
    with pytest.raises(error) as e:
        load_run_config(None, override.split(" "))
    assert fragment in str(e.value)


def test_bad_yaml_and_missing_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("task: [cpt\n")
    with pytest.raises(RunConfigError, match="not valid YAML"):
        load_run_config(path)
    with pytest.raises(RunConfigError, match="not found .*shipped configs: .*demo-cpt"):
        load_run_config(tmp_path / "nope.yaml")


def test_overrides_do_not_touch_the_input():
    raw = {"sat": {"omission_rate": 0.5}}
    apply_overrides(raw, ["sat.omission_rate=0.1"])
    assert raw == {"sat": {"omission_rate": 0.5}}


# -- shipped configs ---------------------------------------------------------------------------------------
def _yaml_files(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in folder.glob("*.y*ml")}


def test_packaged_and_top_level_configs_are_the_same_files():
    packaged, top = shipped_configs(), _yaml_files(TOP_CONFIGS)
    assert {"demo-cpt", "demo-sft", "tinyllama-1.1b-cpt", "llama2-7b-cpt", "llama2-7b-sft"} <= set(packaged)
    assert set(top) == set(packaged)
    for name in packaged:
        assert top[name].read_bytes() == packaged[name].read_bytes(), name


@pytest.mark.parametrize("folder", ["package", "configs"])
def test_every_shipped_config_loads_and_opens_with_its_command(folder):
    from satlm.app.train import check_trainer_args

    files = shipped_configs() if folder == "package" else _yaml_files(TOP_CONFIGS)
    assert files
    for name, path in files.items():
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and "satlm " in first and name in first, (name, first)
        cfg = load_run_config(path)
        check_trainer_args(cfg)
        cfg.sat.to_sat_config().validate()
        if name.startswith("demo"):
            assert cfg.model == "embedded" and cfg.data.train == "embedded"
            assert cfg.sat.source == "current" and cfg.sat.schedule == "ladder" and cfg.sat.omission_rate == 0.5
        elif name.startswith("real"):  # the real model of `satlm fetch`, on the CPU, with the embedded data
            assert cfg.model == "smollm2-135m" and cfg.data.train == "embedded" and cfg.precision == "auto"
            assert cfg.eval_steps and cfg.max_steps // cfg.eval_steps >= 4  # enough evals for time-to-quality
        else:
            assert cfg.model != "embedded" and cfg.precision == "bf16"


def test_shipped_configs_are_found_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # as after `pip install .`, with no configs/ folder around
    for spec in ("demo-cpt", "demo-cpt.yaml", "configs/demo-cpt.yaml"):
        assert find_config(spec) == shipped_configs()["demo-cpt"]
    assert load_run_config("demo-sft").task == "sft"
