"""Data as users bring it: parquet / arrow / csv files and folders (read through `datasets`), hub names (a clear
error offline), and the SFT formats: alpaca, messages (tool role, content parts), ShareGPT, prompt/completion
(plain and conversational), data.columns, data.train_on. Fixtures are written by the tests."""

from __future__ import annotations

import pytest
from tiny_run import make_tokenizer

from satlm.errors import DataError
from satlm.data import build_datasets, detect_task, load_conversations, load_documents
from satlm.data.formats import to_messages
from satlm.app.run_config import load_run_config

datasets = pytest.importorskip("datasets")

ROWS = [{"instruction": f"say {i}", "input": "", "output": f"number {i} said"} for i in range(12)]


def write(path, rows, kind):
    ds = datasets.Dataset.from_list(rows)
    if kind == "parquet":
        ds.to_parquet(str(path))
    elif kind == "csv":
        ds.to_csv(str(path), index=False)
    else:  # arrow: the file a save_to_disk folder holds
        folder = path.parent / f"{path.stem}-disk"
        ds.save_to_disk(str(folder))
        (folder / next(p.name for p in folder.iterdir() if p.suffix == ".arrow")).rename(path)
    return path


@pytest.mark.parametrize("kind", ["parquet", "arrow", "csv"])
def test_table_files_load_as_records_and_name_their_rows(tmp_path, kind):
    path = write(tmp_path / f"sft.{kind}", ROWS, kind)
    convs = load_conversations(path)
    assert len(convs) == 12 and convs[3][1][1]["content"] == "number 3 said"
    assert convs[0][0] == (f"{path}:2" if kind == "csv" else f"{path}:row 1")
    assert detect_task(path) == "sft"
    bad = write(tmp_path / f"bad.{kind}", [*ROWS[:2], {"instruction": "x", "input": "", "output": None}], kind)
    with pytest.raises(DataError, match=rf"bad\.{kind}:({4 if kind == 'csv' else 'row 3'}): field 'output'"):
        load_conversations(bad)
    docs = write(tmp_path / f"docs.{kind}", [{"text": f"document {i}"} for i in range(3)], kind)
    assert load_documents(docs) == ["document 0", "document 1", "document 2"]


def test_a_folder_of_parquet_files_and_a_parquet_that_is_not_one(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write(folder / "a.parquet", ROWS[:6], "parquet")
    write(folder / "b.parquet", ROWS[6:], "parquet")
    assert len(load_conversations(folder)) == 12
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"junk\.parquet: cannot read it as parquet"):
        load_conversations(tmp_path / "junk.parquet")


def test_hub_name_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_run_config(None, ["task=sft", "data.train=nobody/no-such-dataset", "data.subset=main"])
    with pytest.raises(DataError, match=r"cannot load the hub dataset nobody/no-such-dataset \(main\)\[train\]"):
        build_datasets(cfg, make_tokenizer())
    with pytest.raises(DataError, match="does not exist"):
        build_datasets(load_run_config(None, ["data.train=./missing.jsonl"]), make_tokenizer())


@pytest.mark.parametrize("record, expect", [
    ({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": [
        {"type": "text", "text": "what is "}, {"type": "text", "text": "2+2"}]},
        {"role": "assistant", "content": "call calc"}, {"role": "tool", "content": "4"},
        {"role": "assistant", "content": "4"}]},
     [("system", "be brief", False), ("user", "what is 2+2", False), ("assistant", "call calc", True),
      ("tool", "4", False), ("assistant", "4", True)]),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
     [("user", "hi", False), ("assistant", "hello", True)]),
    ({"prompt": "2+2=", "completion": "4"}, [("user", "2+2=", False), ("assistant", "4", True)]),
    ({"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                 {"role": "user", "content": "c"}], "completion": [{"role": "assistant", "content": "d"}]},
     [("user", "a", False), ("assistant", "b", True), ("user", "c", False), ("assistant", "d", True)]),
])
def test_formats_become_messages(record, expect):
    got = to_messages(record, "x:1")
    assert [(m["role"], m["content"], m["train"]) for m in got] == expect


def test_train_on_last_and_completion_and_columns():
    chat = {"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                       {"role": "user", "content": "c"}], "completion": [{"role": "assistant", "content": "d"}]}
    assert [m["train"] for m in to_messages(chat, "x", train_on="completion")] == [False, False, False, True]
    assert [m["train"] for m in to_messages(chat, "x", train_on="last")] == [False, False, False, True]
    multi = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                          {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    assert [m["train"] for m in to_messages(multi, "x", train_on="last")] == [False, False, False, True]
    mapped = to_messages({"question": "q?", "answer": "a!"}, "x",
                         columns={"instruction": "question", "output": "answer"})
    assert [m["content"] for m in mapped] == ["q?", "a!"]
    with pytest.raises(DataError, match=r"x: not an SFT record.*data.columns"):
        to_messages({"question": "q?"}, "x")
    with pytest.raises(DataError, match=r"x: messages\[0\]\.content\[0\] is a 'image' part"):
        to_messages({"messages": [{"role": "user", "content": [{"type": "image"}]},
                                  {"role": "assistant", "content": "b"}]}, "x")


def test_train_on_decides_which_tokens_carry_the_loss(tmp_path):
    """With train_on=last, the first assistant turn of a two-turn chat has no label; with all, it has."""
    from tiny_run import write_jsonl

    rows = [{"messages": [{"role": "user", "content": "alpha"}, {"role": "assistant", "content": "beta"},
                          {"role": "user", "content": "gamma"}, {"role": "assistant", "content": "delta"}]}] * 4
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    counts = {}
    for train_on in ("all", "last"):
        cfg = load_run_config(None, ["task=sft", f"data.train={path}", f"data.eval={path}", "seq_len=512",
                                     f"data.train_on={train_on}", "data.template=builtin"])
        ex = build_datasets(cfg, make_tokenizer()).train[0]
        counts[train_on] = sum(1 for label in ex["labels"] if label != -100)
    assert counts["last"] < counts["all"]
    with pytest.raises(Exception, match="train_on"):
        load_run_config(None, ["data.train_on=first"])
