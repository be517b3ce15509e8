"""The stdlib corpus (splits, docstring stripping, prose, SFT pairs, demo files) and the shipped base model."""

import ast
import json

import pytest
import torch

from satlm.assets import base_model_path
from satlm.data import corpus

DOC_OWNERS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def docstrings_in(source: str) -> list[str]:
    return [d for n in ast.walk(ast.parse(source)) if isinstance(n, DOC_OWNERS) and (d := ast.get_docstring(n))]


# --- splits


def test_split_is_a_stable_hash_of_the_relative_path():
    # Fixed answers: a change to the hash (or a switch to the salted builtin hash()) moves files between splits.
    assert corpus.split_of("fnmatch.py") == "eval"
    assert corpus.split_of("os.py") == "train"
    assert corpus.split_of(corpus.stdlib_root() / "fnmatch.py") == "eval"
    assert [corpus.split_of(p) for p in corpus.stdlib_files()] == [corpus.split_of(p) for p in corpus.stdlib_files()]


def test_files_are_sorted_and_skip_tests_and_tools():
    files = corpus.stdlib_files()
    relative = [p.relative_to(corpus.stdlib_root()) for p in files]
    assert len(files) > 300
    assert [r.as_posix() for r in relative] == sorted(r.as_posix() for r in relative)
    assert not any(set(r.parts) & {"test", "tests", "idlelib", "turtledemo", "site-packages"} for r in relative)
    share = sum(corpus.split_of(p) == "eval" for p in files) / len(files)
    assert 0.02 < share < 0.10


def test_split_argument_is_checked():
    with pytest.raises(ValueError, match="split"):
        corpus.code_texts("validation")


# --- code domain


def test_strip_docstrings_removes_every_docstring_and_keeps_code():
    source = (
        '"""Module doc."""\n'
        "import os\n"
        "class Error(Exception):\n"
        '    """Only a docstring: the body must become pass."""\n'
        "def f(x):  # ünïcödé before the docstring shifts byte offsets\n"
        '    """Doc of f,\n    over two lines."""\n'
        '    s = "not a docstring"\n'
        "    return s\n"
        'def g(): "one-line def"\n'
        "async def h():\n"
        "    '''h'''\n"
        "    return 1\n"
    )
    stripped = corpus.strip_docstrings(source)
    assert docstrings_in(stripped) == []
    assert "Doc of f" not in stripped and "Module doc" not in stripped
    assert '"not a docstring"' in stripped and "ünïcödé" in stripped
    namespace = {}
    exec(compile(stripped, "<stripped>", "exec"), namespace)
    assert namespace["f"](1) == "not a docstring" and namespace["g"]() is None
    assert issubclass(namespace["Error"], Exception)


def test_code_texts_have_no_docstrings_and_still_parse():
    texts = corpus.code_texts("eval")
    assert len(texts) > 10
    for text in texts:
        assert docstrings_in(text) == []


def test_code_of_train_and_eval_come_from_disjoint_files():
    files = corpus.stdlib_files()
    train = [p for p in files if corpus.split_of(p) == "train"]
    evals = [p for p in files if corpus.split_of(p) == "eval"]
    assert set(train).isdisjoint(evals)
    assert len(corpus.code_texts("train")) == len(train) and len(corpus.code_texts("eval")) == len(evals)


# --- prose domain and SFT pairs


def test_prose_texts_are_long_english_and_eval_is_unseen():
    train, evals = corpus.prose_texts("train"), corpus.prose_texts("eval")
    assert len(train) > 1000 and len(evals) > 50
    assert all(len(t.split()) >= corpus.PROSE_MIN_WORDS for t in train + evals)
    assert set(train).isdisjoint(evals)
    from pydoc_data.topics import topics

    assert set(t.strip() for t in topics.values()) & set(train + evals)  # pydoc topics are in


def test_docstring_pairs_have_all_fields_and_no_answer_in_the_input():
    train, evals = corpus.docstring_pairs("train"), corpus.docstring_pairs("eval")
    assert len(train) > 1000 and len(evals) > 50
    for pair in train + evals:
        assert pair["instruction"] == corpus.SFT_INSTRUCTION
        assert pair["input"].strip() and pair["output"].strip()
        assert len(pair["input"]) <= corpus.PAIR_MAX_INPUT_CHARS + 200
        assert pair["input"].lstrip().startswith(("def ", "async def "))
    whole = []  # inputs that were not truncated
    for pair in train + evals:
        try:
            whole.append(docstrings_in(pair["input"]))
        except SyntaxError:
            assert len(pair["input"]) > corpus.PAIR_MAX_INPUT_CHARS // 2
    assert len(whole) > 0.8 * len(train + evals) and not any(whole)
    seen = {(p["input"], p["output"]) for p in train}
    assert not any((p["input"], p["output"]) in seen for p in evals)


def test_write_demo_data_writes_valid_jsonl(tmp_path):
    written = corpus.write_demo_data(tmp_path)
    assert set(written) == {"cpt_train", "cpt_eval", "sft_train", "sft_eval"}
    for name, info in written.items():
        rows = [json.loads(line) for line in open(info["path"], encoding="utf-8")]
        assert len(rows) == info["count"] > 0
        fields = {"text"} if name.startswith("cpt") else {"instruction", "input", "output"}
        assert all(set(row) == fields for row in rows)
    first = (tmp_path / "sft_eval.jsonl").read_bytes()
    corpus.write_demo_data(tmp_path)
    assert (tmp_path / "sft_eval.jsonl").read_bytes() == first


# --- the shipped base model


def test_shipped_base_model_loads_with_plain_transformers_and_has_learned_code(monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = base_model_path()
    assert (path / "model.safetensors").is_file(), f"no base model in {path}: run satlm.app.pretrain_base"
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size < 25 * 2**20
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert model.config.model_type == "llama"
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
    assert len(tokenizer) == model.config.vocab_size

    text = "def ünïcode(x):\n\treturn {'a': x ** 2}  # 🐍\n"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text

    code = corpus.code_texts("eval")[0][:2000]
    x = torch.tensor([tokenizer(code)["input_ids"][:256]])
    with torch.no_grad():
        loss = model(input_ids=x, labels=x).loss.item()
    assert loss < 5.5  # untrained: ln(8192) = 9.0; unigram baseline ~6.5; this file scores 4.77 (first 256 tokens)


def test_short_answer_pairs_answer_with_a_function_name():
    from satlm.data.corpus import short_answer_pairs

    rows = short_answer_pairs("eval")
    assert len(rows) > 100 and all(r["output"].isidentifier() for r in rows)
    assert sum(len(r["output"]) for r in rows) / len(rows) < 30  # one-word answers
