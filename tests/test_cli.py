"""The satlm command: usage, config handling, and bad input as one line and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from tiny_run import make_model_dir, run_overrides, tiny_data, tiny_model_dir, write_jsonl  # noqa: F401

from satlm.cli import main, parse_run_args


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("# satlm train run.yaml\ntask: cpt\n")
    return path


def test_usage_version_and_unknown_command(capsys):
    assert main([]) == 2
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("train", "compare", "eval", "bench", "pretrain-base"):
        assert command in out
    assert main(["--version"]) == 0
    assert main(["trian"]) == 2
    assert "did you mean 'train'?" in capsys.readouterr().err


def test_keys_and_print_config(capsys, config):
    assert main(["keys"]) == 0
    keys = capsys.readouterr().out.split()
    assert "sat.omission_rate" in keys and "data.train" in keys
    assert main(["train", str(config), "max_steps=3", "sat.enabled=false", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 3" in out and "enabled: false" in out
    assert main(["compare", "--print-config"]) == 0  # no config: the embedded CPT demo
    assert "output_dir: runs/demo-cpt" in capsys.readouterr().out


def test_keys_are_satconfigs_fields_and_describe_them(capsys):
    """`satlm keys` lists the keys generated from the fields: sat.* is exactly SATConfig's fields plus enabled;
    `satlm keys KEY` and --describe print each declaration (what it takes, default, help)."""
    import dataclasses

    from satlm import SATConfig
    from satlm.app.run_config import config_keys

    assert main(["keys"]) == 0
    keys = capsys.readouterr().out.splitlines()
    assert keys == config_keys()
    assert [k[4:] for k in keys if k.startswith("sat.")] == [f.name for f in dataclasses.fields(SATConfig)] + ["enabled"]
    assert main(["keys", "sat.selection", "lr"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "sat.selection: one of sample, topk, random, unbiased; default topk"
    assert out[1].startswith("    How kept units are chosen") and "lr: a number > 0; default 0.0001" in out
    assert main(["keys", "--describe"]) == 0
    described = [line.split(":")[0] for line in capsys.readouterr().out.splitlines() if not line.startswith(" ")]
    assert described == keys
    assert main(["keys", "sat.selectoin"]) == 1
    assert _error_line(capsys) == ("satlm keys: error: unknown config key 'sat.selectoin' (did you mean "
                                   "'sat.selection'?)")


def test_run_args_parsing(config):
    cfg = parse_run_args("train", [str(config), "max_steps=5", "--resume"], config_required=True)
    assert cfg.max_steps == 5 and cfg.resume is True
    assert parse_run_args("compare", ["max_steps=5"], config_required=False).output_dir == "runs/demo-cpt"
    with pytest.raises(SystemExit):
        parse_run_args("train", ["max_steps=5"], config_required=True)


def test_train_without_a_config_is_a_usage_error(capsys):
    assert main(["train"]) == 2
    assert "a config is required" in capsys.readouterr().err


def test_unknown_config_key(capsys, config):
    assert main(["train", str(config), "sat.omision_rate=0.5"]) == 1
    line = _error_line(capsys)
    assert line == "satlm train: error: unknown config key 'sat.omision_rate' (did you mean 'sat.omission_rate'?)"


def test_bad_sat_value(capsys, config):
    assert main(["train", str(config), "sat.omission_rate=1.2"]) == 1
    assert "sat.omission_rate=1.2 must be a number in [0, 1)" in _error_line(capsys)


@pytest.mark.parametrize("case, fragment", [
    ("malformed", "bad.jsonl:2: malformed JSON"),
    ("missing_field", "bad.jsonl:1: missing field 'text'"),
    ("empty", "bad.jsonl: holds no text"),
    ("missing", "does not exist"),
])
def test_bad_data(capsys, tmp_path, config, tiny_model_dir, tiny_data, case, fragment):
    path = tmp_path / "bad.jsonl"
    if case == "malformed":
        path.write_text('{"text": "fine"}\n{"text": \n')
    elif case == "missing_field":
        write_jsonl(path, [{"content": "x"}])
    elif case == "empty":
        path.write_text("")
    overrides = run_overrides(tiny_model_dir, tiny_data, tmp_path / "out", **{"data.train": str(path)})
    assert main(["train", str(config), *overrides]) == 1
    assert fragment in _error_line(capsys)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # it failed before training started


def test_bad_sft_data_names_the_missing_field(capsys, tmp_path, config, tiny_model_dir, tiny_data):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c"}])
    overrides = run_overrides(tiny_model_dir, tiny_data, tmp_path / "out", task="sft", **{"data.train": str(path)})
    assert main(["train", str(config), *overrides]) == 1
    assert "sft.jsonl:2: missing field 'output'" in _error_line(capsys)


def test_unsupported_and_missing_models(capsys, tmp_path, config, tiny_data, tiny_model_dir):
    gpt2 = make_model_dir(tmp_path / "gpt2", arch="gpt2")
    assert main(["train", str(config), *run_overrides(gpt2, tiny_data, tmp_path / "o1")]) == 1
    line = _error_line(capsys)
    assert "does not support GPT2LMHeadModel" in line and "LlamaForCausalLM" in line
    assert main(["compare", str(config), *run_overrides(gpt2, tiny_data, tmp_path / "o2")]) == 1
    assert "does not support" in _error_line(capsys)
    assert not (tmp_path / "o2" / "dense").exists()  # refused before the dense run, not after it
    assert main(["train", str(config), *run_overrides(tmp_path / "nowhere", tiny_data, tmp_path / "o3")]) == 1
    assert "no such model folder" in _error_line(capsys)  # not Hugging Face's "Repo id must be in the form"


def test_eval_command(capsys, tiny_model_dir, tiny_data):
    assert main(["eval", str(tiny_model_dir), "--data", str(tiny_data["cpt_eval"]), "--seq-len", "32",
                 "--max-samples", "8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["task"] == "cpt" and result["examples"] == 8 and result["tokens"] == 8 * 31
    assert result["perplexity"] > 1
    assert main(["eval", str(tiny_model_dir), "--data", str(tiny_data["sft_eval"]), "--seq-len", "128"]) == 0
    assert "sft" in capsys.readouterr().out
    assert main(["eval", str(tiny_model_dir), "--data", "/nonexistent.jsonl"]) == 1
    assert "does not exist" in _error_line(capsys)


def test_eval_reads_the_formats_training_reads(capsys, tmp_path, tiny_model_dir):
    """satlm eval takes data.format / data.columns / data.train_on as --format / --columns / --train-on."""
    renamed = tmp_path / "qa.jsonl"
    renamed.write_text("".join(json.dumps({"question": f"say {w}", "answer": f"{w} {w} {w}"}) + "\n"
                               for w in ("yes", "no", "maybe")))
    args = ["eval", str(tiny_model_dir), "--data", str(renamed), "--task", "sft", "--seq-len", "64", "--json"]
    assert main(args) == 1
    assert "data.columns" in _error_line(capsys)  # without the mapping the records are not SFT records
    assert main([*args, "--format", "alpaca", "--columns", '{"instruction": "question", "output": "answer"}']) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["task"] == "sft" and result["examples"] == 3 and result["tokens"] > 0
    assert main([*args, "--columns", "[1, 2]"]) != 0
    assert "--columns must be a JSON object" in capsys.readouterr().err


def test_bench_without_its_module_says_so(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "satlm.bench.cli", None)  # as if satlm.bench.cli were not installed
    assert main(["bench"]) == 1
    assert "satlm bench` is not available" in _error_line(capsys)


def test_pretrain_base_is_wired(capsys):
    pytest.importorskip("satlm.app.pretrain_base")
    assert main(["pretrain-base", "--help"]) == 0
    assert "--out" in capsys.readouterr().out


def test_console_entry_point_exits_non_zero_with_one_line(tmp_path, config):
    """The real process: `python -m satlm.cli` (what the `satlm` script runs), no traceback on bad input."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "satlm.cli", "train", str(config), "max_stesp=3"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("satlm train: error: unknown config key 'max_stesp' "
                                   "(did you mean 'max_steps'?)")


class _FakeGroup:
    """A process group of two ranks seen from rank 0: broadcasts pass through, barriers are counted."""

    def __init__(self):
        self.barriers = 0

    def get_rank(self):
        return 0

    def get_world_size(self):
        return 2

    def broadcast_object_list(self, box, src=0):
        pass

    def barrier(self):
        self.barriers += 1


def test_an_error_every_rank_raises_waits_for_every_rank_before_exiting(capsys, monkeypatch):
    # torchrun stops the other workers once the first exits: a rank must not exit on a shared refusal (raised by
    # `on_main_process` on every rank) before every rank has printed it; any other error must not wait (the
    # other ranks may be training on, and a barrier would hang)
    from satlm import cli, distributed
    from satlm.errors import RunConfigError

    group = _FakeGroup()
    monkeypatch.setattr(distributed, "_dist", lambda: group)

    def refused(_args):
        distributed.on_main_process(lambda: (_ for _ in ()).throw(RunConfigError("output_dir x is in use")))

    def local(_args):
        raise RunConfigError("only this rank")

    monkeypatch.setitem(cli.COMMANDS, "train", (refused,) + tuple(cli.COMMANDS["train"][1:]))
    assert main(["train"]) == 1 and group.barriers == 1
    assert "satlm train: error: output_dir x is in use" in capsys.readouterr().err
    monkeypatch.setitem(cli.COMMANDS, "train", (local,) + tuple(cli.COMMANDS["train"][1:]))
    assert main(["train"]) == 1 and group.barriers == 1
