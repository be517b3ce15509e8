"""Time-to-quality and the time budget of `satlm compare`.

time_to_quality: when SAT's eval curve first reaches dense's final eval loss, as a fraction of dense's training
    time (train_seconds: evaluation and checkpoint writing are not counted), interpolated linearly between eval
    points; None when it never does. tokens_to_quality: the same in training tokens. Below 1: SAT gets to
    dense's quality sooner.
budget: time: the SAT run gets the dense run's training time instead of its step count. Its step count is
    estimated before it starts from its own measured step time: each rate the schedule will run is timed
    (forward + backward on the run's first batches, interleaved with dense in one process, medians), the
    dense run's measured step time is scaled by those ratios over the part of the step they cover, and the
    steps are solved for so that the schedule's mean step time times the steps fills the budget. The LR and
    SAT schedules are then laid over those steps as usual.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from pathlib import Path

import torch

from ..run_config import RunConfig
from .recorder import EVAL_NAME, read_jsonl_records

BUDGET_JSON = "budget.json"


# -- time- and tokens-to-quality ------------------------------------------------------------------------
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


def quality_metrics(dense_dir: Path, sat_dir: Path, dense: dict) -> dict:
    """{'target_eval_loss', 'time_to_quality', 'tokens_to_quality', 'sat_seconds_to_quality',
    'sat_tokens_to_quality'} from the two runs' eval.jsonl and dense's summary."""
    target = dense.get("eval_loss")
    out = {"target_eval_loss": target, "time_to_quality": None, "tokens_to_quality": None,
           "sat_seconds_to_quality": None, "sat_tokens_to_quality": None}
    if target is None:
        return out
    evals = read_jsonl_records(Path(sat_dir) / EVAL_NAME)
    seconds, tokens = first_reach(evals, target, "train_seconds"), first_reach(evals, target, "tokens")
    out["sat_seconds_to_quality"], out["sat_tokens_to_quality"] = seconds, tokens
    if seconds is not None and dense.get("train_seconds"):
        out["time_to_quality"] = seconds / dense["train_seconds"]
    if tokens is not None and dense.get("tokens"):
        out["tokens_to_quality"] = tokens / dense["tokens"]
    return out


# -- budget: time ----------------------------------------------------------------------------------------
def schedule_fractions(cfg: RunConfig, steps: int) -> list[float]:
    """The SAT schedule's fraction of the maximum rates (1 = omission_rate) at each step 0..steps-1."""
    from ..schedules import schedule_fraction

    sat = cfg.sat.to_sat_config()
    return [schedule_fraction(sat, t, steps) for t in range(steps)]


def probe_fractions(fractions: list[float], most: int = 6) -> list[float]:
    """The schedule fractions to time: every distinct one (a ladder has a few), or `most` evenly spaced ones
    for a schedule with many (linear), between which the ratio is interpolated."""
    distinct = sorted({round(f, 6) for f in fractions if f > 0}, reverse=True)
    if len(distinct) <= most:
        return distinct
    top = distinct[0]
    return [top * (most - i) / most for i in range(most)]


def interpolate(ratios: dict[float, float], f: float) -> float:
    """The step-time ratio at schedule fraction f, linear between the timed fractions (1 at f = 0)."""
    if f <= 0:
        return 1.0
    points = sorted({0.0: 1.0, **ratios}.items())
    for (f0, r0), (f1, r1) in zip(points, points[1:]):
        if f0 <= f <= f1:
            return r0 + (r1 - r0) * (f - f0) / (f1 - f0) if f1 > f0 else r1
    return points[-1][1]


def _first_batches(cfg: RunConfig, n: int):
    """The model and the first n training batches in a shuffled order, collated as the Trainer would."""
    from .data import build_datasets
    from .model_io import load_model, load_tokenizer, resolve_model_path

    path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(path)
    data = build_datasets(cfg, tokenizer)
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(data.train), generator=g).tolist()
    batches = []
    for b in range(n):
        rows = [data.train[i] for i in order[b * cfg.batch_size:(b + 1) * cfg.batch_size]]
        if len(rows) == cfg.batch_size:
            batches.append(data.collator(rows))
    model = load_model(path, torch.float32, cfg.attn_implementation)
    model.config.use_cache = False
    return model.train(), batches


def measure_step_ratios(cfg: RunConfig, fractions: list[float], repeats: int = 3,
                        n_batches: int = 2) -> dict[float, dict]:
    """For each schedule fraction f (rates f x the maxima): forward + backward seconds with SAT and dense,
    interleaved (one round: dense, then each fraction), medians over `repeats` rounds after a warm-up, on the
    run's own batches. Returns {f: {'seconds', 'dense_seconds', 'ratio'}}."""
    from ..config import SATConfig
    from ..modeling.patch import apply_sat, disable_sat

    model, batches = _first_batches(cfg, n_batches)
    base = cfg.sat.to_sat_config()
    apply_sat(model, base)
    runtime = model.sat_runtime

    def run(f):
        for batch in batches:
            if f is None:
                with disable_sat(model):
                    model(**batch).loss.backward()
                continue
            fields = {**base.to_dict(), "omission_rate": base.omission_rate * f,
                      "attn_omission_rate": base.max_attn_rate * f, "mlp_omission_rate": base.max_mlp_rate * f,
                      "schedule": "constant", "steps": None}
            runtime.config = SATConfig(**fields)
            runtime.set_step(0, None)
            model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)

    variants = [None, *fractions]
    times: dict = {v: [] for v in variants}
    for v in variants:  # warm-up (history: seeds its statistics)
        run(v)
    for _ in range(repeats):
        for v in variants:
            t0 = time.perf_counter()
            run(v)
            times[v].append(time.perf_counter() - t0)
    runtime.config = base
    dense = statistics.median(times[None]) / len(batches)
    return {f: {"seconds": statistics.median(times[f]) / len(batches), "dense_seconds": dense,
                "ratio": statistics.median(times[f]) / statistics.median(times[None])} for f in fractions}


def steps_for_time(budget_seconds: float, dense_step_seconds: float, fb_dense_seconds: float,
                   ratios: dict[float, float], fractions_at) -> tuple[int, float]:
    """(steps, predicted mean step seconds) such that the schedule's steps fill `budget_seconds`.

    A SAT step at schedule fraction f is predicted as the dense run's measured step time less the share of
    forward + backward that SAT saves: dense_step * (1 - c (1 - ratio(f))), c = fb_dense / dense_step (the
    optimizer, data loading and logging are not sparsified). fractions_at(steps) lists each step's fraction;
    the steps are found by fixed-point iteration (a ladder's mean does not depend on the steps, so this takes
    one or two rounds).
    """
    covered = min(1.0, fb_dense_seconds / dense_step_seconds) if dense_step_seconds > 0 else 1.0
    steps = max(1, int(budget_seconds / dense_step_seconds))
    mean = dense_step_seconds
    for _ in range(20):
        per_step = [dense_step_seconds * (1.0 - covered * (1.0 - interpolate(ratios, f))) for f in fractions_at(steps)]
        mean = sum(per_step) / len(per_step)
        new = max(1, int(round(budget_seconds / mean)))
        if new == steps:
            break
        steps = new
    return steps, mean


def time_budget(cfg: RunConfig, dense: dict, out: Path, quiet: bool = False) -> dict:
    """The SAT side's max_steps (and eval_steps / save_steps, scaled alike) for `budget: time`, with how it was
    estimated; saved in out/budget.json so that a resumed comparison keeps the same plan."""
    path = Path(out) / BUDGET_JSON
    if path.is_file():
        plan = json.loads(path.read_text())
        if plan.get("dense_train_seconds") == dense["train_seconds"]:
            return plan
    budget, steps = float(dense["train_seconds"]), int(dense["steps"])
    dense_step = budget / steps
    sat_cfg = copy.deepcopy(cfg)
    sat_cfg.sat.enabled = True
    probes = probe_fractions(schedule_fractions(sat_cfg, steps))
    if not quiet:
        print(f"satlm compare: budget=time: timing SAT at {len(probes)} rate(s) against dense, to plan the SAT "
              f"run's steps within dense's {budget:.0f} s of training", flush=True)
    measured = measure_step_ratios(sat_cfg, probes) if probes else {}
    fb_dense = statistics.median(m["dense_seconds"] for m in measured.values()) if measured else dense_step
    ratios = {f: m["ratio"] for f, m in measured.items()}
    sat_steps, mean = steps_for_time(budget, dense_step, fb_dense, ratios, lambda n: schedule_fractions(sat_cfg, n))
    scale = sat_steps / steps
    plan = {
        "budget": "time",
        "dense_train_seconds": dense["train_seconds"],
        "dense_steps": steps,
        "dense_step_seconds": dense_step,
        "forward_backward_dense_seconds": fb_dense,
        "ratios": [{"schedule_fraction": f, "attn_omission_rate": cfg.sat.max_attn_rate * f,
                    "mlp_omission_rate": cfg.sat.max_mlp_rate * f, "ratio": m["ratio"], "seconds": m["seconds"]}
                   for f, m in measured.items()],
        "sat_steps": sat_steps,
        "predicted_sat_step_seconds": mean,
        "sat_eval_steps": max(1, round(cfg.eval_steps * scale)) if cfg.eval_steps else 0,
        "sat_save_steps": max(1, round(cfg.save_steps * scale)) if cfg.save_steps else 0,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan, indent=2) + "\n")
    return plan
