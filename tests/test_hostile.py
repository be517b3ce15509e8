"""Hostile and odd input: empty, binary and non-UTF-8 files, JSONL lines that are not objects, huge lines,
sequences longer than seq_len or the model's context, tokenizers without a pad token, rates outside [0, 1),
ladders with stairs that get no step, layers that do not exist. Each fails with one of satlm's own errors
whose message names the file (and line) or the key, and what is allowed, or works as documented."""

from __future__ import annotations

import json
import math
import random
import shutil
import time
import warnings

import pytest
from tiny_run import (make_tokenizer, run_overrides, sentences, tiny_data, tiny_model_dir,  # noqa: F401 (fixtures)
                      write_jsonl)

from satlm.config import SATConfig, SATConfigError
from satlm.errors import DataError, ModelLoadError, RunConfigError, SATLMError
from satlm.data import build_datasets, ensure_pad_token, load_conversations, load_documents
from satlm.app.model_io import check_run_fits_model
from satlm.app.run_config import load_run_config
from satlm.schedules import scheduled_rates, unreached_stairs


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _cfg(task, train, eval_=None, *extra):
    over = [f"task={task}", f"data.train={train}", "seq_len=128" if task == "sft" else "seq_len=16"]
    if eval_ is not None:
        over.append(f"data.eval={eval_}")
    return load_run_config(None, over + list(extra))


def _build(task, path, split, tiny_data, tok):
    """build_datasets with `path` as the train or the eval data (the other side is good data)."""
    if split == "train":
        return build_datasets(_cfg(task, path, tiny_data[f"{task}_eval"]), tok)
    return build_datasets(_cfg(task, tiny_data[f"{task}_train"], path), tok)


# -- 1. empty files --------------------------------------------------------------------------------------
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


# -- 2. binary and non-UTF-8 text ------------------------------------------------------------------------
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


# -- 3. JSONL lines that are not objects -----------------------------------------------------------------
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


# -- 4. huge lines ---------------------------------------------------------------------------------------
def test_a_5mb_cpt_line_is_packed_in_linear_time(tmp_path, tok):
    text = " ".join(sentences(400))
    doc = (text * (5_000_000 // len(text) + 1))[:5_000_000]
    path = write_jsonl(tmp_path / "huge.jsonl", [{"text": doc}])
    start = time.perf_counter()
    data = build_datasets(_cfg("cpt", path, None, "seq_len=64"), tok)
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
        data = build_datasets(_cfg("sft", path, path, "seq_len=64", "data.max_eval_samples=1"), tok)
    assert time.perf_counter() - start < 20
    assert max(len(data.train[i]["input_ids"]) for i in range(len(data.train))) == 64
    assert data.info["truncated_examples"] == 1 and data.info["dropped_examples"] == 0


# -- 5. sequences longer than seq_len or than the model's context ---------------------------------------
def _long_sft(tmp_path):
    rows = [{"instruction": "Say.", "output": "yes"}, {"instruction": "Repeat.", "output": " ".join(sentences(20))},
            {"instruction": " ".join(sentences(20)), "output": "no"}, {"instruction": "Again.", "output": "ok"}]
    return write_jsonl(tmp_path / "sft.jsonl", rows)


def test_sft_truncation_error_names_the_first_long_example(tmp_path, tok):
    path = _long_sft(tmp_path)
    with pytest.raises(DataError) as e:
        build_datasets(_cfg("sft", path, path, "seq_len=48", "data.truncation=error"), tok)
    assert f"{path}:2: example is longer than seq_len=48" in str(e.value)
    assert "data.truncation=truncate" in str(e.value)


def test_sft_truncation_warns_once_with_counts(tmp_path, tok):
    path = _long_sft(tmp_path)
    short_eval = write_jsonl(tmp_path / "eval.jsonl", [{"instruction": "Say.", "output": "yes"}])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = build_datasets(_cfg("sft", path, short_eval, "seq_len=48"), tok)
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
        build_datasets(_cfg("sft", path, path, "seq_len=16"), tok)


@pytest.mark.parametrize("items, fragment", [
    (["trainer_args.a=1", "trainer_args.a.b=2"], "trainer_args.a is 1, not a mapping"),
    (["trainer_args=5", "trainer_args.a=1"], "trainer_args is 5, not a mapping"),
    (["trainer_args.=1"], "'trainer_args.' has an empty part"),
])
def test_nested_trainer_args_overrides_over_a_value(items, fragment):
    with pytest.raises(RunConfigError) as e:
        load_run_config(None, items)
    assert fragment in str(e.value)
    assert load_run_config(None, ["trainer_args.fsdp.x=1", "trainer_args.fsdp.y=2"]).trainer_args == {
        "fsdp": {"x": 1, "y": 2}}


def test_truncation_key_is_checked():
    with pytest.raises(RunConfigError, match="'data.truncation' is 'clip'; choose one of truncate, error"):
        load_run_config(None, ["data.truncation=clip"])
    assert load_run_config(None, []).data.truncation == "truncate"


def test_seq_len_beyond_the_model_context_names_both(tiny_model_dir):
    check_run_fits_model(load_run_config(None, ["seq_len=128"]), str(tiny_model_dir))  # the tiny model's context
    with pytest.raises(RunConfigError) as e:
        check_run_fits_model(load_run_config(None, ["seq_len=129"]), str(tiny_model_dir))
    assert "seq_len=129 exceeds the model's context of 128 tokens (max_position_embeddings" in str(e.value)
    assert "set seq_len <= 128" in str(e.value)


# -- 7. a tokenizer without a pad token ------------------------------------------------------------------
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
        build_datasets(_cfg("sft", tiny_data["sft_train"], tiny_data["sft_eval"]), tok)
    data = build_datasets(_cfg("cpt", tiny_data["cpt_train"], tiny_data["cpt_eval"]), tok)  # cpt never pads
    assert len(data.train) > 0


# -- 8. rates outside [0, 1) -----------------------------------------------------------------------------
RATE_FIELDS = ("omission_rate", "attn_omission_rate", "mlp_omission_rate")
BAD_RATES = (-0.1, 1.0, 1.5, float("nan"), float("inf"), -float("inf"), "0.3", True, [0.5])


@pytest.mark.parametrize("field", RATE_FIELDS)
@pytest.mark.parametrize("value", BAD_RATES, ids=repr)
def test_bad_rates_in_satconfig_name_the_field_and_range(field, value):
    with pytest.raises(SATConfigError) as e:
        SATConfig(**{field: value})
    assert f"SATConfig.{field}=" in str(e.value) and "must be a number in [0, 1)" in str(e.value)
    assert isinstance(e.value, SATLMError) and isinstance(e.value, ValueError)


@pytest.mark.parametrize("field", RATE_FIELDS)
@pytest.mark.parametrize("text", ["-0.1", "1.0", "1", "1.5", ".nan", ".inf", "-.inf", "1e3"])
def test_bad_rates_in_overrides_name_the_key_and_range(field, text):
    with pytest.raises(SATConfigError) as e:
        load_run_config(None, [f"sat.{field}={text}"])
    assert f"sat.{field}=" in str(e.value) and "[0, 1)" in str(e.value)


@pytest.mark.parametrize("field", RATE_FIELDS)
def test_a_rate_that_is_not_a_number(field):
    with pytest.raises(RunConfigError, match=f"'sat.{field}' expects a number"):
        load_run_config(None, [f"sat.{field}=half"])


@pytest.mark.parametrize("override, fragment", [
    ("sat.dense_tail=1.0", "sat.dense_tail=1.0 must be a number in [0, 1)"),
    ("sat.dense_tail=-0.1", "sat.dense_tail=-0.1 must be a number in [0, 1)"),
    ("sat.dense_tail=.nan", "sat.dense_tail=nan must be a number in [0, 1)"),
    ("sat.history_decay=1.0", "sat.history_decay=1.0 must be a number in [0, 1)"),
    ("sat.history_exploration=.nan", "sat.history_exploration=nan must be a number >= 0"),
    ("sat.history_exploration=-1", "sat.history_exploration=-1.0 must be a number >= 0"),
    ("sat.rungs=0", "sat.rungs=0 must be an integer >= 1"),
    ("lr=.inf", "'lr' must be a finite number > 0"),
    ("warmup=.nan", "'warmup' must be a finite number >= 0"),
    ("max_grad_norm=.inf", "'max_grad_norm' must be a finite number >= 0"),
])
def test_other_numbers_out_of_range(override, fragment):
    with pytest.raises(SATLMError) as e:
        load_run_config(None, [override])
    assert fragment in str(e.value)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"history_decay": "a"}, "SATConfig.history_decay='a' must be a number in [0, 1)"),
    ({"history_exploration": "a"}, "SATConfig.history_exploration='a' must be a number >= 0"),
    ({"dense_tail": None}, "SATConfig.dense_tail=None must be a number in [0, 1)"),
    ({"schedule": "steps", "steps": [[True, 0.1]]}, "SATConfig.steps[0] until_fraction=True must increase"),
])
def test_satconfig_rejects_non_numbers_with_its_own_error(kwargs, fragment):
    with pytest.raises(SATConfigError) as e:  # never a TypeError from comparing a string with a number
        SATConfig(**kwargs)
    assert fragment in str(e.value)


# -- 9. ladders whose stairs do not cover training -------------------------------------------------------
def test_a_ladder_with_more_rungs_than_steps_warns_and_still_descends():
    with pytest.warns(UserWarning, match=r"sat.rungs=8 with max_steps=5: stair\(s\) 3, 5, 7 of 8 get no step"):
        cfg = load_run_config(None, ["max_steps=5", "sat.rungs=8"])
    sat = cfg.sat.to_sat_config()
    # 8 rungs over 4.5 sparse steps: every step takes the next rung it reaches, from the top to the last
    assert [scheduled_rates(sat, t, 5)[1] for t in range(5)] == [0.5, 0.4375, 0.3125, 0.1875, 0.0625]
    assert unreached_stairs(sat, 5) == [2, 4, 6] and unreached_stairs(sat, 100) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_run_config(None, ["max_steps=5", "sat.rungs=8", "sat.enabled=false"])  # dense: nothing to say
        load_run_config(None, ["max_steps=40", "sat.rungs=8"])


def test_a_ladder_with_astronomically_many_rungs_warns_without_listing_them_all():
    """An override like sat.rungs=1.0e+300 is an integer rung count: the warning names the first stairs only
    (listing every one exhausted memory)."""
    with pytest.warns(UserWarning, match=r"stair\(s\) 2, 3, .*, 21, \.\.\. of 1000000000000000052504"):
        load_run_config(None, ["max_steps=3", "sat.rungs=1.0e+300"])


def test_steps_stairs_narrower_than_a_step_warn():
    with pytest.warns(UserWarning, match=r"sat.steps with max_steps=10: stair\(s\) 2 of 3 get no step"):
        load_run_config(None, ["max_steps=10", "sat.schedule=steps", "sat.steps=[[0.05, 0.5], [0.1, 0.4], [1, 0.2]]"])


def test_stairs_that_end_early_leave_a_dense_tail_as_documented():
    sat = load_run_config(None, ["sat.schedule=steps", "sat.steps=[[0.25, 0.5], [0.5, 0.25]]"]).sat.to_sat_config()
    assert [scheduled_rates(sat, t, 8)[1] for t in range(8)] == [0.5, 0.5, 0.25, 0.25, 0, 0, 0, 0]


@pytest.mark.parametrize("steps, fragment", [
    ("[[0.5, 0.5], [1.5, 0.1]]", "until_fraction=1.5 must increase and lie in (0, 1]"),
    ("[[0.5, 0.5], [0.5, 0.1]]", "until_fraction=0.5 must increase"),
    ("[[0.5, 0.6]]", "rate=0.6 exceeds omission_rate=0.5"),
    ("[[0.5, -0.2]]", "steps[0] rate=-0.2 must be a number in [0, 1)"),
    ("[[0.5]]", "steps[0]=[0.5] must be a pair"),
    ("[]", "must be a non-empty list"),
])
def test_bad_stairs_name_the_stair(steps, fragment):
    with pytest.raises(SATConfigError) as e:
        load_run_config(None, ["sat.schedule=steps", f"sat.steps={steps}"])
    assert fragment in str(e.value) and "sat.steps" in str(e.value)


# -- 10. layers that do not exist ------------------------------------------------------------------------
@pytest.mark.parametrize("layers, fragment", [
    ([1.5], "must be a list of integer layer indices"),
    (["0"], "must be a list of integer layer indices"),
    ([True], "must be a list of integer layer indices"),
    ("all", "must be a list of integer layer indices"),
    ([], "names no layer"),
    ([1, 0, 1], "repeats 1; list each layer once"),
])
def test_layers_that_are_not_indices(layers, fragment):
    with pytest.raises(SATConfigError) as e:
        SATConfig(layers=layers)
    assert "SATConfig.layers=" in str(e.value) and fragment in str(e.value)


@pytest.mark.parametrize("layers, fragment", [
    ([99], "layer 99 does not exist (the model has 2 decoder layers: 0..1, or -2..-1 from the end)"),
    ([0, -3], "layer -3 does not exist (the model has 2 decoder layers"),
    ([1, -1], "1 and -1 are the same layer"),
])
def test_layers_the_model_lacks_name_its_layer_count(make_model, layers, fragment):
    from satlm import apply_sat

    model = make_model()
    with pytest.raises(SATConfigError) as e:
        apply_sat(model, SATConfig(layers=layers))
    assert f"SATConfig.layers={layers!r}" in str(e.value) and fragment in str(e.value)
    assert getattr(model, "sat_runtime", None) is None  # nothing was wrapped


def test_run_config_layers_checked_against_the_model_config(tiny_model_dir):
    check_run_fits_model(load_run_config(None, ["seq_len=32", "sat.layers=[0, -1]"]), str(tiny_model_dir))
    with pytest.raises(SATConfigError, match=r"sat.layers=\[0, 7\]: layer 7 does not exist; the model has 2 "
                                             r"decoder layers: 0..1, or -2..-1 from the end"):
        check_run_fits_model(load_run_config(None, ["seq_len=32", "sat.layers=[0, 7]"]), str(tiny_model_dir))
    with pytest.raises(SATConfigError, match=r"sat.layers=\[0, -2\] names a layer twice"):
        check_run_fits_model(load_run_config(None, ["seq_len=32", "sat.layers=[0, -2]"]), str(tiny_model_dir))
    check_run_fits_model(load_run_config(None, ["seq_len=32", "sat.layers=[7]", "sat.enabled=false"]),
                         str(tiny_model_dir))  # a dense run uses no layers


@pytest.mark.integration
def test_train_with_a_layer_that_does_not_exist_fails_before_training(tmp_path, tiny_model_dir, tiny_data):
    from satlm.app.train import run_train

    out = tmp_path / "run"
    cfg = load_run_config(None, run_overrides(tiny_model_dir, tiny_data, out, **{"sat.layers": "[99]"}))
    with pytest.raises(SATConfigError, match="layer 99 does not exist"):
        run_train(cfg, quiet=True)
    assert not (out / "metrics.jsonl").exists()
