"""Schedules whose stairs do not cover training: more rungs than steps (a warning naming the stairs that get no
step, and a ladder that still descends), astronomically many rungs, stairs narrower than a step, stairs that end
early (a dense tail, as documented), and bad stairs named in the error."""

from __future__ import annotations

import warnings

import pytest

from satlm.app.run_config import load_run_config
from satlm.config import SATConfigError
from satlm.schedules import scheduled_rates, unreached_stairs


def test_a_ladder_with_more_rungs_than_steps_warns_and_still_descends():
    with pytest.warns(UserWarning, match=r"sat.rungs=8 with max_steps=5: stair\(s\) 3, 5, 7 of 8 get no step"):
        cfg = load_run_config(None, ["max_steps=5", "sat.rungs=8"])
    sat = cfg.sat.to_sat_config()
    # 8 rungs over 4.5 sparse steps: every step takes the next rung it reaches, from the top to the last
    assert [scheduled_rates(sat, t, 5)[1] for t in range(5)] == [0.5, 0.4375, 0.3125, 0.1875, 0.0625]
    assert unreached_stairs(sat, 5) == [2, 4, 6] and unreached_stairs(sat, 100) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_run_config(None, ["max_steps=5", "sat.rungs=8", "sat.enabled=false"])  # dense: nothing to say
        load_run_config(None, ["max_steps=40", "sat.rungs=8"])


def test_a_ladder_with_astronomically_many_rungs_warns_without_listing_them_all():
    """An override like sat.rungs=1.0e+300 is an integer rung count: the warning names the first stairs only
    (listing every one exhausted memory)."""
    with pytest.warns(UserWarning, match=r"stair\(s\) 2, 3, .*, 21, \.\.\. of 1000000000000000052504"):
        load_run_config(None, ["max_steps=3", "sat.rungs=1.0e+300"])


def test_steps_stairs_narrower_than_a_step_warn():
    with pytest.warns(UserWarning, match=r"sat.steps with max_steps=10: stair\(s\) 2 of 3 get no step"):
        load_run_config(None, ["max_steps=10", "sat.schedule=steps", "sat.steps=[[0.05, 0.5], [0.1, 0.4], [1, 0.2]]"])


def test_stairs_that_end_early_leave_a_dense_tail_as_documented():
    sat = load_run_config(None, ["sat.schedule=steps", "sat.steps=[[0.25, 0.5], [0.5, 0.25]]"]).sat.to_sat_config()
    assert [scheduled_rates(sat, t, 8)[1] for t in range(8)] == [0.5, 0.5, 0.25, 0.25, 0, 0, 0, 0]


@pytest.mark.parametrize("steps, fragment", [
    ("[[0.5, 0.5], [1.5, 0.1]]", "until_fraction=1.5 must increase and lie in (0, 1]"),
    ("[[0.5, 0.5], [0.5, 0.1]]", "until_fraction=0.5 must increase"),
    ("[[0.5, 0.6]]", "rate=0.6 exceeds omission_rate=0.5"),
    ("[[0.5, -0.2]]", "steps[0] rate=-0.2 must be a number in [0, 1)"),
    ("[[0.5]]", "steps[0]=[0.5] must be a pair"),
    ("[]", "must be a non-empty list"),
])
def test_bad_stairs_name_the_stair(steps, fragment):
    with pytest.raises(SATConfigError) as e:
        load_run_config(None, ["sat.schedule=steps", f"sat.steps={steps}"])
    assert fragment in str(e.value) and "sat.steps" in str(e.value)
