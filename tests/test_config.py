"""SATConfig validation, dict and YAML round trips; schedules."""

from __future__ import annotations

import pytest

from satlm import SATConfig, SATConfigError
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
