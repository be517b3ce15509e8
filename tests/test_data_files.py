"""Data files as satlm's readers meet them, and each way one can be wrong: malformed JSON, missing or empty data,
empty files, binary and non-UTF-8 text, lone surrogate escapes, JSONL lines that are not objects, missing or null
fields, sft data that is not records, huge lines; a UTF-8 BOM is dropped and JSON list files are read as records.
Each failure is a DataError whose message names the file (and line) and what is allowed."""

from __future__ import annotations

import json
import random
import time

import pytest
from tiny_run import data_config, make_tokenizer, sentences, tiny_data, write_jsonl  # noqa: F401 (fixtures)

from satlm.app.run_config import load_run_config
from satlm.data import build_datasets, load_conversations, load_documents
from satlm.errors import DataError


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _build(task, path, split, tiny_data, tok):
    """build_datasets with `path` as the train or the eval data (the other side is good data)."""
    if split == "train":
        return build_datasets(data_config(task, path, tiny_data[f"{task}_eval"]), tok)
    return build_datasets(data_config(task, tiny_data[f"{task}_train"], path), tok)


# -- malformed records, missing fields, missing data -------------------------------------------------------
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


# -- empty files -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["cpt", "sft"])
@pytest.mark.parametrize("split", ["train", "eval"])
@pytest.mark.parametrize("name, content", [
    ("zero.jsonl", b""), ("blank.jsonl", b"\n\n   \n\t\n"), ("zero.txt", b""), ("spaces.txt", b"  \n\t\n "),
])
def test_empty_files_name_the_file(tmp_path, tiny_data, tok, task, split, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as e:
        _build(task, path, split, tiny_data, tok)
    assert str(path) in str(e.value)
    expected = "holds no text" if task == "cpt" else ("holds no examples" if name.endswith(".jsonl") else "JSONL")
    assert expected in str(e.value)


# -- binary and non-UTF-8 text -----------------------------------------------------------------------------
def _random_bytes(n=4096, seed=0):
    rng = random.Random(seed)
    return bytes(rng.randrange(1, 256) for _ in range(n))  # no NUL, so the UTF-8 check is what fires


@pytest.mark.parametrize("task", ["cpt", "sft"])
@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
@pytest.mark.parametrize("content, line, fragment", [
    (b"\0" * 64, 1, "NUL byte"),
    (b'{"text": "ok", "instruction": "a", "output": "b"}\n\n' + b"\0\0\0\n", 3, "NUL byte"),
    (_random_bytes(), 1, "not UTF-8 text"),
    ('{"text": "ok", "instruction": "a", "output": "b"}\n{"text": "caf\xe9", "instruction": "a", "output": "b"}\n'
     .encode("latin-1"), 2, "not UTF-8 text (byte 0xe9)"),
])
def test_binary_and_non_utf8_files_name_the_file_and_line(tmp_path, tiny_data, tok, task, suffix, content, line,
                                                          fragment):
    path = tmp_path / f"data{suffix}"
    path.write_bytes(content)
    with pytest.raises(DataError) as e:
        _build(task, path, "train", tiny_data, tok)
    assert f"{path}:{line}:" in str(e.value) and fragment in str(e.value)


def test_a_utf8_bom_is_dropped(tmp_path, tok):
    bom = "\ufeff".encode("utf-8")
    (tmp_path / "a.txt").write_bytes(bom + "first document".encode("utf-8"))
    write_jsonl(tmp_path / "b.jsonl", [{"text": "second"}])
    (tmp_path / "b.jsonl").write_bytes(bom + (tmp_path / "b.jsonl").read_bytes())
    assert load_documents(tmp_path) == ["first document", "second"]
    sft = tmp_path / "sft.jsonl"
    sft.write_bytes(bom + json.dumps({"instruction": "Say.", "output": "yes"}).encode("utf-8") + b"\n")
    [(where, messages)] = load_conversations(sft)
    assert where == f"{sft}:1" and messages[0]["content"] == "Say."


def test_a_lone_surrogate_escape_names_the_line_and_field(tmp_path):
    """JSON may escape half a surrogate pair (\\ud800); Python reads it, no tokenizer accepts it."""
    path = tmp_path / "s.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "a\\udc00b"}\n')
    with pytest.raises(DataError, match=r"s\.jsonl:2: field 'text' holds an unpaired surrogate \(\\udc00"):
        load_documents(path)
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "b\\ud800"}\n')
    with pytest.raises(DataError, match=r"s\.jsonl:2: field 'output' holds an unpaired surrogate"):
        load_conversations(path)
    path.write_text('{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "b"}]}\n')
    with pytest.raises(DataError, match=r"s\.jsonl:1: field 'messages\[0\].content' holds an unpaired surrogate"):
        load_conversations(path)


# -- JSONL lines that are not objects ----------------------------------------------------------------------
@pytest.mark.parametrize("task", ["cpt", "sft"])
@pytest.mark.parametrize("line, kind", [("3", "int"), ("2.5", "float"), ("[1, 2]", "list"), ('"text"', "str"),
                                        ("null", "null"), ("true", "bool")])
def test_a_jsonl_line_that_is_not_an_object_names_file_and_line(tmp_path, tiny_data, tok, task, line, kind):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"text": "ok", "instruction": "a", "output": "b"}) + f"\n\n{line}\n")
    with pytest.raises(DataError) as e:
        _build(task, path, "train", tiny_data, tok)
    assert f"{path}:3: expected a JSON object" in str(e.value) and f"got {kind}" in str(e.value)


@pytest.mark.parametrize("record, fragment", [
    ({"instruction": None, "output": "b"}, "field 'instruction' must be a string, got null"),
    ({"instruction": "a", "output": None}, "field 'output' must be a string, got null"),
    ({"instruction": "a", "input": 3, "output": "b"}, "field 'input' must be a string or null, got int"),
])
def test_sft_null_fields_name_the_line(tmp_path, record, fragment):  # found by tests/test_properties.py
    path = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": "a", "input": None, "output": "b"}, record])
    with pytest.raises(DataError) as e:
        load_conversations(path)
    assert f"{path}:2: {fragment}" in str(e.value)


def test_a_json_list_file_with_a_record_that_is_not_an_object(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, None]))
    with pytest.raises(DataError, match=r"x\.json: record 1 is null, expected a JSON object"):
        load_conversations(path)


# -- huge lines --------------------------------------------------------------------------------------------
def test_a_5mb_cpt_line_is_packed_in_linear_time(tmp_path, tok):
    text = " ".join(sentences(400))
    doc = (text * (5_000_000 // len(text) + 1))[:5_000_000]
    path = write_jsonl(tmp_path / "huge.jsonl", [{"text": doc}])
    start = time.perf_counter()
    data = build_datasets(data_config("cpt", path, None, "seq_len=64"), tok)
    seconds = time.perf_counter() - start
    tokens = len(data.train) * 64 + len(data.eval) * 64
    assert tokens > 1_000_000 and len(data.eval) >= 1  # one document: its last blocks are held out
    assert seconds < 60, seconds  # ~6 s on two shared cores; a quadratic reader or packer takes minutes


def test_a_1mb_sft_response_is_truncated_quickly(tmp_path, tok):
    text = " ".join(sentences(100))
    response = (text * (1_000_000 // len(text) + 1))[:1_000_000]
    rows = [{"instruction": "Repeat.", "output": s} for s in sentences(6, words=4)]
    rows.append({"instruction": "Write a lot.", "output": response})
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    start = time.perf_counter()
    with pytest.warns(UserWarning, match=r"sft\.jsonl: 1 of 7 sft examples are longer than seq_len=64: 1 truncated"):
        data = build_datasets(data_config("sft", path, path, "seq_len=64", "data.max_eval_samples=1"), tok)
    assert time.perf_counter() - start < 20
    assert max(len(data.train[i]["input_ids"]) for i in range(len(data.train))) == 64
    assert data.info["truncated_examples"] == 1 and data.info["dropped_examples"] == 0
