"""Config values outside their range or of the wrong type, in SATConfig and in run-config overrides: omission rates
outside [0, 1), other numbers out of range, strings where numbers belong, layers that are not indices, nested
trainer_args over a value, an unknown data.truncation. Each is one of satlm's own errors whose message names the
field or key and what is allowed."""

from __future__ import annotations

import pytest

from satlm.app.run_config import load_run_config
from satlm.config import SATConfig, SATConfigError
from satlm.errors import RunConfigError, SATLMError

# -- omission rates outside [0, 1) -------------------------------------------------------------------------
RATE_FIELDS = ("omission_rate", "attn_omission_rate", "mlp_omission_rate")
BAD_RATES = (-0.1, 1.0, 1.5, float("nan"), float("inf"), -float("inf"), "0.3", True, [0.5])


@pytest.mark.parametrize("field", RATE_FIELDS)
@pytest.mark.parametrize("value", BAD_RATES, ids=repr)
def test_bad_rates_in_satconfig_name_the_field_and_range(field, value):
    with pytest.raises(SATConfigError) as e:
        SATConfig(**{field: value})
    assert f"SATConfig.{field}=" in str(e.value) and "must be a number in [0, 1)" in str(e.value)
    assert isinstance(e.value, SATLMError) and isinstance(e.value, ValueError)


@pytest.mark.parametrize("field", RATE_FIELDS)
@pytest.mark.parametrize("text", ["-0.1", "1.0", "1", "1.5", ".nan", ".inf", "-.inf", "1e3"])
def test_bad_rates_in_overrides_name_the_key_and_range(field, text):
    with pytest.raises(SATConfigError) as e:
        load_run_config(None, [f"sat.{field}={text}"])
    assert f"sat.{field}=" in str(e.value) and "[0, 1)" in str(e.value)


@pytest.mark.parametrize("field", RATE_FIELDS)
def test_a_rate_that_is_not_a_number(field):
    with pytest.raises(RunConfigError, match=f"'sat.{field}' expects a number"):
        load_run_config(None, [f"sat.{field}=half"])


# -- other numbers -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, fragment", [
    ("sat.dense_tail=1.0", "sat.dense_tail=1.0 must be a number in [0, 1)"),
    ("sat.dense_tail=-0.1", "sat.dense_tail=-0.1 must be a number in [0, 1)"),
    ("sat.dense_tail=.nan", "sat.dense_tail=nan must be a number in [0, 1)"),
    ("sat.history_decay=1.0", "sat.history_decay=1.0 must be a number in [0, 1)"),
    ("sat.history_exploration=.nan", "sat.history_exploration=nan must be a number >= 0"),
    ("sat.history_exploration=-1", "sat.history_exploration=-1.0 must be a number >= 0"),
    ("sat.rungs=0", "sat.rungs=0 must be an integer >= 1"),
    ("lr=.inf", "'lr' must be a finite number > 0"),
    ("warmup=.nan", "'warmup' must be a finite number >= 0"),
    ("max_grad_norm=.inf", "'max_grad_norm' must be a finite number >= 0"),
])
def test_other_numbers_out_of_range(override, fragment):
    with pytest.raises(SATLMError) as e:
        load_run_config(None, [override])
    assert fragment in str(e.value)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"history_decay": "a"}, "SATConfig.history_decay='a' must be a number in [0, 1)"),
    ({"history_exploration": "a"}, "SATConfig.history_exploration='a' must be a number >= 0"),
    ({"dense_tail": None}, "SATConfig.dense_tail=None must be a number in [0, 1)"),
    ({"schedule": "steps", "steps": [[True, 0.1]]}, "SATConfig.steps[0] until_fraction=True must increase"),
])
def test_satconfig_rejects_non_numbers_with_its_own_error(kwargs, fragment):
    with pytest.raises(SATConfigError) as e:  # never a TypeError from comparing a string with a number
        SATConfig(**kwargs)
    assert fragment in str(e.value)


# -- layers that are not indices ---------------------------------------------------------------------------
@pytest.mark.parametrize("layers, fragment", [
    ([1.5], "must be a list of integer layer indices"),
    (["0"], "must be a list of integer layer indices"),
    ([True], "must be a list of integer layer indices"),
    ("all", "must be a list of integer layer indices"),
    ([], "names no layer"),
    ([1, 0, 1], "repeats 1; list each layer once"),
])
def test_layers_that_are_not_indices(layers, fragment):
    with pytest.raises(SATConfigError) as e:
        SATConfig(layers=layers)
    assert "SATConfig.layers=" in str(e.value) and fragment in str(e.value)


# -- run-config keys ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("items, fragment", [
    (["trainer_args.a=1", "trainer_args.a.b=2"], "trainer_args.a is 1, not a mapping"),
    (["trainer_args=5", "trainer_args.a=1"], "trainer_args is 5, not a mapping"),
    (["trainer_args.=1"], "'trainer_args.' has an empty part"),
])
def test_nested_trainer_args_overrides_over_a_value(items, fragment):
    with pytest.raises(RunConfigError) as e:
        load_run_config(None, items)
    assert fragment in str(e.value)
    assert load_run_config(None, ["trainer_args.fsdp.x=1", "trainer_args.fsdp.y=2"]).trainer_args == {
        "fsdp": {"x": 1, "y": 2}}


def test_truncation_key_is_checked():
    with pytest.raises(RunConfigError, match="'data.truncation' is 'clip'; choose one of truncate, error"):
        load_run_config(None, ["data.truncation=clip"])
    assert load_run_config(None, []).data.truncation == "truncate"
