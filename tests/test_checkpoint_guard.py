"""Checkpoints and what the run logs: a "last good" checkpoint that is good, skipped steps logged as
skipped and never rotating the good one out, short runs that end cleanly, final/ written atomically, a full
disk said in one line, checkpoints that do not load said in one line, and a resumed run that logs what the
uninterrupted one logs."""

from __future__ import annotations

import json
import math
import os
import signal
from collections import namedtuple

import pytest
import torch
from tiny_run import (Poison, StopAt, run_overrides, start_train, tiny_data, tiny_model_dir,  # noqa: F401 (fixtures)
                      wait_for)

from satlm.cli import main as cli_main
from satlm.errors import CheckpointError, NumericalError, RunConfigError
from satlm.app import guard, rundir
from satlm.app.guard import GOOD_NAME, FaultGuard, checkpoints, is_good
from satlm.app.recorder import read_jsonl_records
from satlm.app.train import run_train
from satlm.app.run_config import load_run_config


def _config(model_dir, data, out, **extra):
    return load_run_config(None, run_overrides(model_dir, data, out, **extra))


def _names(out):
    return [p.name for p in checkpoints(out)]


# -- a last good checkpoint that is good -------------------------------------------------------------------
def test_lr_1e9_names_no_checkpoint_as_good(tmp_path, tiny_model_dir, tiny_data):
    """The update of step 1 wrecks the weights (~1e9), so checkpoint-1 is not good, though
    its own step trained finitely: every resume from it NaNs again."""
    out = tmp_path / "run"
    with pytest.raises(NumericalError) as e:
        run_train(_config(tiny_model_dir, tiny_data, out, lr=1e9, save_steps=1), quiet=True)
    message = str(e.value)
    assert message.startswith("step 2: the training loss is nan; stopped before applying its update; no checkpoint "
                              "is known good (checkpoint-1 is not known good: the step after it did not train"), message
    assert "the last good checkpoint" not in message and "train again from the start, with a lower lr" in message
    assert _names(out) == ["checkpoint-1"] and not is_good(out / "checkpoint-1")


def test_a_checkpoint_is_good_once_the_step_after_it_trained_well(tmp_path, tiny_model_dir, tiny_data):
    out = tmp_path / "run"
    run_train(_config(tiny_model_dir, tiny_data, out, save_steps=2, save_total_limit="null"), quiet=True)
    assert _names(out) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert [is_good(out / n) for n in _names(out)] == [True, True, False]  # no step trained from the last one
    assert json.loads((out / "checkpoint-2" / GOOD_NAME).read_text())["checked_by_step"] == 3


def test_a_loss_that_explodes_but_stays_finite_is_not_good(tmp_path, tiny_model_dir, tiny_data):
    out = tmp_path / "run"
    poison = Poison(loss_steps=[5], value=100.0)  # 100x the loss: finite, and far above 4x the recent median
    summary = run_train(_config(tiny_model_dir, tiny_data, out, save_steps=2, save_total_limit="null"),
                        callbacks=[poison], quiet=True)
    assert summary["completed"]  # an explosion does not stop the run; it only keeps checkpoint-4 from being good
    assert [is_good(out / n) for n in _names(out)] == [True, False, False]


def test_the_explosion_rule():
    g = FaultGuard("unused")
    assert not g._exploded(1e9)  # no good step yet: only finiteness counts
    g.recent.extend([4.0, 3.0, 5.0])
    assert not g._exploded(16.0) and g._exploded(16.1)  # 4x the median (4.0)


def test_skipped_steps_never_rotate_the_last_good_checkpoint_out(tmp_path, tiny_model_dir, tiny_data):
    """max_skipped_steps=2, a checkpoint every step, keep 2: steps 3 and 4 are skipped, step 5 stops the run.
    checkpoint-1 is the only good one (the steps after 2, 3 and 4 did not train); it is kept and named."""
    out = tmp_path / "run"
    with pytest.raises(NumericalError, match=rf"step 5: the training loss is nan after 2 skipped step\(s\) .*; the "
                       rf"last good checkpoint is {out / 'checkpoint-1'} \(resume with: satlm train \S+config.yaml "
                       rf"resume={out / 'checkpoint-1'}\); checkpoint-4 is not known good"):
        run_train(_config(tiny_model_dir, tiny_data, out, max_skipped_steps=2, save_steps=1, save_total_limit=2),
                  callbacks=[Poison(loss_steps=[3, 4, 5])], quiet=True)
    assert _names(out) == ["checkpoint-1", "checkpoint-4"]
    assert json.loads((out / ".satlm-run.json").read_text())["checkpoints"] == ["checkpoint-1", "checkpoint-4"]


@pytest.mark.parametrize("logging_steps", [1, 2])
def test_skipped_steps_are_logged_as_skipped(tmp_path, tiny_model_dir, tiny_data, logging_steps):
    out = tmp_path / "run"
    poison = Poison(loss_steps=[3])
    summary = run_train(_config(tiny_model_dir, tiny_data, out, max_skipped_steps=1, logging_steps=logging_steps),
                        callbacks=[poison], quiet=True)
    records = read_jsonl_records(out / "metrics.jsonl")
    assert summary["skipped_steps"] == [3] and all(r["loss"] > 1.0 for r in records)  # no `loss: 0.0`
    assert [r["step"] for r in records] == ([1, 2, 4, 5, 6] if logging_steps == 1 else [2, 4, 6])
    assert [r.get("skipped_steps") for r in records if r["step"] == 4] == [[3]]
    assert sum("skipped_steps" in r for r in records) == 1
    if logging_steps == 2:  # step 4's record is step 4's loss alone: step 3 counts in no loss
        straight = run_train(_config(tiny_model_dir, tiny_data, tmp_path / "ones", max_skipped_steps=1),
                             callbacks=[Poison(loss_steps=[3])], quiet=True)
        ones = {r["step"]: r["loss"] for r in read_jsonl_records(tmp_path / "ones" / "metrics.jsonl")}
        assert records[1]["loss"] == pytest.approx(ones[4], abs=1e-6) and straight["completed"]


# -- short runs --------------------------------------------------------------------------------------------
def test_a_run_shorter_than_logging_steps_ends_with_a_summary(tmp_path, tiny_model_dir, tiny_data, capsys):
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(_config(tiny_model_dir, tiny_data, out, max_steps=2, logging_steps=5, eval_steps=5).to_yaml())
    assert cli_main(["train", str(config)]) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] and summary["steps"] == 2 and math.isfinite(summary["train_loss"])
    assert [r["step"] for r in read_jsonl_records(out / "metrics.jsonl")] == [2]  # the last step is logged
    assert "done: 2 steps" in capsys.readouterr().out


def test_compare_shorter_than_logging_steps_keeps_both_sides(tmp_path, tiny_model_dir, tiny_data, capsys):
    from satlm.app.compare import run_compare

    out = tmp_path / "cmp"
    result = run_compare(_config(tiny_model_dir, tiny_data, out, max_steps=2, logging_steps=5), quiet=False)
    for mode in ("dense", "sat"):
        assert result[mode]["completed"] and result[mode]["steps"] == 2 and result[mode]["train_loss"] is not None


def test_the_summary_prints_without_a_logged_loss(capsys):
    from satlm.app.train import _print_summary

    _print_summary({"steps": 2, "tokens": 10, "wall_seconds": 0.0, "tokens_per_second": None, "train_loss": None,
                    "eval_loss": 4.0, "eval_perplexity": 54.6}, "out")
    assert "train loss n/a (no step logged)" in capsys.readouterr().out


# -- final/ ------------------------------------------------------------------------------------------------
def _fill_the_disk_in(folder_name, monkeypatch):
    """safetensors' writer fails with its own error type, as it does on a full disk, for files under
    `folder_name`, after writing part of the file."""
    import transformers.modeling_utils as mu
    from safetensors import SafetensorError

    real = mu.safe_save_file

    def save(tensors, filename, *args, **kwargs):
        if folder_name in str(filename):
            with open(filename, "wb") as f:
                f.write(b"half a model")
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                  '"No space left on device" })')
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(mu, "safe_save_file", save)
    return real


def test_a_full_disk_while_final_is_written_leaves_no_half_final(tmp_path, tiny_model_dir, tiny_data, monkeypatch):
    out = tmp_path / "run"
    real = _fill_the_disk_in(".tmp-final", monkeypatch)
    with pytest.raises(CheckpointError, match=rf"writing {out / 'final'} failed: no space left on device /\S* \(needs "
                       r"[0-9.]+ MiB, [0-9.]+ \w+ free\); nothing of it was kept; free some space, then resume with: "
                       r"satlm train \S+config.yaml --resume \(it evaluates and saves final/ again\)"):
        run_train(_config(tiny_model_dir, tiny_data, out, save_steps=3), quiet=True)
    assert not (out / "final").exists() and not (out / ".tmp-final").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and not summary["completed"]
    import transformers.modeling_utils as mu

    monkeypatch.setattr(mu, "safe_save_file", real)
    resumed = run_train(_config(tiny_model_dir, tiny_data, out, save_steps=3, resume=True), quiet=True)
    assert resumed["completed"] and (out / "final" / "model.safetensors").is_file()
    assert resumed["eval_loss"] == summary["eval_loss"]


def test_the_cli_says_a_full_disk_in_one_line(tmp_path, tiny_model_dir, tiny_data, monkeypatch, capsys):
    out = tmp_path / "run"
    _fill_the_disk_in(".tmp-final", monkeypatch)
    config = tmp_path / "run.yaml"
    config.write_text(_config(tiny_model_dir, tiny_data, out).to_yaml())
    assert cli_main(["train", str(config)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("satlm train: error: writing") and "no space left on device" in err[-1]
    assert "and train again (no checkpoint to resume from: save_steps=0)" in err[-1]


def test_with_save_steps_0_the_space_check_asks_for_the_final_model_only(tmp_path, tiny_model_dir, tiny_data,
                                                                        monkeypatch):
    from transformers import AutoModelForCausalLM

    weights = rundir.model_bytes(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    free = int(1.5 * weights)  # room for the weights, not for weights plus Adam's two moments
    monkeypatch.setattr(rundir, "disk_usage", lambda p: namedtuple("usage", "total used free")(10**9, 10**9, free))
    assert run_train(_config(tiny_model_dir, tiny_data, tmp_path / "a", save_steps=0), quiet=True)["completed"]
    with pytest.raises(RunConfigError, match="less than one checkpoint takes"):
        run_train(_config(tiny_model_dir, tiny_data, tmp_path / "b", save_steps=3), quiet=True)
    monkeypatch.setattr(rundir, "disk_usage", lambda p: namedtuple("usage", "total used free")(10**9, 10**9, 4096))
    with pytest.raises(RunConfigError, match=r"less than the final model takes \(about [0-9.]+ MiB: its weights; "
                                             r"save_steps=0 writes no checkpoint\)"):
        run_train(_config(tiny_model_dir, tiny_data, tmp_path / "c", save_steps=0), quiet=True)


def test_a_linked_final_is_refused(tmp_path, tiny_model_dir, tiny_data, capsys):
    out, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    run_train(_config(tiny_model_dir, tiny_data, out, save_steps=3), quiet=True)
    guard.remove_path(out / "final")
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    (out / "final").symlink_to(elsewhere, target_is_directory=True)
    assert cli_main(["train", str(out / "config.yaml"), "--resume"]) == 1
    err = capsys.readouterr().err
    assert f"{out / 'final'} is a symbolic link (to {elsewhere}); a run writes final/ as a folder of its own" in err
    assert os.listdir(elsewhere) == ["keep.txt"]


# -- checkpoints that do not load --------------------------------------------------------------------------
class Crafted:
    """Unpickled, this would run a command; torch.load(weights_only=True) refuses it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, tiny_model_dir, tiny_data):
    """A run stopped after checkpoint-3 (of 6), copied by each test that damages it."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    run_train(_config(tiny_model_dir, tiny_data, out, save_steps=3), callbacks=[StopAt(3)], quiet=True)
    return out


@pytest.mark.parametrize("damage", ["pickle", "torn-weights", "torn-state"])
def test_a_checkpoint_that_does_not_load_is_one_line(tmp_path, stopped, damage, capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(stopped, out, symlinks=True)
    config = out / "config.yaml"
    config.write_text(config.read_text().replace(str(stopped), str(out)))
    checkpoint, pwned = out / "checkpoint-3", tmp_path / "pwned"
    if damage == "pickle":
        torch.save({"state": Crafted(pwned)}, checkpoint / "optimizer.pt")
        why = (r"optimizer.pt does not load: torch.load\(weights_only=True\) refused its pickle, which asks for more "
               r"than tensors \(.*system.*\)")
    elif damage == "torn-weights":
        data = (checkpoint / "model.safetensors").read_bytes()
        (checkpoint / "model.safetensors").write_bytes(data[: len(data) // 2])
        why = "model.safetensors does not load: SafetensorError: "
    else:
        (checkpoint / "trainer_state.json").write_text('{"global_step": 3, ')
        why = "trainer_state.json does not load: JSONDecodeError: "
    assert cli_main(["train", str(config), "--resume"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith(f"satlm train: error: cannot resume from {checkpoint}: ")
    import re

    assert re.search(why, err[0]), err[0]
    assert not pwned.exists()


def test_a_load_error_inside_the_trainer_is_one_line_too(tmp_path, stopped, tiny_model_dir, tiny_data, monkeypatch):
    """What check_checkpoint_loads would not catch (it reads headers and pickles, not every byte) is still named."""
    import shutil

    import satlm.app.train as train

    out = tmp_path / "run"
    shutil.copytree(stopped, out, symlinks=True)
    monkeypatch.setattr(train, "check_checkpoint_loads", lambda path: None)
    torch.save({"state": Crafted(tmp_path / "pwned")}, out / "checkpoint-3" / "optimizer.pt")
    with pytest.raises(CheckpointError, match=rf"cannot resume from {out / 'checkpoint-3'}: UnpicklingError: "):
        run_train(_config(tiny_model_dir, tiny_data, out, save_steps=3, resume=True), quiet=True)
    assert not (tmp_path / "pwned").exists()


# -- a resumed run logs what the uninterrupted one logs ----------------------------------------------------
WINDOW_RUN = {"max_steps": 24, "save_steps": 8, "logging_steps": 5, "save_total_limit": "null"}


@pytest.mark.integration
def test_a_run_killed_after_checkpoint_16_resumes_to_the_same_summary(tmp_path, tiny_model_dir, tiny_data, capsys):
    straight = run_train(_config(tiny_model_dir, tiny_data, tmp_path / "straight", **WINDOW_RUN), quiet=True)
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(_config(tiny_model_dir, tiny_data, tmp_path / "unused", **WINDOW_RUN).to_yaml())
    proc = start_train(config, out, hook="pause-save:24", threads=2)  # stops inside checkpoint-24's save: killed
    wait_for(proc, lambda: (out / ".tmp-checkpoints" / "paused").is_file(), "the save of checkpoint-24")
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL and _names(out) == ["checkpoint-8", "checkpoint-16"]

    assert cli_main(["train", str(out / "config.yaml"), "--resume"]) == 0, capsys.readouterr().err
    want = read_jsonl_records(tmp_path / "straight" / "metrics.jsonl")
    got = read_jsonl_records(out / "metrics.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in want] == [5, 10, 15, 20, 24]
    assert [r["loss"] for r in got] == [r["loss"] for r in want]  # step 20's window began before checkpoint-16
    summary = json.loads((out / "summary.json").read_text())
    timing = {k for k in summary if "second" in k}
    assert set(summary) == set(straight)
    assert {k: summary[k] for k in set(summary) - timing} == {k: straight[k] for k in set(straight) - timing}
