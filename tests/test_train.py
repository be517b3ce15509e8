"""The train and compare recipes end to end on a tiny Llama (fp32, CPU), and SATCallback in a user's Trainer."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import sat_config
from tiny_run import StopAt, run_overrides, tiny_data, tiny_model_dir  # noqa: F401  (fixtures)
from transformers import AutoModelForCausalLM, TrainerCallback

from satlm.errors import RunConfigError
from satlm.app.compare import run_compare
from satlm.data import build_datasets
from satlm.app.evaluate import evaluate_loss
from satlm.app.train import run_train
from satlm.app.run_config import load_run_config

METRIC_FIELDS = ("step", "loss", "lr", "attn_omission_rate", "mlp_omission_rate", "tokens_per_second",
                 "elapsed_seconds")
SUMMARY_FIELDS = ("steps", "tokens", "wall_seconds", "tokens_per_second", "train_loss", "eval_loss",
                  "eval_perplexity")


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _config(model_dir, data, out, task="cpt", **extra):
    return load_run_config(None, run_overrides(model_dir, data, out, task=task, **extra))


def test_cpt_sat_run_writes_the_run_directory(tmp_path, tiny_model_dir, tiny_data):
    out = tmp_path / "run"
    cfg = _config(tiny_model_dir, tiny_data, out, save_steps=3, eval_steps=3, **{"sat.attn_omission_rate": 0.25})
    summary = run_train(cfg, quiet=True)

    for name in ("config.yaml", "metrics.jsonl", "summary.json", "eval.jsonl", "checkpoint-6", "final",
                 "plots/training.png"):
        assert (out / name).exists(), name
    assert load_run_config(out / "config.yaml") == cfg  # the resolved config reloads as itself
    records = _records(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for r in records:
        assert set(METRIC_FIELDS) <= set(r) and math.isfinite(r["loss"])
        assert (r["attn_omission_rate"], r["mlp_omission_rate"]) == (0.25, 0.5)
        assert r["tokens"] == r["step"] * 4 * 32 and r["tokens_per_second"] > 0
    assert [e["step"] for e in _records(out / "eval.jsonl")] == [0, 3, 6]  # step 0: where the curve starts
    assert json.loads((out / "summary.json").read_text()) == summary
    assert set(SUMMARY_FIELDS) <= set(summary) and summary["steps"] == 6 and summary["tokens"] == 6 * 4 * 32
    assert summary["eval_perplexity"] == pytest.approx(math.exp(summary["eval_loss"]))
    assert (out / "checkpoint-6" / "sat_state.pt").is_file()

    # final/ is a plain model that plain transformers loads, and its eval loss is the summary's.
    plain = AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32)
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert type(plain).__name__ == "LlamaForCausalLM" and not hasattr(plain, "sat_runtime")
    assert set(plain.state_dict()) == set(fresh.state_dict())
    from transformers import AutoTokenizer

    data = build_datasets(cfg, AutoTokenizer.from_pretrained(out / "final"))
    result = evaluate_loss(plain, data.eval, data.collator, batch_size=4)
    assert result["loss"] == pytest.approx(summary["eval_loss"], abs=1e-4)
    assert result["loss"] < evaluate_loss(fresh, data.eval, data.collator, batch_size=4)["loss"]  # it learned


@pytest.mark.integration
@pytest.mark.parametrize("task, source", [("cpt", "current"), ("cpt", "history"), ("sft", "current")])
def test_resume_is_exact(tmp_path, tiny_model_dir, tiny_data, task, source):
    extra = {"max_steps": 8, "save_steps": 4, "grad_accum": 2, "sat.schedule": "ladder", "sat.rungs": 2,
             "sat.source": source, "seq_len": 32 if task == "cpt" else 128}
    straight = run_train(_config(tiny_model_dir, tiny_data, tmp_path / "a", task, **extra), quiet=True)
    stopped = run_train(_config(tiny_model_dir, tiny_data, tmp_path / "b", task, **extra), callbacks=[StopAt(4)],
                        quiet=True)
    assert stopped["steps"] == 4 and not stopped["completed"] and not (tmp_path / "b" / "final").exists()
    resumed = run_train(_config(tiny_model_dir, tiny_data, tmp_path / "b", task, resume=True, **extra),
                        quiet=True)

    a, b = _records(tmp_path / "a" / "metrics.jsonl"), _records(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, 9))
    assert [r["mlp_omission_rate"] for r in b] == [0.5] * 4 + [0.25] * 4  # the schedule moved on after resume
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-5), ra["step"]
    assert resumed["eval_loss"] == pytest.approx(straight["eval_loss"], abs=1e-5)
    assert resumed["tokens"] == straight["tokens"] and resumed["wall_seconds"] > 0
    assert resumed["train_loss"] == pytest.approx(straight["train_loss"], abs=1e-5)  # over the whole run's records


def test_epochs_and_report_to(tmp_path, tiny_model_dir, tiny_data):
    """epochs replaces max_steps (drop_last batches of the training data); with report_to, the dense evaluations
    are logged through the Trainer, so trackers (wandb, mlflow, ...) see them."""
    seen = []

    class Tracker(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs or {}))

    cfg = _config(tiny_model_dir, tiny_data, tmp_path / "e", epochs=0.5, eval_steps=2, report_to="all")
    summary = run_train(cfg, callbacks=[Tracker()], quiet=True)
    from transformers import AutoTokenizer

    n = len(build_datasets(cfg, AutoTokenizer.from_pretrained(tiny_model_dir)).train)
    assert summary["steps"] == math.ceil(0.5 * (n // 4)) and summary["completed"]
    assert [e for e in seen if "eval_loss" in e]
    assert load_run_config(tmp_path / "e" / "config.yaml").max_steps == summary["steps"]
    with pytest.raises(RunConfigError, match="epochs"):
        _config(tiny_model_dir, tiny_data, tmp_path / "x", epochs=0)


@pytest.mark.integration
def test_sft_run(tmp_path, tiny_model_dir, tiny_data):
    out = tmp_path / "sft"
    summary = run_train(_config(tiny_model_dir, tiny_data, out, task="sft", seq_len=128, max_steps=4), quiet=True)
    assert summary["completed"] and math.isfinite(summary["eval_loss"]) and summary["data"]["template"] == "builtin"
    records = _records(out / "metrics.jsonl")
    assert all(r["mlp_omission_rate"] == 0.5 for r in records)
    assert 0 < summary["tokens"] < 4 * 4 * 128  # non-padding tokens only
    assert (out / "final" / "tokenizer.json").is_file()


@pytest.mark.integration
def test_compare_at_rate_zero_is_dense_exactly(tmp_path, tiny_model_dir, tiny_data):
    out = tmp_path / "cmp"
    cfg = _config(tiny_model_dir, tiny_data, out, max_steps=4, **{"sat.omission_rate": 0.0})
    result = run_compare(cfg, quiet=True)
    for name in ("compare.json", "compare.png", "dense/summary.json", "sat/summary.json", "dense/final"):
        assert (out / name).exists(), name
    saved = json.loads((out / "compare.json").read_text())
    assert {"dense", "sat", "speedup", "eval_loss_ratio"} <= set(saved)
    assert saved["speedup"] == pytest.approx(saved["sat"]["tokens_per_second"] / saved["dense"]["tokens_per_second"])
    # Same data order and seed: at omission rate 0 the SAT run is the dense run, bit for bit.
    dense, sat = _records(out / "dense" / "metrics.jsonl"), _records(out / "sat" / "metrics.jsonl")
    assert [r["loss"] for r in dense] == [r["loss"] for r in sat]
    assert result["eval_loss_ratio"] == 1.0
    with pytest.raises(RunConfigError, match="already holds a comparison"):
        run_compare(cfg, quiet=True)


def test_output_dir_guards(tmp_path, tiny_model_dir, tiny_data):
    out = tmp_path / "run"
    with pytest.raises(RunConfigError, match="holds no checkpoint"):
        run_train(_config(tiny_model_dir, tiny_data, out, resume=True), quiet=True)
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "metrics.jsonl").write_text("")
    for overwrite in (False, True):  # a folder satlm did not mark is not a run of its own (tests/test_run_dir.py)
        with pytest.raises(RunConfigError, match="is not empty and is not a satlm run"):
            run_train(_config(tiny_model_dir, tiny_data, out, overwrite=overwrite), quiet=True)
    (out / "metrics.jsonl").unlink()
    (out / "notes.txt").unlink()
    run_train(_config(tiny_model_dir, tiny_data, out, max_steps=1), quiet=True)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RunConfigError, match="already holds a run"):
        run_train(_config(tiny_model_dir, tiny_data, out), quiet=True)
    run_train(_config(tiny_model_dir, tiny_data, out, max_steps=1, overwrite=True), quiet=True)
    assert (out / "notes.txt").read_text() == "mine"  # overwrite removes only what a run writes


def test_sat_callback_in_a_plain_trainer(tmp_path, tiny_model_dir, tiny_data):
    """The README path: the user's own Trainer, SAT applied by apply_sat or by the callback."""
    from transformers import AutoTokenizer, Trainer, TrainingArguments

    import satlm

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    data = build_datasets(_config(tiny_model_dir, tiny_data, tmp_path / "unused"), tok)
    for applied in (True, False):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        cfg = sat_config(omission_rate=0.5, schedule="ladder", rungs=2, dense_tail=0.25)
        if applied:
            satlm.apply_sat(model, cfg)
        callback = satlm.SATCallback() if applied else satlm.SATCallback(config=cfg)
        args = TrainingArguments(output_dir=str(tmp_path / f"user{applied}"), max_steps=4, save_steps=4,
                                 per_device_train_batch_size=4, logging_steps=1, report_to="none", use_cpu=True,
                                 disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=data.train, data_collator=data.collator,
                          callbacks=[callback])
        trainer.train()
        logged = [h for h in trainer.state.log_history if "loss" in h]
        assert [h["mlp_omission_rate"] for h in logged] == [0.5, 0.5, 0.25, 0.0]
        assert satlm.sat_state(model)["step"] == 3
        assert (tmp_path / f"user{applied}" / "checkpoint-4" / "sat_state.pt").is_file()


def test_training_arguments_follow_the_config(tiny_model_dir, tiny_data, tmp_path):
    from satlm.app.train import training_arguments

    args = training_arguments(_config(tiny_model_dir, tiny_data, tmp_path, task="sft", warmup=0.25, grad_accum=2),
                              "fp32")
    assert args.train_sampling_strategy == "group_by_length"  # sft: less padding
    assert (args.warmup_steps, args.gradient_accumulation_steps, args.optim) == (2, 2, "adamw_torch_fused")
    args = training_arguments(_config(tiny_model_dir, tiny_data, tmp_path, **{"data.group_by_length": False}), "fp32")
    assert args.train_sampling_strategy == "random" and args.dataloader_drop_last and args.report_to in ([], "none")
    with pytest.raises(RunConfigError, match="trainer_args.fsdpp is not a transformers.TrainingArguments field"):
        training_arguments(_config(tiny_model_dir, tiny_data, tmp_path, **{"trainer_args.fsdpp": "x"}), "fp32")


def test_seq_len_beyond_the_context_and_missing_layers_fail_before_training(tmp_path, tiny_model_dir, tiny_data):
    from satlm.config import SATConfigError

    out = tmp_path / "run"
    with pytest.raises(RunConfigError, match=r"seq_len=256 exceeds the model's context of 128"):
        run_train(_config(tiny_model_dir, tiny_data, out, seq_len=256), quiet=True)
    with pytest.raises(SATConfigError, match=r"sat.layers=\[7\]: layer 7 does not exist"):
        run_train(_config(tiny_model_dir, tiny_data, out, **{"sat.layers": [7]}), quiet=True)
    with pytest.raises(RunConfigError, match="exceeds the model's context"):
        run_compare(_config(tiny_model_dir, tiny_data, out, seq_len=256), quiet=True)
    assert not out.exists()  # nothing written, no run started
