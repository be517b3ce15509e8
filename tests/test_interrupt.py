"""`satlm train` stopped from outside: SIGINT / SIGTERM (a checkpoint, a clean non-zero exit, exact resume),
SIGKILL in the middle of a checkpoint (the newest whole one is resumed), a full disk or an unwritable
output directory (a clear error, no half checkpoint)."""

from __future__ import annotations

import errno
import json
import os
import signal
from collections import namedtuple

import pytest
import torch
from tiny_run import run_overrides, start_train, tiny_data, tiny_model_dir, wait_for  # noqa: F401  (fixtures)
from transformers import TrainerCallback

from satlm.cli import main as cli_main
from satlm.errors import CheckpointError, RunConfigError, TrainingInterrupted
from satlm.app import guard, rundir
from satlm.app.recorder import read_jsonl_records
from satlm.app.train import run_train
from satlm.app.run_config import load_run_config

STEPS = 8
# SAT with a schedule that moves at step 4: an exact resume needs the checkpoint's sat_state.pt too.
RUN = {"max_steps": STEPS, "save_steps": 3, "save_total_limit": 2, "sat.schedule": "ladder", "sat.rungs": 2}


def _config(model_dir, data, out, **extra):
    return load_run_config(None, run_overrides(model_dir, data, out, **{**RUN, **extra}))


def _losses(out):
    return [(r["step"], r["loss"]) for r in read_jsonl_records(out / "metrics.jsonl")]


def _steps(out):
    return sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_model_dir, tiny_data):
    """The uninterrupted run every interrupted one must match."""
    out = tmp_path_factory.mktemp("straight") / "run"
    summary = run_train(_config(tiny_model_dir, tiny_data, out), quiet=True)
    return {"losses": _losses(out), "summary": summary}


def _assert_matches(out, straight):
    got, want = _losses(out), straight["losses"]
    assert [s for s, _ in got] == list(range(1, STEPS + 1))
    for (step, a), (_, b) in zip(got, want):
        assert a == pytest.approx(b, abs=1e-6), step
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] and summary["eval_loss"] == pytest.approx(straight["summary"]["eval_loss"], abs=1e-6)
    # the resumed summary reads the run's whole metrics, not only this process's steps
    assert summary["train_loss"] == pytest.approx(straight["summary"]["train_loss"], abs=1e-6)
    timing = {k for k in summary if "second" in k}  # wall time, tokens/s: the only fields a resume may change
    assert set(summary) == set(straight["summary"])
    for key in set(summary) - timing:
        want = straight["summary"][key]
        assert summary[key] == (pytest.approx(want, abs=1e-6) if isinstance(want, float) else want), key
    assert (out / "final").is_dir() and not (out / guard.STAGING_DIR).exists()


def _resume_with_the_printed_command(message, capsys):
    """Run the `satlm train ... --resume` the message asks for (in this process: the CLI's own path)."""
    command = message.split("resume with: ")[1].split()
    assert command[:2] == ["satlm", "train"] and command[-1] == "--resume"
    assert cli_main(command[1:]) == 0, capsys.readouterr().err


def _write_config(tmp_path, model_dir, data, **extra):
    path = tmp_path / "run.yaml"
    path.write_text(_config(model_dir, data, tmp_path / "unused", **extra).to_yaml())
    return path


# -- SIGTERM / SIGINT ------------------------------------------------------------------------------------
@pytest.mark.integration
def test_sigterm_saves_a_checkpoint_and_resume_is_exact(tmp_path, tiny_model_dir, tiny_data, straight, capsys):
    # SIGINT takes the same path (the in-process tests below send it); one subprocess keeps the test short.
    sig = signal.SIGTERM
    out = tmp_path / "run"
    proc = start_train(_write_config(tmp_path, tiny_model_dir, tiny_data), out, hook="step-sleep:0.3", threads=2)
    wait_for(proc, lambda: len(read_jsonl_records(out / "metrics.jsonl")) >= 2, "step 2")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)

    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err
    message = err.strip().splitlines()[-1]
    step = int(message.split(" at step ")[1].split(";")[0])
    assert 2 <= step < STEPS, message
    assert f"interrupted by {sig.name} at step {step}; checkpoint saved to {out / f'checkpoint-{step}'}" in message
    assert (out / f"checkpoint-{step}" / "sat_state.pt").is_file()  # written off the save_steps=3 schedule too
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == step and not summary["completed"] and not (out / "final").exists()

    _resume_with_the_printed_command(message, capsys)
    _assert_matches(out, straight)


def test_a_second_signal_stops_at_once(tmp_path, tiny_model_dir, tiny_data):
    class SignalTwice(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                os.kill(os.getpid(), signal.SIGINT)  # handled: stop after this step, with a checkpoint
                os.kill(os.getpid(), signal.SIGINT)  # the same again: stop now

    out = tmp_path / "run"
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted, match="stopped at once by a second SIGINT at step 2, without saving; "
                       "no checkpoint") as e:
        run_train(_config(tiny_model_dir, tiny_data, out), callbacks=[SignalTwice()], quiet=True)
    assert e.value.exit_code == 130 and _steps(out) == []
    assert signal.getsignal(signal.SIGINT) is handler  # the previous handler is back


def test_cli_exit_status_of_an_interrupted_run(monkeypatch, capsys):
    import satlm.app.train as train

    for sig, status in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        def interrupted(argv, sig=sig):
            raise TrainingInterrupted("x", signum=sig)

        monkeypatch.setattr(train, "main", interrupted)
        assert cli_main(["train", "run.yaml"]) == status
    assert capsys.readouterr().err.splitlines() == ["satlm train: error: x"] * 2


# -- SIGKILL ---------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_sigkill_while_saving_resumes_from_the_newest_whole_checkpoint(tmp_path, tiny_model_dir, tiny_data,
                                                                       straight, capsys):
    out = tmp_path / "run"
    staging = out / guard.STAGING_DIR
    # Every step saves; the process stops inside checkpoint-5's save, after the Trainer wrote its files.
    proc = start_train(_write_config(tmp_path, tiny_model_dir, tiny_data, save_steps=1), out, hook="pause-save:5",
                       threads=2)
    wait_for(proc, lambda: (staging / "paused").is_file(), "the save of checkpoint-5")
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL

    # checkpoint-5 never got its name: a resume cannot pick it, however much of it is on disk.
    assert _steps(out) == [3, 4]  # save_total_limit=2
    assert (staging / "checkpoint-5" / "trainer_state.json").is_file()
    (staging / "checkpoint-5" / "optimizer.pt").write_bytes(b"torn")  # as a kill a moment earlier would leave it
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 4.1')  # a record cut short by the kill
    assert [s for s, _ in _losses(out)] == [1, 2, 3, 4, 5]

    _resume_with_the_printed_command(f"resume with: satlm train {out / 'config.yaml'} --resume", capsys)
    _assert_matches(out, straight)
    assert _steps(out) == [7, 8]


# -- disk full, unwritable output ------------------------------------------------------------------------
def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path, tiny_model_dir, tiny_data, monkeypatch):
    out = tmp_path / "run"
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if "checkpoint-6" in str(f) and str(f).endswith("optimizer.pt"):
            with open(f, "wb") as h:
                h.write(b"half an optimizer")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(CheckpointError, match=r"writing .*checkpoint-6 failed \(no space left on device; .* free on "
                       r"its disk\); nothing of it was kept; the newest complete checkpoint is .*checkpoint-3; "
                       r"resume with: satlm train .*config.yaml --resume"):
        run_train(_config(tiny_model_dir, tiny_data, out), quiet=True)
    assert _steps(out) == [3] and not list((out / guard.STAGING_DIR).iterdir())
    monkeypatch.setattr(torch, "save", real_save)

    resumed = run_train(_config(tiny_model_dir, tiny_data, out, resume=True), quiet=True)
    assert resumed["completed"] and _steps(out) == [6, 8]


def test_unwritable_output_dir_fails_before_training(tmp_path, tiny_model_dir, tiny_data, monkeypatch):
    out = tmp_path / "run"

    def refuse(folder):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(folder / ".satlm-write-test"))

    monkeypatch.setattr(rundir, "_write_probe", refuse)
    with pytest.raises(RunConfigError, match=f"output_dir {out} is not writable: Permission denied"):
        run_train(_config(tiny_model_dir, tiny_data, out), quiet=True)
    assert not (out / "metrics.jsonl").exists()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes to read-only folders")
def test_read_only_output_dir(tmp_path, tiny_model_dir, tiny_data):
    out = tmp_path / "run"
    out.mkdir()
    out.chmod(0o555)
    try:
        with pytest.raises(RunConfigError, match="not writable"):
            run_train(_config(tiny_model_dir, tiny_data, out), quiet=True)
    finally:
        out.chmod(0o755)


def test_too_little_free_space_fails_before_training(tmp_path, tiny_model_dir, tiny_data, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(rundir, "disk_usage", lambda path: namedtuple("usage", "total used free")(10**9, 10**9, 4096))
    with pytest.raises(RunConfigError, match=r"0.0 MiB free on its disk, less than one checkpoint takes \(about "
                                             r"[0-9.]+ MiB: weights and optimizer state\)"):
        run_train(_config(tiny_model_dir, tiny_data, out), quiet=True)
    assert not (out / "metrics.jsonl").exists()


def test_an_unfinished_checkpoint_is_never_resumed(tmp_path, tiny_model_dir, tiny_data):
    out = tmp_path / "run"
    (out / guard.STAGING_DIR / "checkpoint-4").mkdir(parents=True)
    (out / guard.STAGING_DIR / "checkpoint-4" / "trainer_state.json").write_text("{}")
    with pytest.raises(RunConfigError, match="holds no checkpoint-N/ to resume from"):
        run_train(_config(tiny_model_dir, tiny_data, out, resume=True), quiet=True)
    with pytest.raises(RunConfigError, match="is a checkpoint that was never finished"):
        run_train(_config(tiny_model_dir, tiny_data, out, resume=str(out / guard.STAGING_DIR / "checkpoint-4")),
                  quiet=True)


def test_a_record_cut_short_is_left_out(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert read_jsonl_records(path) == [{"step": 1, "loss": 2.0}]
    path.write_text('{"step": 1, "lo\n{"step": 2, "loss": 2.0}\n')  # not at the end: a real error
    with pytest.raises(json.JSONDecodeError):
        read_jsonl_records(path)


def test_a_signal_at_the_last_step_resumes_to_the_end(tmp_path, tiny_model_dir, tiny_data, straight):
    class SignalAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == STEPS:
                os.kill(os.getpid(), signal.SIGINT)

    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted, match=f"interrupted by SIGINT at step {STEPS}; checkpoint saved to "
                       f"{out / f'checkpoint-{STEPS}'}"):
        run_train(_config(tiny_model_dir, tiny_data, out), callbacks=[SignalAt()], quiet=True)
    assert not (out / "final").exists()
    run_train(_config(tiny_model_dir, tiny_data, out, resume=True), quiet=True)  # no step left: evaluate, save
    _assert_matches(out, straight)
