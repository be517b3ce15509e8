"""Whose the output folder is: satlm writes only into a new or empty folder or one its marker claims,
overwrite moves only the names that marker lists (aside into .previous/, removed once the new run saved a
checkpoint or finished, links never followed), nothing changes before every pre-flight check passed, and one
process at a time works in a folder (flock on .satlm-run.lock; a kill -9 leaves no stale lock)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
from tiny_run import run_overrides, start_train, tiny_data, tiny_model_dir, wait_for  # noqa: F401  (fixtures)
from transformers import TrainerCallback

from satlm.cli import main as cli_main
from satlm.errors import DataError, RunConfigError
from satlm.app import guard, rundir
from satlm.app.rundir import LOCK_NAME, MARKER_NAME, PREVIOUS_DIR, RunDir, RunLock, claim_output_dir, read_marker
from satlm.app.recorder import read_jsonl_records
from satlm.app.train import run_train
from satlm.app.run_config import load_run_config


def _config(model_dir, data, out, **extra):
    return load_run_config(None, run_overrides(model_dir, data, out, **{"max_steps": 2, **extra}))


def _tree(root: Path) -> dict:
    """Every path under `root` with its content (files), its target (links) or None (folders)."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            found[rel] = f"-> {os.readlink(path)}"
        elif path.is_file():
            found[rel] = path.read_bytes()
        else:
            found[rel] = None
    return found


def _users_folder(root: Path) -> Path:
    """A user's own files with run-like names."""
    root.mkdir(parents=True)
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoint-2024"):
        (root / name).write_text(f"the user's own {name}\n")
    for name in ("plots", "final", "tensorboard", "checkpoint-7"):
        (root / name).mkdir()
        (root / name / "mine.txt").write_text("mine\n")
    (root / "plots" / "fig.png").write_bytes(b"\x89PNG the user's figure")
    return root


# -- 1. a folder satlm did not mark ------------------------------------------------------------------------
def test_a_folder_of_the_users_own_files_is_refused_and_left_as_it_is(tmp_path, tiny_model_dir, tiny_data, capsys):
    folder = _users_folder(tmp_path / "mine")
    before = _tree(folder)
    for overwrite in (True, False):
        with pytest.raises(RunConfigError, match=rf"output_dir {folder} is not empty and is not a satlm run \(no "
                           r"\.satlm-run\.json in it\): it holds checkpoint-2024, checkpoint-7/, config.yaml, final/, "
                           r"metrics.jsonl \(and 3 more\); .*choose another output_dir, or an empty one"):
            run_train(_config(tiny_model_dir, tiny_data, folder, overwrite=overwrite), quiet=True)
    # the CLI: one line, exit 1
    assert cli_main(["train", "demo-cpt", f"output_dir={folder}", "max_steps=6"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "is not a satlm run" in err and "Traceback" not in err
    assert _tree(folder) == before


def test_dot_dotdot_empty_root_and_home_are_refused(tmp_path, tiny_model_dir, tiny_data, monkeypatch, capsys):
    parent = tmp_path / "project"
    here = parent / "work"
    here.mkdir(parents=True)
    (here / "config.yaml").write_text("the user's own config\n")
    (parent / "plots").mkdir()
    (parent / "plots" / "keep.png").write_bytes(b"png")
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(here)
    before = _tree(tmp_path)
    for spec, shown, what in ((".", ".", "the current folder"), ("..", "..", "the parent folder"),
                              ("", "", r"empty \(the current folder\)"), ("/", "/", "the root folder"),
                              (str(home), str(home), "the home folder"), ("~/", f"{home}/", "the home folder")):
        with pytest.raises(RunConfigError, match=rf"output_dir '{shown}' is {what} \(.*\), which holds no satlm run; "
                           r"name a folder for the run itself"):
            run_train(_config(tiny_model_dir, tiny_data, spec, overwrite=True), quiet=True)
    assert cli_main(["train", "demo-cpt", "output_dir=", "max_steps=6"]) == 1
    err = capsys.readouterr().err
    assert "is empty (the current folder)" in err and "Traceback" not in err
    assert _tree(tmp_path) == before


def test_the_current_folder_is_fine_when_it_holds_a_satlm_run(tmp_path, tiny_model_dir, tiny_data, monkeypatch):
    run = tmp_path / "run"
    run_train(_config(tiny_model_dir, tiny_data, run), quiet=True)
    monkeypatch.chdir(run)
    summary = run_train(_config(tiny_model_dir, tiny_data, ".", overwrite=True), quiet=True)
    assert summary["completed"] and read_marker(run)["kind"] == "train"


# -- 2. the marker, and what overwrite moves -------------------------------------------------------------
def test_the_marker_lists_what_the_run_writes(tmp_path, tiny_model_dir, tiny_data):
    out = tmp_path / "run"
    run_train(_config(tiny_model_dir, tiny_data, out, max_steps=4, save_steps=1, save_total_limit=2), quiet=True)
    marker = read_marker(out)
    assert marker["kind"] == "train" and len(marker["run_id"]) == 32 and marker["satlm_version"]
    names = {"config.yaml", "metrics.jsonl", "summary.json", "final", "plots", ".tmp-checkpoints"}
    assert names <= set(marker["writes"])
    assert marker["checkpoints"] == ["checkpoint-3", "checkpoint-4"]  # the rotated ones are no longer listed
    assert sorted(p.name for p in out.glob("checkpoint-*")) == marker["checkpoints"]


def test_overwrite_moves_only_the_runs_names_aside_and_never_follows_a_link(tmp_path, tiny_model_dir, tiny_data):
    out, outside = tmp_path / "run", tmp_path / "outside"
    first = run_train(_config(tiny_model_dir, tiny_data, out, save_steps=1), quiet=True)
    outside.mkdir()
    (outside / "keep.txt").write_text("not satlm's")
    remove = [out / "plots"]  # the user swapped plots/ for a link to a folder of their own
    for path in remove:
        guard.remove_path(path)
    (out / "plots").symlink_to(outside, target_is_directory=True)
    (out / "notes.txt").write_text("mine")

    seen = {}

    class Look(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen[state.global_step] = sorted(p.name for p in (out / PREVIOUS_DIR).iterdir()) \
                if (out / PREVIOUS_DIR).exists() else None

    run_train(_config(tiny_model_dir, tiny_data, out, overwrite=True, max_steps=3, save_steps=2), callbacks=[Look()],
              quiet=True)
    # Until the new run's first checkpoint (step 2) the old run waits in .previous/; then it is gone.
    assert seen[1] == sorted(["checkpoint-1", "checkpoint-2", "config.yaml", "eval.jsonl", "final", "metrics.jsonl",
                              "plots", "summary.json"])
    assert seen[2] == seen[1] and seen[3] is None  # (step 2's checkpoint is written after its on_step_end)
    assert (outside / "keep.txt").read_text() == "not satlm's"  # the link was removed, not followed
    assert (out / "notes.txt").read_text() == "mine"  # not a name the run writes
    assert not (out / "checkpoint-1").exists() and first["steps"] == 2


def test_a_run_that_saved_nothing_keeps_the_previous_one(tmp_path, tiny_model_dir, tiny_data):
    """Overwriting a run that crashed before its first checkpoint removes that run's files and keeps the
    .previous/ it left: the last run that got somewhere."""
    out = tmp_path / "run"
    run_train(_config(tiny_model_dir, tiny_data, out), quiet=True)

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            raise RuntimeError("crash")

    for _ in range(2):
        with pytest.raises(RuntimeError, match="crash"):
            run_train(_config(tiny_model_dir, tiny_data, out, overwrite=True, save_steps=5), callbacks=[Crash()],
                      quiet=True)
        assert (out / PREVIOUS_DIR / "final").is_dir() and (out / PREVIOUS_DIR / "summary.json").is_file()


def test_a_crafted_marker_cannot_reach_out_of_the_folder(tmp_path, tiny_model_dir, tiny_data):
    out, victim = tmp_path / "run", tmp_path / "victim"
    victim.mkdir()
    out.mkdir()
    (out / MARKER_NAME).write_text(json.dumps({"satlm_run": 1, "kind": "train", "run_id": "x", "writes": ["../victim"],
                                              "checkpoints": []}))
    with pytest.raises(RunConfigError, match="is not a satlm run marker"):
        run_train(_config(tiny_model_dir, tiny_data, out, overwrite=True), quiet=True)
    assert victim.is_dir()


def test_a_run_of_an_older_satlm_is_continued_and_overwritten(tmp_path, tiny_model_dir, tiny_data):
    """A folder satlm wrote before markers (its config.yaml opens with satlm's header) is satlm's."""
    out = tmp_path / "old"
    run_train(_config(tiny_model_dir, tiny_data, out, save_steps=1), quiet=True)
    (out / MARKER_NAME).unlink()
    (out / "notes.txt").write_text("mine")
    summary = run_train(_config(tiny_model_dir, tiny_data, out, overwrite=True), quiet=True)
    assert summary["completed"] and read_marker(out)["kind"] == "train" and (out / "notes.txt").is_file()


# -- 3. nothing changes before every pre-flight check ---------------------------------------------------
@pytest.mark.parametrize("failure", ["disk", "data"])
def test_a_failed_pre_flight_check_leaves_the_previous_run(tmp_path, tiny_model_dir, tiny_data, monkeypatch, failure):
    out = tmp_path / "run"
    run_train(_config(tiny_model_dir, tiny_data, out, save_steps=1), quiet=True)
    before = _tree(out)
    if failure == "disk":  # a nearly full disk: the check fails, and the previous run is still there
        monkeypatch.setattr(rundir, "disk_usage", lambda p: namedtuple("usage", "total used free")(10**9, 10**9, 4096))
        error, match = RunConfigError, "free on its disk, less than one checkpoint takes"
        extra = {}
    else:
        error, match, extra = DataError, "does not exist", {"data.train": str(tmp_path / "missing.jsonl")}
    with pytest.raises(error, match=match):
        run_train(_config(tiny_model_dir, tiny_data, out, overwrite=True, save_steps=1, **extra), quiet=True)
    assert _tree(out) == before and not (out / PREVIOUS_DIR).exists()


# -- 4. one process per run directory ----------------------------------------------------------------------
def _write_config(tmp_path, model_dir, data, **extra):
    path = tmp_path / "run.yaml"
    path.write_text(_config(model_dir, data, tmp_path / "unused", **extra).to_yaml())
    return path


@pytest.mark.integration
def test_a_second_run_is_refused_while_the_first_trains_and_a_kill_leaves_no_lock(tmp_path, tiny_model_dir,
                                                                                   tiny_data):
    out = tmp_path / "run"
    config = _write_config(tmp_path, tiny_model_dir, tiny_data, max_steps=40, save_steps=1)
    first = start_train(config, out, hook="step-sleep:0.3", threads=1)
    try:
        wait_for(first, lambda: len(read_jsonl_records(out / "metrics.jsonl")) >= 2, "step 2")
        with pytest.raises(RunConfigError, match=rf"output_dir {out} is in use by another satlm process \(PID "
                           rf"{first.pid} holds {out / LOCK_NAME}\); wait for it to end, or choose another output_dir"):
            run_train(_config(tiny_model_dir, tiny_data, out, overwrite=True), quiet=True)
        assert (out / "config.yaml").is_file() and not (out / PREVIOUS_DIR).exists()
        steps = len(read_jsonl_records(out / "metrics.jsonl"))
        wait_for(first, lambda: len(read_jsonl_records(out / "metrics.jsonl")) > steps, "one more step")
    finally:
        first.kill()
        first.communicate(timeout=60)
    assert first.returncode == -signal.SIGKILL
    # the OS dropped the lock with the process: the run resumes at once
    summary = run_train(_config(tiny_model_dir, tiny_data, out, resume=True, max_steps=40, save_steps=1), quiet=True)
    assert summary["completed"]
    assert [r["step"] for r in read_jsonl_records(out / "metrics.jsonl")] == list(range(1, 41))


@pytest.mark.integration
def test_two_runs_started_together_one_trains_the_other_is_refused(tmp_path, tiny_model_dir, tiny_data):
    out = tmp_path / "run"
    config = _write_config(tmp_path, tiny_model_dir, tiny_data, max_steps=6)
    procs = [start_train(config, out, "overwrite=true", hook="step-sleep:1.5", threads=1) for _ in range(2)]
    results = [(p, *p.communicate(timeout=300)) for p in procs]
    ok = [p for p, _, _ in results if p.returncode == 0]
    refused = [(p, err) for p, _, err in results if p.returncode != 0]
    assert len(ok) == 1 and len(refused) == 1, [(p.returncode, err[-500:]) for p, _, err in results]
    proc, err = refused[0]
    assert proc.returncode == 1 and "Traceback" not in err
    assert f"is in use by another satlm process (PID {ok[0].pid} holds" in err.strip().splitlines()[-1]
    assert [r["step"] for r in read_jsonl_records(out / "metrics.jsonl")] == list(range(1, 7))  # each step once
    assert json.loads((out / "summary.json").read_text())["completed"]


def test_the_lock_names_the_pid_that_holds_it(tmp_path):
    """flock locks belong to an open file: a second open in this process is refused as another process would
    be, and closing the first releases it."""
    first = RunLock(tmp_path)
    first.acquire()
    with pytest.raises(RunConfigError, match=rf"in use by another satlm process \(PID {os.getpid()} holds"):
        RunLock(tmp_path).acquire()
    first.release()
    second = RunLock(tmp_path)
    second.acquire()
    second.release()


# -- 5. satlm compare's folder -----------------------------------------------------------------------------
def test_claim_output_dir_for_a_comparison(tmp_path, tiny_model_dir, tiny_data):
    shared = tmp_path / "shared-dense"
    run_train(_config(tiny_model_dir, tiny_data, shared), quiet=True)
    variant = tmp_path / "variant"
    variant.mkdir()
    (variant / "dense").symlink_to(shared, target_is_directory=True)  # benchmarks/quality_sweep.py's layout
    writes = ("compare.json", "compare.png", "budget.json")
    with claim_output_dir(variant, "compare", writes=writes, parts=("dense", "sat")) as claimed:
        marker = read_marker(variant)
        assert marker["kind"] == "compare" and marker["parts"] == ["dense", "sat"]
        with pytest.raises(RunConfigError, match="in use by another satlm process"):
            with claim_output_dir(variant, "compare", writes=writes, parts=("dense", "sat")):
                pass
        assert claimed.path == variant
    with claim_output_dir(variant, "compare", writes=writes, parts=("dense", "sat")):  # released, same marker
        assert read_marker(variant)["run_id"] == marker["run_id"]
    # a train run is no comparison, a folder of other files is no satlm folder, and neither is changed
    with pytest.raises(RunConfigError, match="holds a satlm train .*, not a compare run"):
        with claim_output_dir(shared, "compare", writes=writes, parts=("dense", "sat")):
            pass
    users = _users_folder(tmp_path / "mine")
    with pytest.raises(RunConfigError, match="is not a satlm run"):
        with claim_output_dir(users, "compare", writes=writes, parts=("dense", "sat")):
            pass
    with pytest.raises(RunConfigError, match="holds a satlm compare .*, not a train run"):
        run_train(_config(tiny_model_dir, tiny_data, variant), quiet=True)


def test_a_new_folder_is_removed_again_when_it_fails_its_check(tmp_path, monkeypatch):
    out = tmp_path / "new" / "run"
    monkeypatch.setattr(rundir, "disk_usage", lambda p: namedtuple("usage", "total used free")(10**9, 10**9, 4096))
    run_dir = RunDir(out, "train", ("config.yaml",))
    run_dir.plan()
    with pytest.raises(RunConfigError, match="free on its disk"):
        run_dir.prepare(need_bytes=10**6)
    assert not out.exists() and (tmp_path / "new").is_dir()


@pytest.mark.integration
def test_under_torchrun_rank_0_takes_the_lock_and_every_rank_fails_with_it(tmp_path, tiny_model_dir, tiny_data):
    import socket

    out = tmp_path / "run"
    out.mkdir()
    held = RunLock(out)
    held.acquire()  # this process holds the folder
    config = _write_config(tmp_path, tiny_model_dir, tiny_data)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", TRANSFORMERS_VERBOSITY="error")
    try:
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                               "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "satlm.cli", "train",
                               str(config), f"output_dir={out}"], env=env, capture_output=True, text=True, timeout=300)
    finally:
        held.release()
    refusal = f"satlm train: error: output_dir {out} is in use by another satlm process (PID {os.getpid()} holds"
    lines = (proc.stdout + proc.stderr).splitlines()
    assert proc.returncode != 0 and sum(line.startswith(refusal) for line in lines) == 2, lines[-20:]  # both ranks
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written
