"""Property tests: generated run configs, SAT configs and small data sets either work or fail with one of
satlm's own errors (SATLMError), never a raw KeyError / IndexError / TypeError / RuntimeError."""

from __future__ import annotations

import functools
import json
import math
import shutil
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tiny_run import WORDS, make_model_dir, make_tokenizer

from satlm.config import ATTN_UNITS, METRICS, SCHEDULES, SELECTIONS, SOURCES, SATConfig
from satlm.errors import SATLMError
from satlm.app.run_config import TRUNCATIONS, RunConfig, load_run_config

# derandomize: the same examples in every run, so that CI is reproducible (raise max_examples to explore)
FAST = settings(max_examples=200, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# -- values: good ones, near misses and junk --------------------------------------------------------------
junk = st.one_of(st.none(), st.booleans(), st.text(max_size=6), st.integers(-3, 3),
                 st.floats(allow_nan=True, allow_infinity=True), st.lists(st.integers(-2, 2), max_size=2),
                 st.dictionaries(st.text(max_size=3), st.integers(), max_size=1))


stairs = st.lists(st.floats(0.05, 1.0), min_size=1, max_size=3, unique=True).map(
    lambda us: [[u, 0.4 * (1 - i / 3)] for i, u in enumerate(sorted(us))])  # valid for omission_rate >= 0.4
rate = st.floats(0, 0.95)
SAT_GOOD = {
    "omission_rate": rate, "attn_omission_rate": st.one_of(st.none(), rate),
    "mlp_omission_rate": st.one_of(st.none(), rate), "metric": st.sampled_from(METRICS),
    "selection": st.sampled_from(SELECTIONS), "source": st.sampled_from(SOURCES),
    "schedule": st.sampled_from(SCHEDULES), "rungs": st.integers(1, 12), "dense_tail": st.floats(0, 0.9),
    "attn_unit": st.sampled_from(ATTN_UNITS), "steps": st.one_of(st.none(), stairs),
    "layers": st.one_of(st.none(), st.lists(st.integers(-2, 1), min_size=1, max_size=2, unique=True)),
    "seed": st.integers(0, 3), "history_decay": st.floats(0, 0.99), "history_exploration": st.floats(0, 50),
}
BAD_RATES = (1.0, -0.1, 1.5, math.nan, math.inf, "0.2", None, True)
SAT_BAD = {  # near misses per field; any field may also get junk
    "omission_rate": BAD_RATES, "attn_omission_rate": BAD_RATES, "mlp_omission_rate": BAD_RATES,
    "metric": ("l3", None), "selection": ("best",), "source": ("past",), "schedule": ("cosine",),
    "rungs": (0, -1, 2.5), "dense_tail": BAD_RATES, "attn_unit": ("layer",),
    "steps": ([[0.5]], [[0.7, 0.1], [0.3, 0.1]], [[1.5, 0.1]], [[0.5, 2.0]], [], [[True, 0.1]]),
    "layers": ([], [5], [0, 0], [-3], [1, -1], ["0"], [0.5]), "seed": (-1.5, "x"), "history_decay": BAD_RATES,
    "history_exploration": (-1.0, math.nan, math.inf),
}
RUN_GOOD = {
    "task": st.sampled_from(["cpt", "sft"]), "seq_len": st.integers(2, 160), "batch_size": st.integers(1, 4),
    "grad_accum": st.integers(1, 2), "max_steps": st.integers(1, 3), "lr": st.floats(1e-5, 1e-2),
    "warmup": st.floats(0, 3), "max_grad_norm": st.floats(0, 2), "logging_steps": st.integers(1, 2),
    "data.truncation": st.sampled_from(TRUNCATIONS), "data.eval_fraction": st.floats(0.01, 0.5),
    "data.template": st.sampled_from(["auto", "builtin"]), "sat.enabled": st.booleans(),
    **{f"sat.{k}": v for k, v in SAT_GOOD.items()},
}
RUN_BAD = {
    "task": ("pretrain",), "seq_len": (1, 0, -1), "batch_size": (0,), "grad_accum": (0,), "max_steps": (0,),
    "lr": (0.0, -1e-3, math.inf, math.nan), "warmup": (-1.0, math.nan), "max_grad_norm": (-1.0, math.inf),
    "logging_steps": (0,), "data.truncation": ("clip",), "data.eval_fraction": (0.0, 1.0, -0.1),
    "data.template": ("chat", "jinja"), **{f"sat.{k}": v for k, v in SAT_BAD.items()},
}
CONFIG_GOOD = {  # keys checked when the config loads, not worth a training run each
    **RUN_GOOD, "trainer_args.logging_dir": st.text(max_size=5), "trainer_args.fsdp.x": junk,
    "resume": st.booleans(), "eval_batch_size": st.one_of(st.none(), st.integers(1, 3)),
    "save_total_limit": st.one_of(st.none(), st.integers(1, 3)), "data.max_eval_samples": st.integers(1, 8),
}
CONFIG_BAD = {**RUN_BAD, "trainer_args": ([1], "x"), "resume": ("",), "eval_batch_size": (0,),
              "save_total_limit": (0,), "data.max_eval_samples": (0,)}


@st.composite
def field_values(draw, good, bad, max_keys=8):
    """{key: value} for some keys: valid values, except that in two examples of three one key gets a near
    miss or junk. (One choice per example keeps the mix; hypothesis biases many independent choices.)"""
    keys = draw(st.lists(st.sampled_from(sorted(good)), unique=True, max_size=max_keys))
    values = {k: draw(good[k]) for k in keys}
    if keys and draw(st.integers(0, 2)):
        key = draw(st.sampled_from(keys))
        values[key] = draw(st.one_of(st.sampled_from(bad[key]), junk) if key in bad else junk)
    return values


def _text(value) -> str:
    """A value as an override's text, which YAML reads back as the value."""
    if isinstance(value, float) and not math.isfinite(value):
        return {math.inf: ".inf", -math.inf: "-.inf"}.get(value, ".nan")
    return json.dumps(value)


@st.composite
def overrides(draw, good=RUN_GOOD, bad=RUN_BAD):
    """key=value strings; a value's text is its JSON, or for some, str(value) as a user might type it."""
    return [f"{k}={draw(st.sampled_from([_text(v), str(v)]))}" for k, v in draw(field_values(good, bad)).items()]


def _expected(fn, *args, **kwargs):
    """fn(...)'s result, or None when it raised an SATLMError; any other exception fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            result = fn(*args, **kwargs)
        except SATLMError as e:
            assert str(e) and "\n" not in str(e).strip(), repr(e)  # one line that says what is wrong
            event(f"{fn.__name__}: {type(e).__name__}")  # the mix of outcomes, in --hypothesis-show-statistics
            return None
    event(f"{fn.__name__}: ok")
    return result


# -- configs ---------------------------------------------------------------------------------------------
@FAST
@given(overrides(CONFIG_GOOD, CONFIG_BAD))
def test_run_config_overrides_load_or_fail_with_satlm_errors(items):
    cfg = _expected(load_run_config, None, items)
    if cfg is not None:
        assert isinstance(cfg, RunConfig)
        assert RunConfig.from_dict(yaml.safe_load(cfg.to_yaml())) == cfg  # config.yaml reloads as itself
        cfg.sat.to_sat_config()


@FAST
@given(field_values(SAT_GOOD, SAT_BAD, max_keys=15))
def test_sat_config_fields_validate_or_fail_with_satlm_errors(fields):
    cfg = _expected(SATConfig, **fields)
    if cfg is not None:
        from satlm.schedules import scheduled_rates, unreached_stairs

        for step in (0, 1, 5, 9):
            attn, mlp = scheduled_rates(cfg, step, 10)
            assert 0 <= attn < 1 and 0 <= mlp < 1
        unreached_stairs(cfg, 10)


@FAST
@given(field_values({k: v for k, v in CONFIG_GOOD.items() if "." not in k}, CONFIG_BAD),
       st.one_of(field_values(SAT_GOOD, SAT_BAD), junk),
       st.dictionaries(st.one_of(st.text(max_size=5), st.integers(), st.none()), junk, max_size=1))
def test_run_config_from_a_raw_mapping(top, sat, odd):
    """As a YAML file gives it: any value under any key, a `sat:` section that may not be a mapping."""
    raw = {**top, "sat": sat, **odd}  # odd: an unknown key (or none) beside them
    _expected(RunConfig.from_dict, raw)


# -- data ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _tokenizer():
    return make_tokenizer()


words = st.lists(st.sampled_from(WORDS), min_size=0, max_size=30).map(" ".join)
texts = st.one_of(words, words, st.text(max_size=40),
                  st.sampled_from(["", "   ", "\n", "\ufeffbom", "\x00", "é" * 30]))
roles = st.sampled_from(["system", "user", "assistant"])
sft_records = st.one_of(
    st.fixed_dictionaries({"instruction": texts, "output": texts}, optional={"input": st.one_of(texts, st.none())}),
    st.fixed_dictionaries({"messages": st.tuples(
        st.lists(st.just("system"), max_size=1), st.lists(st.just(["user", "assistant"]), min_size=1, max_size=2),
        st.lists(texts, min_size=5, max_size=5),
    ).map(lambda t: [{"role": r, "content": c} for r, c in zip(t[0] + sum(t[1], []), t[2])])}),
)
cpt_records = st.fixed_dictionaries({"text": texts})
odd_records = st.one_of(junk, st.fixed_dictionaries({"text": st.one_of(junk, st.just("a\ud800"))}), st.fixed_dictionaries({"instruction": junk,
                        "output": junk}), st.fixed_dictionaries({"messages": junk}),
                        st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries(
                            {"role": st.one_of(roles, junk), "content": st.one_of(texts, junk)}), max_size=3)}))
odd_lines = st.one_of(st.binary(max_size=20), st.sampled_from([b"\xff\xfe", b"\x00", b"{", b"[]", b"\xef\xbb\xbf{}"]),
                      odd_records.map(lambda r: json.dumps(r).encode("utf-8")))


@st.composite
def data_file(draw, task):
    """(suffix, bytes) of a small JSONL (or, for cpt, text) file: good records of odd text, and in about one
    file of three an odd line (junk record, wrong types, binary, a lone BOM)."""
    kind = draw(st.sampled_from(["jsonl", "jsonl", "txt"] if task == "cpt" else ["jsonl"]))
    if kind == "txt":
        lines = [t.encode("utf-8", "surrogatepass") for t in draw(st.lists(texts, min_size=1, max_size=40))]
    else:
        records = draw(st.lists(cpt_records if task == "cpt" else sft_records, min_size=1, max_size=12))
        lines = [json.dumps(r).encode("utf-8") for r in records]
    if draw(st.integers(0, 2)) == 0:
        lines.insert(draw(st.integers(0, len(lines))), draw(odd_lines))
    return kind, b"\n".join(lines) + b"\n"


@settings(FAST, max_examples=80)
@given(st.sampled_from(["cpt", "sft"]).flatmap(lambda task: st.tuples(st.just(task), data_file(task), data_file(task))),
       st.sampled_from([2, 5, 16, 32, 64]), st.sampled_from(TRUNCATIONS))
def test_data_sets_build_or_fail_with_satlm_errors(case, seq_len, truncation):
    from satlm.data import build_datasets

    task, (train_kind, train), (eval_kind, eval_) = case
    folder = Path(tempfile.mkdtemp(prefix="satlm-prop-"))
    try:
        (folder / f"train.{train_kind}").write_bytes(train)
        (folder / f"eval.{eval_kind}").write_bytes(eval_)
        over = [f"task={task}", f"seq_len={seq_len}", f"data.train={folder / f'train.{train_kind}'}",
                f"data.truncation={truncation}", "data.template=builtin"]
        if len(eval_) % 3:  # sometimes held out from the training data instead
            over.append(f"data.eval={folder / f'eval.{eval_kind}'}")
        data = _expected(build_datasets, load_run_config(None, over), _tokenizer())
        if data is not None:
            assert len(data.train) >= 1 and len(data.eval) >= 1
            batch = data.collator([data.train[i] for i in range(min(2, len(data.train)))])
            assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape[1] <= seq_len
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# -- models ----------------------------------------------------------------------------------------------
@settings(FAST, max_examples=30)
@given(field_values({k: SAT_GOOD[k] for k in ("omission_rate", "attn_omission_rate", "mlp_omission_rate",
                                                "metric", "selection", "source", "attn_unit", "layers")},
                    SAT_BAD, max_keys=8))
def test_apply_sat_and_a_step_or_a_satlm_error(make_model, fields):
    from conftest import batch

    from satlm import apply_sat, remove_sat, set_sat_step

    cfg = _expected(SATConfig, **fields)
    if cfg is None:
        return
    model = make_model(layers=2, hidden=32, inter=48, heads=4, kv_heads=2)
    if _expected(apply_sat, model, cfg) is None:
        return
    set_sat_step(model, 0, 10)
    for _ in range(2):  # history mode selects from statistics on its second step
        loss = model(**batch(vocab=128, b=2, t=8)).loss
        loss.backward()
        assert torch.isfinite(loss)
    remove_sat(model)


# -- whole runs ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prop_model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("prop") / "model")


def _base_data(task: str, kind: str) -> bytes:
    """Enough good data for a few batches, to which the generated file is appended."""
    docs = [" ".join(WORDS[i:i + 30]) for i in range(0, 60, 3)]
    if kind == "txt":
        return "\n".join(docs).encode("utf-8") + b"\n"
    rows = [{"text": d} for d in docs] if task == "cpt" else [
        {"instruction": "Repeat.", "output": " ".join(WORDS[i:i + 5])} for i in range(20)]
    return "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8")


@pytest.mark.integration
@settings(FAST, max_examples=10, derandomize=True)
@given(st.sampled_from(["cpt", "sft"]).flatmap(lambda task: st.tuples(st.just(task), data_file(task))),
       overrides({k: v for k, v in RUN_GOOD.items() if k not in ("task", "max_steps", "seq_len")}),
       st.integers(1, 2), st.sampled_from([16, 64]))
def test_short_runs_complete_or_fail_with_satlm_errors(prop_model_dir, case, items, max_steps, seq_len):
    """max_steps 1-2 on the tiny model: generated settings, good data with generated records appended."""
    from satlm.app.train import run_train

    task, (kind, content) = case
    folder = Path(tempfile.mkdtemp(prefix="satlm-prop-run-"))
    try:
        (folder / f"train.{kind}").write_bytes(_base_data(task, kind) + content)
        over = [f"task={task}", f"model={prop_model_dir}", f"output_dir={folder / 'run'}", f"max_steps={max_steps}",
                f"seq_len={seq_len if task == 'cpt' else 4 * seq_len}", f"data.train={folder / f'train.{kind}'}",
                "save_steps=0", "progress=false", "tensorboard=false", "precision=fp32", "data.max_eval_samples=4",
                *items]
        cfg = _expected(load_run_config, None, over)
        if cfg is None:
            return
        summary = _expected(run_train, cfg, quiet=True)
        if summary is not None:
            assert summary["steps"] == max_steps and summary["completed"]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
