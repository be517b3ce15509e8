"""Data for the recipes: every input form, packing, the held-out split, SFT loss masks, and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_run import make_tokenizer, sentences, write_jsonl

from satlm.errors import DataError
from satlm.recipes.data import (IGNORE_INDEX, SFTCollator, build_datasets, encode_conversation, load_conversations,
                                load_documents, pack_blocks, split_held_out, to_messages)
from satlm.run_config import load_run_config


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


# -- bad input ---------------------------------------------------------------------------------------------
def test_malformed_jsonl_names_the_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "broken\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: malformed JSON"):
        load_documents(path)
    path.write_text('{"text": "ok"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: expected a JSON object"):
        load_documents(path)


@pytest.mark.parametrize("record, fragment", [
    ({"instruction": "x"}, "missing field 'output'"),
    ({"output": "x"}, "missing field 'instruction'"),
    ({"instruction": 3, "output": "x"}, "field 'instruction' must be a string"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "needs a user message followed by an assistant"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0] must be"),
])
def test_sft_missing_or_wrong_fields_name_the_line(tmp_path, record, fragment):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": "a", "output": "b"}, record])
    with pytest.raises(DataError) as e:
        load_conversations(path)
    assert "sft.jsonl:2" in str(e.value) and fragment in str(e.value)


def test_cpt_missing_field_empty_and_missing_data(tmp_path):
    write_jsonl(tmp_path / "x.jsonl", [{"text": "a"}, {"content": "b"}])
    with pytest.raises(DataError, match=r"x\.jsonl:2: missing field 'text'"):
        load_documents(tmp_path / "x.jsonl")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="holds no text"):
        load_documents(tmp_path / "empty.txt")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="holds no data files"):
        load_documents(tmp_path / "empty_dir")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_documents(tmp_path / "latin1.txt")
    cfg = load_run_config(None, [f"data.train={tmp_path / 'missing.jsonl'}"])
    with pytest.raises(DataError, match="missing.jsonl' does not exist"):
        build_datasets(cfg, None)


def test_sft_plain_text_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("just text")
    with pytest.raises(DataError, match="sft data must be records"):
        load_conversations(tmp_path / "notes.txt")


def test_json_list_files_are_read_as_records(tmp_path):
    (tmp_path / "alpaca.json").write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"}]))
    [(where, messages)] = load_conversations(tmp_path / "alpaca.json")
    assert where.endswith("alpaca.json[0]") and messages[1] == {"role": "assistant", "content": "b", "train": True}
