"""Data for the recipes: every input form, packing, the held-out split, SFT loss masks, sft examples longer than
seq_len, tokenizers without a pad token, chat templates and the tokenized cache. (Data files that are wrong in
themselves: tests/test_data_files.py.)"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from tiny_run import (data_config, make_tokenizer, run_overrides, sentences, tiny_data, tiny_model_dir,  # noqa: F401
                      write_jsonl)

from satlm.app.run_config import load_run_config
from satlm.data import (IGNORE_INDEX, SFTCollator, build_datasets, encode_conversation, ensure_pad_token,
                        load_documents, pack_blocks, split_held_out, to_messages)
from satlm.errors import DataError, ModelLoadError


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


# -- cpt ---------------------------------------------------------------------------------------------------
def test_cpt_reads_text_files_folders_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("second document")
    write_jsonl(tmp_path / "sub" / "c.jsonl", [{"text": "third"}, {"text": "   "}, {"text": "fourth"}])
    (tmp_path / "weights.bin").write_bytes(b"\xff\xfe")  # not a data file: skipped
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("hidden")
    assert load_documents(tmp_path) == ["first document", "second document", "third", "fourth"]
    assert load_documents(tmp_path / "a.txt") == ["first document"]
    write_jsonl(tmp_path / "d.jsonl", [{"body": "x"}])
    assert load_documents(tmp_path / "d.jsonl", text_field="body") == ["x"]


def test_cpt_reads_a_saved_hf_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["one doc", "two doc"]}),
        "validation": datasets.Dataset.from_dict({"text": ["held"]}),
    }).save_to_disk(str(tmp_path / "ds"))
    assert load_documents(tmp_path / "ds", split="train") == ["one doc", "two doc"]
    assert load_documents(tmp_path / "ds", split="eval") == ["held"]


def test_packing_wraps_documents_and_cuts_fixed_blocks(tok):
    docs = sentences(20)
    blocks = pack_blocks(docs, tok, 16)
    assert blocks.dtype == torch.long and blocks.shape[1] == 16
    stream = []
    for d in docs:
        stream += [tok.bos_token_id, *tok(d, add_special_tokens=False)["input_ids"], tok.eos_token_id]
    assert blocks.shape[0] == len(stream) // 16
    assert blocks.flatten().tolist() == stream[: blocks.numel()]
    with pytest.raises(DataError, match="fewer than one block of seq_len=4096"):
        pack_blocks(["short"], tok, 4096, "tiny.txt")


def test_held_out_split_is_deterministic_and_independent_of_order():
    docs = [f"document number {i}" for i in range(200)]
    train, held = split_held_out(docs, 0.1)
    assert 5 <= len(held) <= 40 and len(train) + len(held) == 200 and not set(train) & set(held)
    train2, held2 = split_held_out(list(reversed(docs)), 0.1)
    assert set(held2) == set(held)
    assert [len(x) for x in split_held_out(["a", "b"], 0.01)] == [1, 1]  # both sides keep something


def test_cpt_build_holds_out_documents_or_the_last_blocks(tmp_path, tok):
    write_jsonl(tmp_path / "train.jsonl", [{"text": s} for s in sentences(80)])
    cfg = load_run_config(None, ["seq_len=16", f"data.train={tmp_path / 'train.jsonl'}", "data.eval_fraction=0.2",
                                 "data.max_eval_samples=null"])
    data = build_datasets(cfg, tok)
    assert data.info["eval_documents"] >= 1 and data.info["train_documents"] + data.info["eval_documents"] == 80
    assert len(data.train) > len(data.eval) > 0
    batch = data.collator([data.train[0], data.train[1]])
    assert batch["input_ids"].shape == (2, 16) and torch.equal(batch["labels"], batch["input_ids"])
    (tmp_path / "one.txt").write_text(" ".join(sentences(40)))  # one document: the last blocks are held out
    data = build_datasets(load_run_config(None, ["seq_len=16", f"data.train={tmp_path / 'one.txt'}"]), tok)
    assert len(data.train) > 0 and len(data.eval) >= 1


# -- sft ---------------------------------------------------------------------------------------------------
def _trained_text(tok, example):
    return tok.decode([i for i, l in zip(example["input_ids"], example["labels"]) if l != IGNORE_INDEX])


def test_alpaca_loss_is_on_the_response_and_eos_only(tok):
    messages = to_messages({"instruction": "Say it.", "input": "the model", "output": "the model reads"}, "x:1")
    assert messages[0]["content"] == "Say it.\n\nthe model"
    ex = encode_conversation(messages, tok, 64, chat=False)
    assert len(ex["input_ids"]) == len(ex["labels"]) <= 64
    assert _trained_text(tok, ex) == "the model reads</s>"
    assert tok.decode(ex["input_ids"]).startswith("<s>### Instruction:\nSay it.")


def test_chat_messages_with_the_builtin_and_the_tokenizer_template(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the loss"},
                {"role": "assistant", "content": "falls"}, {"role": "user", "content": "and then"},
                {"role": "assistant", "content": "slowly"}]
    ex = encode_conversation(messages, tok, 128, chat=False)
    assert _trained_text(tok, ex) == "falls</s>slowly</s>"
    tok2 = make_tokenizer()
    tok2.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                          "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    ex = encode_conversation(messages, tok2, 128, chat=True)
    assert _trained_text(tok2, ex) == "falls</s>slowly</s>"
    assert tok2.decode(ex["input_ids"]).startswith("<|system|>Be brief.</s><|user|>the loss</s><|assistant|>")


def test_truncation_that_cuts_every_response_token_drops_the_example(tok):
    messages = [{"role": "user", "content": " ".join(sentences(5))}, {"role": "assistant", "content": "yes"}]
    assert encode_conversation(messages, tok, 16, chat=False) is None
    assert encode_conversation(messages, tok, 512, chat=False) is not None


def test_sft_collator_pads_right_and_masks_padding():
    batch = SFTCollator(pad_token_id=3)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                                         {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 3, 3]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_sft_build_with_a_held_out_split(tmp_path, tok):
    rows = [{"instruction": "Repeat.", "input": s, "output": s} for s in sentences(40, words=5)]
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    data = build_datasets(load_run_config(None, ["task=sft", "seq_len=64", f"data.train={path}"]), tok)
    assert data.info["template"] == "builtin" and len(data.train) + len(data.eval) == 40 and len(data.eval) >= 1
    batch = data.collator([data.train[i] for i in range(4)])
    assert (batch["labels"] != IGNORE_INDEX).any() and (batch["labels"] == IGNORE_INDEX).any()


# -- sft examples longer than seq_len ----------------------------------------------------------------------
def _long_sft(tmp_path):
    rows = [{"instruction": "Say.", "output": "yes"}, {"instruction": "Repeat.", "output": " ".join(sentences(20))},
            {"instruction": " ".join(sentences(20)), "output": "no"}, {"instruction": "Again.", "output": "ok"}]
    return write_jsonl(tmp_path / "sft.jsonl", rows)


def test_sft_truncation_error_names_the_first_long_example(tmp_path, tok):
    path = _long_sft(tmp_path)
    with pytest.raises(DataError) as e:
        build_datasets(data_config("sft", path, path, "seq_len=48", "data.truncation=error"), tok)
    assert f"{path}:2: example is longer than seq_len=48" in str(e.value)
    assert "data.truncation=truncate" in str(e.value)


def test_sft_truncation_warns_once_with_counts(tmp_path, tok):
    path = _long_sft(tmp_path)
    short_eval = write_jsonl(tmp_path / "eval.jsonl", [{"instruction": "Say.", "output": "yes"}])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = build_datasets(data_config("sft", path, short_eval, "seq_len=48"), tok)
    messages = [str(w.message) for w in caught if "seq_len" in str(w.message)]
    assert messages == [f"{path}: 2 of 4 sft examples are longer than seq_len=48: 1 truncated, 1 dropped "
                        "(truncation left no response token); raise seq_len to keep them whole, or set "
                        "data.truncation=error to stop on the first"], messages
    assert len(data.train) == 3 and data.info["dropped_examples"] == 1 and data.info["truncated_examples"] == 1
    assert str(short_eval) not in " ".join(messages)  # nothing to say about the eval data


def test_sft_every_example_dropped_is_an_error(tmp_path, tok):
    rows = [{"instruction": " ".join(sentences(10)), "output": "no"} for _ in range(3)]
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    with pytest.raises(DataError, match=r"sft\.jsonl: no example keeps a response token within seq_len=16 "
                                        r"\(3 of 3 dropped"):
        build_datasets(data_config("sft", path, path, "seq_len=16"), tok)


# -- a tokenizer without a pad token -----------------------------------------------------------------------
def _strip_tokens(tok, *names):
    for name in names:
        setattr(tok, name, None)
    return tok


def test_pad_falls_back_to_eos_then_unk_then_errors():
    tok = _strip_tokens(make_tokenizer(), "pad_token")
    ensure_pad_token(tok)
    assert tok.pad_token == "</s>" and tok.pad_token_id == tok.eos_token_id
    tok = _strip_tokens(make_tokenizer(), "pad_token", "eos_token")
    ensure_pad_token(tok)
    assert tok.pad_token == "<unk>"
    tok = _strip_tokens(make_tokenizer(), "pad_token", "eos_token", "unk_token")
    with pytest.raises(ModelLoadError, match="no pad, eos or unk token to pad sft batches"):
        ensure_pad_token(tok)


@pytest.fixture(scope="module")
def no_pad_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with pad_token removed from its tokenizer files and config."""
    out = tmp_path_factory.mktemp("nopad") / "model"
    shutil.copytree(tiny_model_dir, out)
    for name in ("tokenizer_config.json", "special_tokens_map.json", "config.json"):
        path = out / name
        if path.is_file():
            data = json.loads(path.read_text())
            data.pop("pad_token", None)
            data.pop("pad_token_id", None)
            path.write_text(json.dumps(data))
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).pad_token is None
    return out


@pytest.mark.integration
@pytest.mark.parametrize("task", ["sft", "cpt"])
def test_training_with_a_tokenizer_without_pad(tmp_path, no_pad_model_dir, tiny_data, task):
    from satlm.app.train import run_train

    over = run_overrides(no_pad_model_dir, tiny_data, tmp_path / "run", task=task, max_steps=2,
                         seq_len=128 if task == "sft" else 32)
    summary = run_train(load_run_config(None, over), quiet=True)
    assert summary["completed"] and math.isfinite(summary["eval_loss"])


def test_sft_data_with_a_tokenizer_without_pad_eos_or_unk(tmp_path, tiny_data):
    tok = _strip_tokens(make_tokenizer(), "pad_token", "eos_token", "unk_token")
    with pytest.raises(ModelLoadError, match="no pad, eos or unk token"):
        build_datasets(data_config("sft", tiny_data["sft_train"], tiny_data["sft_eval"]), tok)
    data = build_datasets(data_config("cpt", tiny_data["cpt_train"], tiny_data["cpt_eval"]), tok)  # cpt never pads
    assert len(data.train) > 0


# -- chat templates: rendered once, the trained spans found in the render ------------------------------------
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
DEFAULT_SYSTEM = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant."
                  "<|im_end|>\n{% endif %}" + CHATML)
# Qwen3-like: an earlier assistant turn's reasoning is dropped from the render, the last turn keeps it, so the
# render of the first turns is not a prefix of the whole render.
DROPS_REASONING = (
    "{% for m in messages %}{% set c = m['content'] %}"
    "{% if m['role'] == 'assistant' and not loop.last and '</think>' in c %}"
    "{% set c = c.split('</think>')[-1].lstrip() %}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ c }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MARKED = ("{% for m in messages %}{% if m['role'] == 'assistant' %}<|im_start|>assistant\n{% generation %}"
          "{{ m['content'] }}<|im_end|>{% endgeneration %}\n{% else %}<|im_start|>{{ m['role'] }}\n"
          "{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}")
TURNS = [{"role": "user", "content": "the loss"}, {"role": "assistant", "content": "falls"},
         {"role": "user", "content": "and then"}, {"role": "assistant", "content": "slowly"}]


def _templated(template):
    tok = make_tokenizer()
    tok.chat_template = template
    return tok


def _trained_runs(tok, example):
    """The trained tokens as texts, one per contiguous run: an independent reading of the labels."""
    runs, run = [], []
    for i, label in zip(example["input_ids"], example["labels"]):
        if label != IGNORE_INDEX:
            run.append(i)
        elif run:
            runs, run = runs + [tok.decode(run)], []
    return runs + ([tok.decode(run)] if run else [])


@pytest.mark.parametrize("template", [CHATML, DEFAULT_SYSTEM, MARKED], ids=["chatml", "default-system", "marked"])
def test_chat_template_trains_each_answer_and_its_end_of_turn(template):
    tok = _templated(template)
    ex = encode_conversation(TURNS, tok, 256, chat=True)
    assert _trained_runs(tok, ex) == ["falls<|im_end|>", "slowly<|im_end|>"]
    # the ids are the template's own tokenization of the one render
    assert ex["input_ids"] == tok.apply_chat_template(TURNS, tokenize=True, return_dict=True)["input_ids"]
    if template is DEFAULT_SYSTEM:
        assert tok.decode(ex["input_ids"]).startswith("<|im_start|>system\nYou are a helpful assistant.")
    last = [dict(m, train=m["content"] == "slowly") for m in TURNS]  # data.train_on=last
    assert _trained_runs(tok, encode_conversation(last, tok, 256, chat=True)) == ["slowly<|im_end|>"]


def test_chat_template_that_drops_earlier_reasoning():
    tok = _templated(DROPS_REASONING)
    turns = [{"role": "user", "content": "two plus two"},
             {"role": "assistant", "content": "<think>add them</think>\n\nfour"},
             {"role": "user", "content": "and three more"},
             {"role": "assistant", "content": "<think>four and three</think>\n\nseven"}]
    ex = encode_conversation(turns, tok, 256, chat=True)
    text = tok.decode(ex["input_ids"])
    assert "add them" not in text and "four and three" in text  # what the template renders is what is trained
    assert _trained_runs(tok, ex) == ["four<|im_end|>", "<think>four and three</think>\n\nseven<|im_end|>"]


def test_an_answer_that_repeats_the_question_is_found_in_its_own_turn():
    tok = _templated(CHATML)
    turns = [{"role": "user", "content": "yes"}, {"role": "assistant", "content": "yes"}]
    ex = encode_conversation(turns, tok, 256, chat=True)
    assert _trained_runs(tok, ex) == ["yes<|im_end|>"]
    first_trained = next(k for k, label in enumerate(ex["labels"]) if label != IGNORE_INDEX)
    assert tok.decode(ex["input_ids"][:first_trained]).endswith("<|im_start|>assistant\n")


def test_a_template_that_rewrites_the_answer_is_refused():
    tok = _templated(CHATML.replace("{{ m['content'] }}", "{{ m['content'] | upper }}"))
    with pytest.raises(DataError, match=r"x\.jsonl:3: the chat template does not render assistant turn 1"):
        encode_conversation(TURNS, tok, 256, chat=True, where="x.jsonl:3")


def test_chat_truncation_counts_only_lost_trained_tokens():
    tok = _templated(CHATML)
    full = encode_conversation(TURNS, tok, 256, chat=True)
    n = len(full["input_ids"])
    tail = full["labels"][-1] == IGNORE_INDEX  # the "\n" after the last <|im_end|>: untrained
    assert tail and encode_conversation(TURNS, tok, n - 1, chat=True, truncation="error")["labels"] == \
        full["labels"][: n - 1]
    with pytest.raises(DataError, match="longer than seq_len"):
        encode_conversation(TURNS, tok, n - 3, chat=True, truncation="error")


# -- tokenize once: the on-disk cache ------------------------------------------------------------------------
def _rows(ds):
    return [{k: torch.as_tensor(v).tolist() for k, v in ds[i].items() if k != "examples"} for i in range(len(ds))]


@pytest.mark.parametrize("task,packing", [("cpt", False), ("sft", False), ("sft", True)])
def test_tokenized_cache_is_built_once_then_read_memory_mapped(tmp_path, tok, monkeypatch, task, packing):
    import numpy as np

    from satlm.data import datasets as data_mod

    if task == "cpt":
        path = write_jsonl(tmp_path / "d.jsonl", [{"text": s} for s in sentences(60)])
    else:
        path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Repeat.", "input": s, "output": s}
                                                  for s in sentences(40, words=4)])
    over = [f"task={task}", "seq_len=64", f"data.train={path}", f"data.cache_dir={tmp_path / 'cache'}",
            f"data.packing={str(packing).lower()}"]
    plain = build_datasets(load_run_config(None, over + ["data.cache=false"]), tok)
    first = build_datasets(load_run_config(None, over), tok)
    assert first.info["tokenized_cache"] == "built"
    monkeypatch.setattr(data_mod, "_build_in_memory", lambda *a: pytest.fail("tokenized again"))
    second = build_datasets(load_run_config(None, over), tok)
    assert second.info["tokenized_cache"] == "read" and second.info["train_tokens"] == plain.info["train_tokens"]
    for got, want in ((first.train, plain.train), (second.train, plain.train), (second.eval, plain.eval)):
        assert _rows(got) == _rows(want)
    ids = np.load(Path(second.info["tokenized_cache_dir"]) / "train_ids.npy", mmap_mode="r")
    assert isinstance(ids, np.memmap) and ids.dtype == np.uint16  # a 320-token vocabulary fits in 16 bits
    batch = second.collator([second.train[0], second.train[1]])
    assert torch.equal(batch["labels"], plain.collator([plain.train[0], plain.train[1]])["labels"])
    monkeypatch.undo()
    with open(path, "a") as f:  # the data changed: tokenized again
        f.write(json.dumps({"text": "one more", "instruction": "x", "output": "y"}) + "\n")
    assert build_datasets(load_run_config(None, over), tok).info["tokenized_cache"] == "built"
    assert build_datasets(load_run_config(None, over + ["seq_len=56"]), tok).info["tokenized_cache"] == "built"
    builds = (tmp_path / "cache" / "tokenized" / "builds.log").read_text().splitlines()
    assert len(builds) == 3
