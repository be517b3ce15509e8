"""A NaN or inf loss or gradient in `satlm train`: stop before the update with the step and the last good
checkpoint named, or (max_skipped_steps) drop exactly that step's update and go on."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_run import Poison, run_overrides, tiny_data, tiny_model_dir  # noqa: F401  (fixtures)

from satlm.errors import NumericalError
from satlm.app.recorder import read_jsonl_records
from satlm.app.train import run_train
from satlm.app.run_config import load_run_config


def _config(model_dir, data, out, **extra):
    return load_run_config(None, run_overrides(model_dir, data, out, **{"max_steps": 6, "save_steps": 2, **extra}))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_loss_stops_before_the_update(tmp_path, tiny_model_dir, tiny_data, value):
    out = tmp_path / "run"
    poison = Poison(loss_steps=[5], value=value)
    # checkpoint-4 is newer, but step 5 (the step trained from it) did not train well: checkpoint-2 is the good one
    with pytest.raises(NumericalError, match=rf"step 5: the training loss is {value}; stopped before applying its "
                       rf"update; the last good checkpoint is {out / 'checkpoint-2'} \(resume with: satlm train "
                       rf".*config.yaml resume={out / 'checkpoint-2'}\); checkpoint-4 is not known good: .*set "
                       rf"max_skipped_steps=N"):
        run_train(_config(tiny_model_dir, tiny_data, out), callbacks=[poison], quiet=True)
    assert poison.finite()  # without the guard AdamW would have written NaN into every weight
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not (out / "final").exists()
    assert [r["step"] for r in read_jsonl_records(out / "metrics.jsonl")] == [1, 2, 3, 4]


def test_non_finite_gradient_stops_too(tmp_path, tiny_model_dir, tiny_data):
    out = tmp_path / "run"
    poison = Poison(grad_steps=[1])
    with pytest.raises(NumericalError, match="step 1: a gradient is not finite; .*no checkpoint was written before it"):
        run_train(_config(tiny_model_dir, tiny_data, out), callbacks=[poison], quiet=True)
    assert poison.finite()


def test_skipped_steps_drop_exactly_their_update(tmp_path, tiny_model_dir, tiny_data, capsys):
    out = tmp_path / "run"
    poison = Poison(loss_steps=[3], grad_steps=[5])
    summary = run_train(_config(tiny_model_dir, tiny_data, out, max_skipped_steps=2), callbacks=[poison], quiet=True)

    assert summary["completed"] and summary["skipped_steps"] == [3, 5] and math.isfinite(summary["eval_loss"])
    for step in (3, 5):  # the weights after a skipped step are those before it (no Adam moment moved them)
        assert all(torch.equal(a, b) for a, b in zip(poison.weights[step - 1], poison.weights[step])), step
    assert not all(torch.equal(a, b) for a, b in zip(poison.weights[3], poison.weights[4]))
    err = capsys.readouterr().err
    assert "step 3: the training loss is nan; its update is skipped (1 of at most 2)" in err
    assert "step 5: a gradient is not finite; its update is skipped (2 of at most 2)" in err
    assert all(math.isfinite(r["loss"]) for r in read_jsonl_records(out / "metrics.jsonl"))


def test_more_non_finite_steps_than_allowed_stop(tmp_path, tiny_model_dir, tiny_data):
    out = tmp_path / "run"
    with pytest.raises(NumericalError, match=r"step 4: the training loss is nan after 1 skipped step\(s\) "
                       r"\(max_skipped_steps=1\); stopped before applying its update; the last good checkpoint is "
                       rf"{out / 'checkpoint-2'}"):
        run_train(_config(tiny_model_dir, tiny_data, out, max_skipped_steps=1), callbacks=[Poison(loss_steps=[2, 4])],
                  quiet=True)
