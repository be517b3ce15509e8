"""Tiny runs for the recipe tests: a 2-layer Llama and a BPE tokenizer built here (no downloads), small CPT / SFT
data sets written to a temporary folder, callbacks that stop or poison a run, and `satlm train` in a child
process."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

WORDS = ("the model reads text and learns which heads and channels matter for each step of training "
         "sparse layers omit units while dense layers keep every unit so the loss falls slowly then fast "
         "python code has functions classes and docstrings that explain what a function returns").split()


def sentences(n: int, seed: int = 0, words: int = 12) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "." for _ in range(n)]


def make_tokenizer(vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(sentences(300) + ["### Instruction:\n### Response:\n"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def make_model_dir(path: Path, seed: int = 0, arch: str = "llama") -> Path:
    """A saved tiny causal LM plus tokenizer: 2 layers, d=64, 4 heads / 2 KV heads, vocab ~320."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    torch.manual_seed(seed)
    if arch == "gpt2":  # an architecture SAT does not support
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=64))
    else:
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
        model = LlamaForCausalLM(cfg)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_data(root: Path) -> dict[str, Path]:
    """cpt_train/cpt_eval (field text) and sft_train/sft_eval (Alpaca and chat records)."""
    root.mkdir(parents=True, exist_ok=True)
    docs = [" ".join(sentences(6, seed=i)) for i in range(60)]
    pairs = [{"instruction": "Repeat the sentence.", "input": s, "output": s} for s in sentences(48, seed=7, words=5)]
    chats = [{"messages": [{"role": "user", "content": s}, {"role": "assistant", "content": s.upper()}]}
             for s in sentences(8, seed=9, words=5)]
    return {
        "cpt_train": write_jsonl(root / "cpt_train.jsonl", [{"text": d} for d in docs[:50]]),
        "cpt_eval": write_jsonl(root / "cpt_eval.jsonl", [{"text": d} for d in docs[50:]]),
        "sft_train": write_jsonl(root / "sft_train.jsonl", pairs[:40] + chats),
        "sft_eval": write_jsonl(root / "sft_eval.jsonl", pairs[40:]),
    }


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    return write_data(tmp_path_factory.mktemp("data"))


def run_overrides(model_dir: Path, data: dict[str, Path], out: Path, task: str = "cpt", **extra) -> list[str]:
    """key=value overrides of a fast tiny run (fp32 CPU, seq 32, a handful of steps)."""
    base = {
        "task": task, "model": str(model_dir), "output_dir": str(out), "max_steps": 6, "batch_size": 4,
        "seq_len": 32, "lr": 3e-3, "warmup": 0, "save_steps": 0, "logging_steps": 1, "precision": "fp32",
        "progress": False, "tensorboard": False, "data.train": str(data[f"{task}_train"]),
        "data.eval": str(data[f"{task}_eval"]), "data.max_eval_samples": 16,
        "sat.omission_rate": 0.5, "sat.schedule": "constant",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def data_config(task: str, train, eval_=None, *extra: str):
    """A run config of `task` on the data files train (and eval_), seq_len 128 for sft and 16 for cpt, plus extra
    key=value overrides."""
    from satlm.app.run_config import load_run_config

    over = [f"task={task}", f"data.train={train}", "seq_len=128" if task == "sft" else "seq_len=16"]
    if eval_ is not None:
        over.append(f"data.eval={eval_}")
    return load_run_config(None, over + list(extra))


class StopAt(TrainerCallback):
    """Stops training after `step` optimizer steps, as an interruption would (after that step's checkpoint)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


class Poison(TrainerCallback):
    """Makes the training loss of `loss_steps` (1-based) `value`, and one gradient of `grad_steps` inf; keeps
    the weights after every step."""

    def __init__(self, loss_steps=(), grad_steps=(), value=float("nan")):
        self.loss_steps, self.grad_steps, self.value = set(loss_steps), set(grad_steps), value
        self.weights: dict[int, list[torch.Tensor]] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model, self.state = model, state
        model.register_forward_hook(self._loss)  # before the guard's hook: it sees the poisoned loss

    def _loss(self, module, inputs, output):
        if module.training and self.state.global_step + 1 in self.loss_steps:
            output["loss"] = output["loss"] * self.value
        return output

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 in self.grad_steps:
            next(p for p in model.parameters() if p.grad is not None).grad[0] = float("inf")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = [p.detach().clone() for p in model.parameters()]

    def finite(self) -> bool:
        return all(bool(p.isfinite().all()) for p in self.model.parameters())


def start_train(config_path, out, *extra: str, hook: str, threads: int) -> subprocess.Popen:
    """`satlm train CONFIG output_dir=OUT EXTRA...` in a child process on `threads` threads, with the test hook
    `hook` (SATLM_TEST_HOOK: e.g. step-sleep:0.3 sleeps after each step, pause-save:N stops inside a save)."""
    env = {**os.environ, "SATLM_TEST_HOOK": hook, "OMP_NUM_THREADS": str(threads)}
    return subprocess.Popen([sys.executable, "-m", "satlm.cli", "train", str(config_path), f"output_dir={out}",
                             *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(proc: subprocess.Popen, ready, what: str, timeout: float = 120):
    """Waits until ready() while the child runs; fails naming `what` if it exits first or the timeout passes."""
    end = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"satlm train exited ({proc.returncode}) before {what}: {proc.communicate()}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
