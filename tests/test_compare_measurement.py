"""`satlm compare`'s paired measurement: interleaved speed, the paired eval-loss delta and its SE, seeds, curves."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from tiny_run import run_overrides, tiny_data, tiny_model_dir  # noqa: F401  (fixtures)

from satlm.app import interleaved
from satlm.app.compare import run_compare
from satlm.app.quality import over_seeds, paired_delta, sat_time_axis, within
from satlm.app.run_config import load_run_config
from satlm.errors import RunConfigError


def _config(model_dir, data, out, **extra):
    return load_run_config(None, run_overrides(model_dir, data, out, **extra))


# -- the statistics, against independent computations -----------------------------------------------------
def test_paired_delta_is_the_ratio_of_sums_with_the_delta_method_se():
    rng = random.Random(0)
    dense = [rng.uniform(500, 900) for _ in range(40)]
    sat = [d * 1.005 + rng.gauss(0, 2.0) for d in dense]
    got = paired_delta(dense, sat)
    assert got["eval_loss_delta_pct"] == pytest.approx(100 * (sum(sat) / sum(dense) - 1), rel=1e-12)
    # The SE by a different route: the standard error of the mean of per-example ratio residuals, by numpy-free
    # arithmetic; equal for a ratio estimator with equal weights up to the m/(m-1) factor used in both.
    ratio = sum(sat) / sum(dense)
    resid = [s - ratio * d for d, s in zip(dense, sat)]
    m = len(dense)
    mean_d = sum(dense) / m
    se = math.sqrt(sum(r * r for r in resid) / (m - 1) / m) / mean_d
    assert got["eval_loss_delta_se_pct"] == pytest.approx(100 * se, rel=1e-9)
    # Paired: far finer than the SE of either side's mean loss alone.
    sd_dense = math.sqrt(sum((d - mean_d) ** 2 for d in dense) / (m - 1))
    assert got["eval_loss_delta_se_pct"] < 0.1 * 100 * sd_dense / math.sqrt(m) / mean_d


def test_paired_delta_detects_a_half_percent_gap_that_unpaired_means_cannot():
    rng = random.Random(1)
    dense = [rng.uniform(400, 1000) for _ in range(32)]  # per-block losses vary far more than the gap
    sat = [d * 1.005 * (1 + rng.gauss(0, 0.001)) for d in dense]
    got = paired_delta(dense, sat)
    assert 0.4 < got["eval_loss_delta_pct"] < 0.6 and got["eval_loss_delta_se_pct"] < 0.05
    assert within(got["eval_loss_delta_pct"], got["eval_loss_delta_se_pct"], 1.0) is True
    assert within(0.9, 0.1, 1.0) is False  # 0.9 + 2 x 0.1 > 1


def test_over_seeds_combines_eval_se_and_seed_spread():
    got = over_seeds([0.4, 0.8], [0.05, 0.05])
    assert got["eval_loss_delta_pct"] == pytest.approx(0.6)
    eval_se = math.sqrt(0.05 ** 2 * 2) / 2
    seed_sd = math.sqrt(((0.4 - 0.6) ** 2 + (0.8 - 0.6) ** 2) / 1)
    assert got["eval_loss_delta_se_pct"] == pytest.approx(math.sqrt(eval_se ** 2 + seed_sd ** 2 / 2))


# -- the time model -------------------------------------------------------------------------------------
def test_schedule_speedup_counts_dense_stretches_as_one_and_weights_levels_by_steps(tiny_model_dir, tiny_data,
                                                                                   tmp_path):
    cfg = _config(tiny_model_dir, tiny_data, tmp_path, **{"sat.schedule": "ladder", "sat.rungs": 2,
                                                          "sat.dense_tail": 0.25})
    fractions = interleaved.schedule_fractions(cfg, 8)  # 3 steps at 1.0, 3 at 0.5, 2 dense
    assert fractions == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.0, 0.0]
    assert interleaved.probe_steps(fractions) == {1.0: 0, 0.5: 3}
    ratios = {1.0: 2.0, 0.5: 1.25}
    expected = 8 / (3 / 2.0 + 3 / 1.25 + 2 / 1.0)
    assert interleaved.schedule_speedup(fractions, ratios) == pytest.approx(expected)
    # budget: time: the SAT steps whose schedule takes the time of 8 dense steps
    steps = interleaved.steps_for_time(8, lambda n: interleaved.schedule_fractions(cfg, n), ratios)
    assert interleaved.dense_equivalents(interleaved.schedule_fractions(cfg, steps), ratios)[-1] == \
        pytest.approx(8, abs=1.0)
    assert steps > 8
    # SAT's time axis: dense's seconds per step times the equivalents
    axis = sat_time_axis(cfg, 8, {"train_seconds": 16.0, "steps": 8}, ratios)
    assert axis(3) == pytest.approx(2.0 * 3 / 2.0) and axis(8) == pytest.approx(2.0 * (8 / expected))


def test_a_linear_schedule_is_timed_at_a_few_levels():
    fractions = [1 - t / 100 for t in range(100)]
    probes = interleaved.probe_steps(fractions)
    assert len(probes) == interleaved.MOST_LEVELS and max(probes) == 1.0
    assert interleaved.interpolate({1.0: 2.0, 0.5: 1.5}, 0.75) == pytest.approx(1.75)
    assert interleaved.interpolate({1.0: 2.0}, 0.25) == pytest.approx(1.25)


def test_two_untimed_warm_up_pairs_then_alternating_timed_pairs(monkeypatch):
    """The first level starts with two untimed pairs (dense first, then SAT first); every timed pair alternates the
    order, and the times kept are the timed steps' own, in (dense, SAT) order."""
    calls, clock = [], iter(range(1, 1000))
    monkeypatch.setattr(interleaved, "_step", lambda tr, group, norm: calls.append((tr, group)) or next(clock))
    monkeypatch.setattr("satlm.modeling.patch.set_sat_step", lambda model, step, steps: None)
    dense, sat = type("T", (), {"model": None})(), type("T", (), {"model": None})()
    times: dict = {}
    interleaved._time_levels(dense, sat, {1.0: 0, 0.5: 3}, 8, 4, ["b0", "b1", "b2", "b3"], 1.0, times)
    assert len(calls) == 2 * (2 + 4 + 4)
    order = [tr is dense for tr, _ in calls]
    assert order[:4] == [True, False, False, True]          # the warm-up pairs: dense first, then SAT first
    assert order[4:12] == [True, False, False, True] * 2     # the timed pairs of level 1.0 alternate
    assert [g for _, g in calls[:4]] == ["b2", "b2", "b3", "b3"]  # warm-ups on batches -2, -1 (the last two)
    # clock: warm-ups took times 1-4, level 1.0's pairs 5-12 (dense first: 5, 6; SAT first: 7 then dense 8)
    assert times[1.0] == [(5, 6), (8, 7), (9, 10), (12, 11)]
    assert len(times[0.5]) == 4 and all(d != s for d, s in times[0.5])


# -- end to end -----------------------------------------------------------------------------------------
@pytest.mark.integration
def test_compare_writes_the_paired_measurement(tmp_path, tiny_model_dir, tiny_data):
    out = tmp_path / "cmp"
    cfg = _config(tiny_model_dir, tiny_data, out, max_steps=6, eval_steps=3, seeds=[0, 1],
                  **{"sat.schedule": "ladder", "sat.rungs": 2, "sat.dense_tail": 0.34})
    result = run_compare(cfg, quiet=True)
    saved = json.loads((out / "compare.json").read_text())
    for key in ("speedup_interleaved", "speedup_interleaved_iqr", "eval_loss_delta_pct", "eval_loss_delta_se_pct",
                "curves", "seeds", "per_seed", "within_1pct", "time_to_quality_separate"):
        assert key in saved, key
    assert saved["seeds"] == [0, 1]
    for seed in (0, 1):
        for mode in ("dense", "sat"):
            assert (out / f"seed-{seed}" / mode / "summary.json").is_file()
    # Two levels timed (0.5 and 0.25) with 4 pairs each; the dense tail counts as 1.0x.
    levels = saved["interleaved"]["levels"]
    assert [lv["schedule_fraction"] for lv in levels] == [1.0, 0.5]
    assert all(len(lv["dense_seconds"]) == 4 == len(lv["sat_seconds"]) for lv in levels)
    lo, hi = saved["speedup_interleaved_iqr"]
    assert lo <= hi and saved["speedup_interleaved"] > 0
    # curves: every eval point (step 0, 3, and the final one) of both runs of both seeds
    for mode in ("dense", "sat"):
        pts = saved["curves"][mode]
        assert sorted((p["seed"], p["step"]) for p in pts) == [(0, 0), (0, 3), (0, 6), (1, 0), (1, 3), (1, 6)]
        assert all({"step", "tokens", "train_seconds", "eval_loss", "seconds"} <= set(p) for p in pts)
    # The paired eval reproduces each side's own final eval loss, and the delta is their relative difference.
    for r in saved["per_seed"]:
        p = r["paired_eval"]
        assert p["dense_eval_loss"] == pytest.approx(r["dense"]["eval_loss"], rel=1e-5)
        assert p["sat_eval_loss"] == pytest.approx(r["sat"]["eval_loss"], rel=1e-5)
        assert r["eval_loss_delta_pct"] == pytest.approx(100 * (p["sat_eval_loss"] / p["dense_eval_loss"] - 1),
                                                         rel=1e-6)
        assert r["eval_loss_delta_se_pct"] > 0
    mean = sum(r["eval_loss_delta_pct"] for r in saved["per_seed"]) / 2
    assert saved["eval_loss_delta_pct"] == pytest.approx(mean)
    # seed N sets both sides' data order and SAT's selection: the two seeds' dense runs differ
    d0, d1 = (saved["per_seed"][i]["dense"]["train_loss"] for i in (0, 1))
    assert d0 != d1
    assert (out / "compare.png").is_file() and result["seeds"] == [0, 1]


@pytest.mark.integration
def test_interleaved_measurement_is_reused_on_resume_and_redone_when_settings_change(tmp_path, tiny_model_dir,
                                                                                   tiny_data):
    out = tmp_path / "cmp"
    cfg = _config(tiny_model_dir, tiny_data, out, max_steps=4)
    first = run_compare(cfg, quiet=True)["interleaved"]
    again = run_compare(_config(tiny_model_dir, tiny_data, out, max_steps=4, resume=True), quiet=True)["interleaved"]
    assert again == first  # read back, not measured again
    changed = run_compare(_config(tiny_model_dir, tiny_data, out, max_steps=4, overwrite=True,
                                  **{"sat.omission_rate": 0.25}), quiet=True)["interleaved"]
    assert changed["fingerprint"] != first["fingerprint"]


def test_the_interleaved_phase_runs_in_a_child_with_the_allocator_settings(tmp_path, tiny_model_dir, tiny_data,
                                                                         monkeypatch):
    for k in interleaved.ALLOCATOR_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.delenv(interleaved.INPROCESS_ENV, raising=False)
    cfg = _config(tiny_model_dir, tiny_data, tmp_path / "cmp", max_steps=4)
    assert interleaved._fingerprint(type(cfg).from_dict(cfg.to_dict()), 4, 4) == interleaved._fingerprint(cfg, 4, 4)
    child = interleaved.measured_or_cached(cfg, 4, tmp_path / "a", 4)
    assert child["isolated"] is True and child["allocator"] == interleaved.ALLOCATOR_ENV
    assert [len(lv["dense_seconds"]) for lv in child["levels"]] == [4]
    monkeypatch.setenv(interleaved.INPROCESS_ENV, "1")
    here = interleaved.measured_or_cached(cfg, 4, tmp_path / "b", 4)
    assert here["isolated"] is False and here["allocator"] == {}
    assert here["fingerprint"] == child["fingerprint"]


def test_budget_time_needs_the_interleaved_measurement(tmp_path, tiny_model_dir, tiny_data):
    cfg = _config(tiny_model_dir, tiny_data, tmp_path / "cmp", budget="time", interleaved_pairs=0)
    with pytest.raises(RunConfigError, match="interleaved_pairs"):
        run_compare(cfg, quiet=True)


@pytest.mark.parametrize("value, fragment", [([], "non-empty list"), ([0, 0], "twice"), ([-1], ">= 0"),
                                             (["a"], "integers")])
def test_bad_seeds_name_the_key(value, fragment, tiny_model_dir, tiny_data, tmp_path):
    with pytest.raises(RunConfigError, match=fragment):
        _config(tiny_model_dir, tiny_data, tmp_path, seeds=json.dumps(value))


def test_interleaved_pairs_below_four_is_refused(tiny_model_dir, tiny_data, tmp_path):
    with pytest.raises(RunConfigError, match="interleaved_pairs"):
        _config(tiny_model_dir, tiny_data, tmp_path, interleaved_pairs=2)


def test_evaluate_examples_sums_to_the_token_weighted_loss(tiny_model_dir, tiny_data, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from satlm.data import build_datasets
    from satlm.app.evaluate import evaluate_examples, evaluate_loss

    cfg = _config(tiny_model_dir, tiny_data, tmp_path, task="sft", seq_len=128)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    data = build_datasets(cfg, tok)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    sums, counts = evaluate_examples(model, data.eval, data.eval_collator, 3)
    ref = evaluate_loss(model, data.eval, data.eval_collator, 3)
    assert len(sums) == len(data.eval) and sum(counts) == ref["tokens"]
    assert sum(sums) / sum(counts) == pytest.approx(ref["loss"], rel=1e-6)
    assert len(set(counts)) > 1  # sft examples differ in length: per-example counts, not a fixed block


def test_seeds_flag_of_compare():
    from satlm.app.run_config import parse_run_args

    cfg = parse_run_args("compare", ["--seeds", "0,1", "max_steps=2"], config_required=False)
    assert cfg.seeds == [0, 1]
    assert parse_run_args("compare", ["max_steps=2"], config_required=False).seeds is None
    with pytest.raises(SystemExit):
        parse_run_args("compare", ["--seeds", "a"], config_required=False)
    with pytest.raises(SystemExit):  # train has no --seeds
        parse_run_args("train", ["demo-cpt", "--seeds", "0,1"], config_required=True)
