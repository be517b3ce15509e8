"""What `satlm compare` concludes from two runs: the paired eval-loss delta, time-to-quality, the time budget.

eval_loss_delta_pct: SAT's final eval loss minus dense's, in percent of dense's, from both models' losses on the
    same eval examples (cpt: blocks), paired: with s_i the summed token losses of example i, R = sum s_i(SAT) /
    sum s_i(dense) and the delta is 100 (R - 1). Its standard error is the delta method's for a ratio of paired
    sums, SE(R) = sqrt(m / (m - 1) sum_i z_i^2) / sum_i s_i(dense), z_i = s_i(SAT) - R s_i(dense): the two models'
    losses on one example move together, so the difference is resolved far more finely (about 0.1% on 32 blocks)
    than either mean (about 1%).
Over seeds (a seed sets the data order, the model-side randomness and SAT's selection, for both sides): the mean
    of the per-seed deltas; its SE combines the eval-sampling SE (the per-seed SEs, averaged in quadrature) with
    the seed-to-seed spread (standard deviation / sqrt(seeds)); a setting is within +X% only when
    mean + 2 SE <= X.
time_to_quality: when SAT's eval curve first reaches dense's final eval loss, as a fraction of dense's training
    time, interpolated linearly between eval points; None when it never does. SAT's time is taken from the
    interleaved step-time ratios (app/interleaved.py): step t of its schedule costs 1 / ratio(f_t) dense steps,
    so the figure does not depend on what else the machine ran during either run. time_to_quality_separate is the
    same from the two runs' own measured train_seconds (separate processes). tokens_to_quality: in training
    tokens. Below 1: SAT gets to dense's quality sooner.
budget: time: the SAT run gets the dense run's training time instead of its step count: as many steps as take
    the dense run's steps' time by the same ratios (interleaved.steps_for_time); its LR and SAT schedules are laid
    over those steps.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
from pathlib import Path

from .run_config import RunConfig
from . import interleaved
from .recorder import EVAL_NAME, read_jsonl_records

BUDGET_JSON = "budget.json"


# -- the paired eval-loss delta --------------------------------------------------------------------------
def paired_delta(dense_sums: list[float], sat_sums: list[float]) -> dict:
    """{'eval_loss_delta_pct', 'eval_loss_delta_se_pct', 'examples'} from per-example summed token losses of
    both models on the same examples (the same token counts), as the module doc says."""
    if len(dense_sums) != len(sat_sums) or not dense_sums:
        raise ValueError(f"paired losses need the same examples on both sides, got {len(dense_sums)} and "
                         f"{len(sat_sums)}")
    m, total = len(dense_sums), sum(dense_sums)
    ratio = sum(sat_sums) / total
    z2 = sum((s - ratio * d) ** 2 for d, s in zip(dense_sums, sat_sums))
    se = math.sqrt(m / (m - 1) * z2) / total if m > 1 else float("nan")
    return {"eval_loss_delta_pct": 100.0 * (ratio - 1.0), "eval_loss_delta_se_pct": 100.0 * se, "examples": m}


def over_seeds(deltas: list[float], ses: list[float]) -> dict:
    """Mean of per-seed paired deltas (percent) and its SE (eval sampling and seed spread, module doc)."""
    k = len(deltas)
    mean = statistics.fmean(deltas)
    eval_se = math.sqrt(sum(s * s for s in ses)) / k
    seed_sd = statistics.stdev(deltas) if k > 1 else 0.0
    se = math.sqrt(eval_se ** 2 + seed_sd ** 2 / k)
    return {"eval_loss_delta_pct": mean, "eval_loss_delta_se_pct": se, "eval_loss_delta_eval_se_pct": eval_se,
            "eval_loss_delta_seed_sd_pct": seed_sd, "eval_loss_delta_per_seed_pct": list(deltas)}


def within(delta_pct: float | None, se_pct: float | None, limit_pct: float = 1.0) -> bool | None:
    """Is a setting within +limit% of dense beyond its error bar (mean + 2 SE <= limit)? None when unknown."""
    if delta_pct is None or se_pct is None or math.isnan(se_pct):
        return None
    return delta_pct + 2.0 * se_pct <= limit_pct


# -- curves and time-to-quality --------------------------------------------------------------------------
def curve(run_dir: Path, time_of_step=None) -> list[dict]:
    """Every eval point of a run: step, tokens, train_seconds (measured in that run), eval_loss; with
    time_of_step, also `seconds`: the run's time axis from the interleaved ratios."""
    points = []
    for e in sorted(read_jsonl_records(Path(run_dir) / EVAL_NAME), key=lambda r: r["step"]):
        p = {"step": e["step"], "tokens": e.get("tokens"), "train_seconds": e.get("train_seconds"),
             "eval_loss": e.get("eval_loss")}
        if time_of_step is not None:
            p["seconds"] = time_of_step(e["step"])
        points.append(p)
    return points


def first_reach(evals: list[dict], target: float, key: str) -> float | None:
    """The `key` value (train_seconds, tokens) at which the eval curve first reaches `target` (eval_loss <=
    target), linearly interpolated between the two eval points around the crossing; None if it never does."""
    prev = None
    for e in sorted(evals, key=lambda r: r["step"]):
        if e.get(key) is None or e.get("eval_loss") is None:
            continue
        if e["eval_loss"] <= target:
            if prev is None or prev["eval_loss"] == e["eval_loss"]:
                return float(e[key])
            frac = (prev["eval_loss"] - target) / (prev["eval_loss"] - e["eval_loss"])
            return float(prev[key] + frac * (e[key] - prev[key]))
        prev = e
    return None


def sat_time_axis(cfg: RunConfig, sat_steps: int, dense: dict, ratios: dict[float, float], setup: float = 0.0):
    """step -> SAT's training seconds at that step: dense's measured seconds per step times the dense-step
    equivalents of SAT's schedule up to it (interleaved ratios), plus `setup` dense steps spent before its first
    step (layer_rates: auto measures the layers then)."""
    sat_cfg = copy.deepcopy(cfg)
    sat_cfg.sat.enabled = True
    cumulative = interleaved.dense_equivalents(interleaved.schedule_fractions(sat_cfg, sat_steps), ratios)
    per_step = (dense.get("train_seconds") or 0.0) / max(1, dense.get("steps") or 1)

    def seconds(step: int) -> float:
        if step <= 0:
            return per_step * setup
        return per_step * (setup + cumulative[min(step, len(cumulative)) - 1] + max(0, step - len(cumulative)))

    return seconds


def quality_metrics(dense_dir: Path, sat_dir: Path, dense: dict, sat_seconds=None) -> dict:
    """{'target_eval_loss', 'time_to_quality', 'time_to_quality_separate', 'tokens_to_quality',
    'sat_seconds_to_quality', 'sat_tokens_to_quality'} from the two runs' eval.jsonl and dense's summary;
    sat_seconds: step -> SAT's seconds from the interleaved ratios (sat_time_axis); without it time_to_quality
    is the separate-process figure."""
    target = dense.get("eval_loss")
    out = {"target_eval_loss": target, "time_to_quality": None, "time_to_quality_separate": None,
           "tokens_to_quality": None, "sat_seconds_to_quality": None, "sat_tokens_to_quality": None}
    if target is None:
        return out
    evals = read_jsonl_records(Path(sat_dir) / EVAL_NAME)
    measured, tokens = first_reach(evals, target, "train_seconds"), first_reach(evals, target, "tokens")
    dense_seconds = dense.get("train_seconds")
    if measured is not None and dense_seconds:
        out["time_to_quality_separate"] = measured / dense_seconds
    seconds = measured
    if sat_seconds is not None:
        seconds = first_reach([{**e, "seconds": sat_seconds(e["step"])} for e in evals], target, "seconds")
    out["sat_seconds_to_quality"], out["sat_tokens_to_quality"] = seconds, tokens
    if seconds is not None and dense_seconds:
        out["time_to_quality"] = seconds / dense_seconds
    if tokens is not None and dense.get("tokens"):
        out["tokens_to_quality"] = tokens / dense["tokens"]
    return out


# -- budget: time ----------------------------------------------------------------------------------------
def time_budget(cfg: RunConfig, dense: dict, out: Path, measured: dict) -> dict:
    """The SAT side's max_steps (and eval_steps / save_steps, scaled alike) for `budget: time`, from the
    interleaved ratios; saved in out/budget.json so that a resumed comparison keeps the same plan."""
    path = Path(out) / BUDGET_JSON
    steps = int(dense["steps"])
    ratios = interleaved.ratios_of(measured)
    if path.is_file():
        plan = json.loads(path.read_text())
        if plan.get("dense_steps") == steps and plan.get("ratios") == {str(k): v for k, v in ratios.items()}:
            return plan
    sat_cfg = copy.deepcopy(cfg)
    sat_cfg.sat.enabled = True
    setup = float(measured.get("setup_dense_steps", 0.0))  # time SAT spends before its first step
    sat_steps = interleaved.steps_for_time(max(1, round(steps - setup)),
                                           lambda n: interleaved.schedule_fractions(sat_cfg, n), ratios)
    scale = sat_steps / steps
    plan = {
        "budget": "time",
        "dense_steps": steps,
        "dense_train_seconds": dense.get("train_seconds"),
        "ratios": {str(k): v for k, v in ratios.items()},
        "sat_steps": sat_steps,
        "sat_dense_step_equivalents": setup + interleaved.dense_equivalents(
            interleaved.schedule_fractions(sat_cfg, sat_steps), ratios)[-1],
        "setup_dense_steps": setup,
        "sat_eval_steps": max(1, round(cfg.eval_steps * scale)) if cfg.eval_steps else 0,
        "sat_save_steps": max(1, round(cfg.save_steps * scale)) if cfg.save_steps else 0,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan, indent=2) + "\n")
    return plan
