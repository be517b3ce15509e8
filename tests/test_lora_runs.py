"""LoRA through the CLI and the Trainer: the `lora:` section, checkpoints in peft's format, exact resume, final/
with the adapter and a merged plain model, and TRL's SFTTrainer with SATCallback, with and without LoRA."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import sat_config
from tiny_run import StopAt, run_overrides, tiny_data, tiny_model_dir  # noqa: F401  (fixtures)

from satlm.errors import RunConfigError
from satlm.app.train import run_train
from satlm.app.run_config import load_run_config

peft = pytest.importorskip("peft")


def _config(model_dir, data, out, task="cpt", **extra):
    return load_run_config(None, run_overrides(model_dir, data, out, task=task, **extra))


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_lora_section_keys_and_errors(tmp_path):
    cfg = load_run_config(None, ["lora.r=16"])
    assert cfg.lora.enabled and cfg.lora.r == 16 and cfg.lora.target_modules == "all-linear"
    assert cfg.lora.peft_config().lora_alpha == 32  # alpha null: 2 r
    assert not load_run_config(None, []).lora.enabled
    cfg = load_run_config(None, ["lora.r=8", "lora.target_modules=[q_proj, v_proj]", "lora.use_rslora=true",
                                 "lora.modules_to_save=[lm_head]", "lora.alpha=4", "lora.dropout=0.1"])
    p = cfg.lora.peft_config()
    assert set(p.target_modules) == {"q_proj", "v_proj"} and p.use_rslora and p.lora_alpha == 4
    for bad, match in (("lora.r=0", "lora.r"), ("lora.dropout=1.5", "lora.dropout"),
                       ("lora.target_modules=[]", "lora.target_modules"), ("lora.rank=4", "unknown config key")):
        with pytest.raises(RunConfigError, match=match):
            load_run_config(None, [bad])


@pytest.mark.integration
@pytest.mark.parametrize("task", ["cpt", "sft"])
def test_lora_run_saves_adapter_and_merged_model_and_resumes_exactly(tmp_path, tiny_model_dir, tiny_data, task):
    from transformers import AutoModelForCausalLM

    extra = {"max_steps": 6, "save_steps": 3, "lora.r": 4, "sat.rungs": 2,
             "seq_len": 32 if task == "cpt" else 128, "lr": 5e-3}
    straight = run_train(_config(tiny_model_dir, tiny_data, tmp_path / "a", task, **extra), quiet=True)
    stopped = run_train(_config(tiny_model_dir, tiny_data, tmp_path / "b", task, **extra), callbacks=[StopAt(3)],
                        quiet=True)
    assert not stopped["completed"]
    ckpt = tmp_path / "b" / "checkpoint-3"
    assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "sat_state.pt").is_file()
    resumed = run_train(_config(tiny_model_dir, tiny_data, tmp_path / "b", task, resume=True, **extra), quiet=True)
    a, b = _records(tmp_path / "a" / "metrics.jsonl"), _records(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-5), ra["step"]
    assert resumed["eval_loss"] == pytest.approx(straight["eval_loss"], abs=1e-5)

    final = tmp_path / "a" / "final"
    adapter = peft.PeftConfig.from_pretrained(str(final / "adapter"))
    assert adapter.r == 4 and (final / "adapter" / "adapter_model.safetensors").is_file()
    merged = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)  # plain transformers
    assert type(merged).__name__ == "LlamaForCausalLM" and not any("lora" in n for n, _ in merged.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with_adapter = peft.PeftModel.from_pretrained(base, str(final / "adapter"))  # plain peft
    ids = torch.arange(3, 19)[None]
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, with_adapter(ids).logits, atol=1e-4)
        trained = merged.model.layers[0].self_attn.q_proj.weight
        assert not torch.allclose(trained, base.model.layers[0].self_attn.q_proj.base_layer.weight)


def _sft_dataset():
    from datasets import Dataset
    from tiny_run import sentences

    return Dataset.from_dict({"text": sentences(64, seed=4, words=20)})


@pytest.mark.integration
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_trl_sft_trainer_with_sat_callback(tmp_path, tiny_model_dir, lora):
    trl = pytest.importorskip("trl")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import satlm

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    satlm.apply_sat(model, sat_config(omission_rate=0.5, schedule="ladder", rungs=2, dense_tail=0.25))
    args = trl.SFTConfig(output_dir=str(tmp_path / "trl"), max_steps=4, per_device_train_batch_size=4,
                         logging_steps=1, report_to="none", use_cpu=True, disable_tqdm=True, max_length=32,
                         save_strategy="no", learning_rate=5e-3)
    peft_config = peft.LoraConfig(r=4, target_modules="all-linear") if lora else None
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=_sft_dataset(), processing_class=tok,
                             callbacks=[satlm.SATCallback()], peft_config=peft_config)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["mlp_omission_rate"] for h in logged] == [0.5, 0.5, 0.25, 0.0]
    changed = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    if lora:  # SFTTrainer put LoRA around SAT's projections: every adapter trained, no base weight
        assert changed and all("lora_" in n for n in changed)
        assert len(changed) == len(before)
    else:
        assert any("mlp.gate_proj" in n for n in changed)
    assert satlm.sat_state(trainer.model)["step"] == 3
