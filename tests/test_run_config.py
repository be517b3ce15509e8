"""Run configs: typed keys, YAML files, dotted overrides, errors that name the key, every shipped config."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from satlm.config import SATConfig, SATConfigError
from satlm.errors import RunConfigError
from satlm.app.run_config import (RunConfig, apply_overrides, config_keys, find_config, load_run_config,
                              shipped_configs)

REPO = Path(__file__).resolve().parents[1]
TOP_CONFIGS = REPO / "configs"
REQUIRED_KEYS = ("task", "model", "output_dir", "max_steps", "batch_size", "grad_accum", "seq_len", "lr", "seed",
                 "save_steps", "eval_steps", "resume", "sat.enabled", "data.train", "data.eval")


def test_issue_keys_and_every_sat_field_are_config_keys():
    keys = set(config_keys())
    assert set(REQUIRED_KEYS) <= keys
    assert {f"sat.{f.name}" for f in dataclasses.fields(SATConfig)} <= keys


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
    ("sat.schedule=cosine", SATConfigError, "sat.schedule='cosine'"),
    ("data=x", RunConfigError, "is a section"),
    ("novalue", RunConfigError, "is not key=value"),
])
def test_bad_values_name_the_key(override, error, fragment):
    with pytest.raises(error) as e:
        load_run_config(None, [override])
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
