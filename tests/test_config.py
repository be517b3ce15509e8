"""SATConfig: its fields' declarations, the one validator and the rules between fields, dict and YAML round trips;
schedules."""

from __future__ import annotations

import dataclasses

import pytest

from satlm import SATConfig, SATConfigError, apply_sat
from satlm.config import METRICS, check_layers, forward_conflict
from satlm.fields import field_problem, field_specs, read_value
from satlm.schedules import kept_count, scheduled_rates


@pytest.mark.parametrize("field,value,words", [
    ("omission_rate", 1.0, "omission_rate"),
    ("omission_rate", -0.1, "[0, 1)"),
    ("mlp_omission_rate", 1.5, "mlp_omission_rate"),
    ("metric", "l3", "l2, l1, output, random"),
    ("selection", "best", "sample, topk, random"),
    ("source", "future", "current, history"),
    ("schedule", "cosine", "ladder, constant, linear, steps"),
    ("attn_unit", "layer", "head, kv_group"),
    ("rungs", 0, "rungs"),
    ("dense_tail", 1.0, "dense_tail"),
    ("layers", "all", "layers"),
])
def test_invalid_values_name_field_and_allowed_values(field, value, words):
    with pytest.raises(SATConfigError) as e:
        SATConfig(**{field: value})
    assert field in str(e.value) and words in str(e.value)
    assert isinstance(e.value, ValueError)


def test_steps_schedule_validation():
    with pytest.raises(SATConfigError, match="steps"):
        SATConfig(schedule="steps")
    with pytest.raises(SATConfigError, match="increase"):
        SATConfig(schedule="steps", steps=[[0.5, 0.5], [0.4, 0.2]])
    with pytest.raises(SATConfigError, match="exceeds"):
        SATConfig(omission_rate=0.3, schedule="steps", steps=[[0.5, 0.5]])


def test_unknown_key_suggests_closest():
    with pytest.raises(SATConfigError, match="did you mean 'omission_rate'"):
        SATConfig.from_dict({"omision_rate": 0.5})


def test_dict_and_yaml_round_trip():
    cfg = SATConfig(omission_rate=0.6, attn_omission_rate=0.25, metric="output", selection="topk",
                    source="history", schedule="steps", steps=[[0.3, 0.6], [0.8, 0.3]], layers=[1, -1], seed=4)
    assert SATConfig.from_dict(cfg.to_dict()) == cfg
    assert SATConfig.from_yaml(cfg.to_yaml()) == cfg


def test_ladder_schedule():
    cfg = SATConfig(omission_rate=0.6, rungs=3, dense_tail=0.1)
    total = 100
    rates = [scheduled_rates(cfg, t, total)[1] for t in range(total)]
    assert rates[0] == pytest.approx(0.6)
    assert rates[30] == pytest.approx(0.4)  # second of 3 stages in the first 90 steps
    assert rates[60] == pytest.approx(0.2)
    assert rates[89] == pytest.approx(0.2) and rates[90] == 0.0 and rates[99] == 0.0
    assert all(a >= b for a, b in zip(rates, rates[1:]))  # non-increasing


def test_component_rates_and_other_schedules():
    cfg = SATConfig(omission_rate=0.5, attn_omission_rate=0.2, schedule="linear")
    assert scheduled_rates(cfg, 0, 10) == pytest.approx((0.2, 0.5))
    assert scheduled_rates(cfg, 5, 10) == pytest.approx((0.1, 0.25))
    # Heads are kept by default (attn_omission_rate=0); None makes them follow omission_rate.
    assert scheduled_rates(SATConfig(schedule="constant"), 99, 100) == (0.0, 0.5)
    assert scheduled_rates(SATConfig(schedule="constant", attn_omission_rate=None), 99, 100) == (0.5, 0.5)
    steps = SATConfig(omission_rate=0.5, attn_omission_rate=None, mlp_omission_rate=0.8, schedule="steps",
                      steps=[[0.5, 0.5], [0.75, 0.25]])
    assert scheduled_rates(steps, 10, 100) == pytest.approx((0.5, 0.8))
    assert scheduled_rates(steps, 60, 100) == pytest.approx((0.25, 0.4))
    assert scheduled_rates(steps, 80, 100) == (0.0, 0.0)
    # Without the length of training, the schedule stays at its first value.
    assert scheduled_rates(SATConfig(), 1000, None) == (0.0, 0.5)


def test_defaults_are_the_measured_ones():
    """The defaults follow the real-model sweep (BENCHMARKS.md): dense forward, channels only, top-k."""
    cfg = SATConfig()
    assert (cfg.forward, cfg.effective_forward, cfg.selection) == ("auto", "dense", "topk")
    assert (cfg.max_attn_rate, cfg.max_mlp_rate) == (0.0, 0.5)
    assert SATConfig(source="history").effective_forward == "sparse"
    assert SATConfig(forward="sparse").effective_forward == "sparse"
    with pytest.raises(SATConfigError, match="needs source='current'"):
        SATConfig(source="history", forward="dense")


def test_kept_count():
    assert kept_count(8, 0.5) == 4 and kept_count(8, 0.0) == 8 and kept_count(4, 0.99) == 1
    assert kept_count(5, 0.5) == 3  # round half up


def test_steps_without_the_steps_schedule_is_an_error():
    with pytest.raises(SATConfigError, match=r"steps is set but schedule='ladder' ignores it"):
        SATConfig(schedule="ladder", steps=[[0.5, 0.5], [1.0, 0.0]])


# -- one declaration per setting --------------------------------------------------------------------------
def test_every_field_is_declared_with_its_help_and_a_default_its_declaration_allows():
    specs = field_specs(SATConfig)
    assert list(specs) == [f.name for f in dataclasses.fields(SATConfig)]
    for f in dataclasses.fields(SATConfig):
        assert isinstance(f.metadata.get("help"), str) and len(f.metadata["help"]) > 20, f.name
        assert field_problem(specs[f.name], f.default) is None, f.name
    assert specs["metric"].choices == METRICS and specs["omission_rate"].range == "[0, 1)"


def test_the_validator_reads_choices_and_ranges_from_the_declarations():
    """Every declared choice list and range is enforced with a message that names the field and what is allowed."""
    specs = field_specs(SATConfig)
    for name, spec in specs.items():
        if spec.choices is not None:
            with pytest.raises(SATConfigError) as e:
                SATConfig(**{name: "bogus"})
            assert str(e.value) == f"SATConfig.{name}='bogus' is not allowed; choose one of {', '.join(spec.choices)}"
        elif spec.range is not None and float in spec.kinds and not spec.expects:
            high = spec.range.split(",")[1].strip(" )]")
            bad = -1.0 if high == "inf" else float(high) + (0.0 if spec.range.endswith(")") else 0.5)
            with pytest.raises(SATConfigError, match=rf"SATConfig\.{name}={bad!r} must be a number"):
                SATConfig(**{name: bad})


def test_a_config_is_checked_once_on_the_way_from_yaml_to_a_layer(monkeypatch, make_model):
    from satlm.app.run_config import load_run_config

    checked = []
    rules = SATConfig._check_rules
    monkeypatch.setattr(SATConfig, "_check_rules", lambda self: (checked.append(self.omission_rate), rules(self))[1])
    sat = load_run_config(None, ["sat.omission_rate=0.3"]).sat.to_sat_config()
    model = apply_sat(make_model(), sat)
    assert checked.count(0.3) == 1  # the section, once (the self-check's own configs have other rates)
    assert model.sat_runtime.config is sat
    sat.omission_rate = 1.5  # a value changed since: checked again
    with pytest.raises(SATConfigError, match=r"SATConfig.omission_rate=1.5 must be a number in \[0, 1\)"):
        apply_sat(make_model(), sat)


def test_reading_a_value_converts_and_never_judges():
    specs = field_specs(SATConfig)
    assert read_value(specs["omission_rate"], "1e-1") == 0.1 and read_value(specs["rungs"], 4.0) == 4
    assert read_value(specs["omission_rate"], "half") == "half" and read_value(specs["rungs"], 2.5) == 2.5
    assert read_value(specs["attn_omission_rate"], None) is None and read_value(specs["layers"], (0, 1)) == [0, 1]


def test_the_rules_between_fields_are_stated_once():
    assert forward_conflict("auto", "history") is None and forward_conflict("dense", "current") is None
    assert "needs source='current'" in forward_conflict("dense", "history")
    with pytest.raises(SATConfigError) as e:
        SATConfig(source="history", forward="dense")
    assert str(e.value) == "SATConfig." + forward_conflict("dense", "history")


def test_one_layers_check():
    assert check_layers(None) is None and check_layers(None, 3) == [0, 1, 2]
    assert check_layers([2, -3], 4) == [1, 2] and check_layers([1, 0]) == [1, 0]
    for layers, n, words in (([], None, "names no layer"), ([1, 1], None, "repeats 1; list each layer once"),
                             ([5], 2, "layer 5 does not exist (the model has 2 decoder layers: 0..1, or -2..-1 from "
                                      "the end)"),
                             ([1, -1], 2, "names a layer twice: 1 and -1 are the same layer")):
        with pytest.raises(SATConfigError, match=r"^SATConfig\.layers=") as e:
            check_layers(layers, n)
        assert words in str(e.value)
