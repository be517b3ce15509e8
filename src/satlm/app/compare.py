"""`satlm compare`: the same run dense and with SAT (same data order, same seed), side by side.

    output_dir/dense/  output_dir/sat/   two run directories (see app/train.py); with `seeds: [0, 1]`,
                                         output_dir/seed-0/dense, output_dir/seed-0/sat, output_dir/seed-1/...
    output_dir/interleaved.json          the interleaved speed measurement (app/interleaved.py)
    output_dir/compare.json              speedup_interleaved (+ _iqr): dense over SAT step time, dense and SAT
                                         steps interleaved in this process, for the run as scheduled;
                                         eval_loss_delta_pct (+ _se_pct): SAT's eval loss against dense's,
                                         paired on the same eval tokens (over seeds: their mean and SE);
                                         curves: every eval point of both runs; time_to_quality and
                                         tokens_to_quality (app/quality.py); dense and sat (their summaries);
                                         speedup: the two runs' tokens/s ratio (separate processes)
    output_dir/compare.png               loss against tokens and against training time, both runs, with
                                         dense's final eval loss and where SAT first reaches it
    output_dir/budget.json               budget: time only: how the SAT run's steps were planned

budget: tokens (default): both sides train max_steps steps. budget: time: the SAT side trains for the dense
side's training time, its step count from the interleaved ratios.

With resume=true a finished run is reused and an interrupted one continues from its newest checkpoint.
"""

from __future__ import annotations

import copy
import json
import statistics
from pathlib import Path
from typing import Sequence

import torch

from ..errors import RunConfigError
from .run_config import RunConfig
from . import interleaved
from .model_io import check_run_fits_model, check_supported, resolve_model_path
from .plots import plot_compare
from .quality import BUDGET_JSON, curve, over_seeds, paired_delta, quality_metrics, sat_time_axis, time_budget, within
from .train import FINAL_DIR, SUMMARY_NAME, checkpoints, claim_output_dir, run_train

COMPARE_JSON, COMPARE_PNG = "compare.json", "compare.png"
MODES = ("dense", "sat")
WITHIN_PCT = 1.0  # "within +1% of dense": mean + 2 SE of the paired delta at most this


def mode_config(cfg: RunConfig, mode: str) -> RunConfig:
    """The config of one side: output_dir/<mode>, SAT on for 'sat' and off for 'dense'."""
    sub = copy.deepcopy(cfg)
    sub.output_dir = str(Path(cfg.output_dir) / mode)
    sub.sat.enabled = mode == "sat"
    if cfg.resume is not False:  # continue where each side stopped; a fresh start where nothing was saved
        has_checkpoint = bool(checkpoints(Path(sub.output_dir), sat=sub.sat.enabled))
        sub.resume, sub.overwrite = (True, False) if has_checkpoint else (False, True)
    return sub


def seed_config(cfg: RunConfig, seed: int | None) -> RunConfig:
    """The comparison of one seed: output_dir/seed-N, with the run's seed and SAT's selection seed set to N (None:
    the config as it is, in output_dir)."""
    sub = copy.deepcopy(cfg)
    if seed is not None:
        sub.output_dir = str(Path(cfg.output_dir) / f"seed-{seed}")
        sub.seed = sub.sat.seed = seed
    return sub


def _finished(run_dir: Path) -> dict | None:
    path = run_dir / SUMMARY_NAME
    if path.is_file():
        summary = json.loads(path.read_text())
        if summary.get("completed"):
            return summary
    return None


def _ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def paired_eval(cfg: RunConfig, base: Path) -> dict:
    """Both final models' losses on the same eval examples (dense, per example), and the paired delta."""
    from .train import _precision
    from ..data import build_datasets
    from .evaluate import evaluate_examples
    from .model_io import load_model, load_tokenizer

    tokenizer = load_tokenizer(str(base / "dense" / FINAL_DIR))
    data = build_datasets(cfg, tokenizer)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(_precision(cfg))
    sums = {}
    for mode in MODES:
        model = load_model(str(base / mode / FINAL_DIR), torch.float32, cfg.attn_implementation)
        if torch.cuda.is_available():
            model = model.cuda()
        sums[mode], counts = evaluate_examples(model, data.eval, data.eval_collator,
                                               cfg.eval_batch_size or cfg.batch_size, autocast_dtype=amp)
        del model
    tokens = sum(counts)
    return {**paired_delta(sums["dense"], sums["sat"]), "eval_tokens": tokens,
            "dense_eval_loss": sum(sums["dense"]) / tokens, "sat_eval_loss": sum(sums["sat"]) / tokens}


def _train_pair(cfg: RunConfig, measured: dict | None, callbacks, quiet: bool) -> tuple[dict, dict | None]:
    """Both sides of one seed (each reused when finished and resume is on); (summaries, budget plan)."""
    summaries, plan = {}, None
    for mode in MODES:
        sub = mode_config(cfg, mode)
        if mode == "sat" and cfg.budget == "time":
            plan = time_budget(cfg, summaries["dense"], Path(cfg.output_dir), measured)
            sub.max_steps, sub.eval_steps, sub.save_steps = plan["sat_steps"], plan["sat_eval_steps"], \
                plan["sat_save_steps"]
            if not quiet:
                print(f"satlm compare: budget=time: the SAT run trains {plan['sat_steps']} steps in the time of "
                      f"dense's {plan['dense_steps']} (interleaved step-time ratios)")
        done = _finished(Path(sub.output_dir)) if cfg.resume is not False else None
        if done is not None and done.get("steps") != sub.max_steps:
            done = None  # a finished run of another length (budget changed): train this one
        if done is not None:
            if not quiet:
                print(f"satlm compare: reusing the finished {mode} run in {sub.output_dir}")
            summaries[mode] = done
        else:
            summaries[mode] = run_train(sub, callbacks=callbacks, quiet=quiet)
    return summaries, plan


def compare_seed(cfg: RunConfig, seed: int | None, measured: dict | None, callbacks=(), quiet: bool = False) -> dict:
    """Train and compare both sides of one seed (module doc); the per-seed part of compare.json."""
    sub = seed_config(cfg, seed)
    base = Path(sub.output_dir)
    if seed is None:
        summaries, plan = _train_pair(sub, measured, callbacks, quiet)
    else:  # a seed's folder is satlm's too: marked, locked, holding its two runs and its budget plan
        with claim_output_dir(base, "compare", writes=(BUDGET_JSON,), parts=MODES):
            summaries, plan = _train_pair(sub, measured, callbacks, quiet)
    dense, sat = summaries["dense"], summaries["sat"]
    ratios = interleaved.ratios_of(measured) if measured else None
    setup = float(measured.get("setup_dense_steps", 0.0)) if measured else 0.0
    sat_seconds = sat_time_axis(sub, sat["steps"], dense, ratios, setup) if ratios is not None else None
    per_step = (dense.get("train_seconds") or 0.0) / max(1, dense["steps"])
    curves = {"dense": curve(base / "dense", (lambda step: per_step * step) if sat_seconds else None),
              "sat": curve(base / "sat", sat_seconds)}
    paired = paired_eval(sub, base) if dense.get("completed") and sat.get("completed") else {}
    return {
        "seed": sub.seed,
        "dense": dense,
        "sat": sat,
        **{k: paired.get(k) for k in ("eval_loss_delta_pct", "eval_loss_delta_se_pct")},
        "paired_eval": paired,
        "quality": quality_metrics(base / "dense", base / "sat", dense, sat_seconds),
        "curves": curves,
        "speedup": _ratio(sat["tokens_per_second"], dense["tokens_per_second"]),
        "eval_loss_ratio": _ratio(sat["eval_loss"], dense["eval_loss"]),
        "wall_time_ratio": _ratio(sat["wall_seconds"], dense["wall_seconds"]),
        "train_time_ratio": _ratio(sat.get("train_seconds"), dense.get("train_seconds")),
        "speedup_median": _ratio(sat.get("tokens_per_second_median"), dense.get("tokens_per_second_median")),
        "budget_plan": plan,
    }


def _aggregate(cfg: RunConfig, runs: list[dict], measured: dict | None) -> dict:
    """compare.json: the first seed's summaries and the means over seeds (module doc)."""
    first = runs[0]
    deltas = [(r["eval_loss_delta_pct"], r["eval_loss_delta_se_pct"]) for r in runs
              if r["eval_loss_delta_pct"] is not None]
    delta = over_seeds([d for d, _ in deltas], [s for _, s in deltas]) if deltas else {
        "eval_loss_delta_pct": None, "eval_loss_delta_se_pct": None}
    ttq = [r["quality"]["time_to_quality"] for r in runs]
    tkq = [r["quality"]["tokens_to_quality"] for r in runs]
    curves = {m: [{"seed": r["seed"], **p} for r in runs for p in r["curves"][m]] for m in MODES}
    return {
        "dense": first["dense"],
        "sat": first["sat"],
        "speedup_interleaved": measured["speedup_interleaved"] if measured else None,
        "speedup_interleaved_iqr": measured["speedup_interleaved_iqr"] if measured else None,
        **delta,
        "within_1pct": within(delta["eval_loss_delta_pct"], delta["eval_loss_delta_se_pct"], WITHIN_PCT),
        "time_to_quality": None if any(v is None for v in ttq) else statistics.fmean(ttq),
        "tokens_to_quality": None if any(v is None for v in tkq) else statistics.fmean(tkq),
        "time_to_quality_separate": _mean(r["quality"]["time_to_quality_separate"] for r in runs),
        "curves": curves,
        "seeds": [r["seed"] for r in runs],
        "speedup": _mean(r["speedup"] for r in runs),
        "eval_loss_ratio": _mean(r["eval_loss_ratio"] for r in runs),
        "wall_time_ratio": _mean(r["wall_time_ratio"] for r in runs),
        "train_time_ratio": _mean(r["train_time_ratio"] for r in runs),
        "speedup_median": _mean(r["speedup_median"] for r in runs),
        "quality": first["quality"],
        "interleaved": measured,
        "per_seed": [{k: v for k, v in r.items() if k != "curves"} for r in runs],
        "budget": cfg.budget,
        "budget_plan": first["budget_plan"],
        "config": cfg.to_dict(),
    }


def run_compare(cfg: RunConfig, callbacks: Sequence = (), quiet: bool = False) -> dict:
    out = Path(cfg.output_dir)
    if (out / COMPARE_JSON).exists() and cfg.resume is False and not cfg.overwrite:
        raise RunConfigError(f"output_dir {out} already holds a comparison; set overwrite=true to replace it "
                             "or resume=true to continue it")
    if cfg.budget == "time" and not cfg.interleaved_pairs:
        raise RunConfigError("budget=time takes the SAT run's steps from the interleaved speed measurement; set "
                             "interleaved_pairs >= 4 (it is 0)")
    model_path = resolve_model_path(cfg.model)
    check_run_fits_model(cfg, model_path)  # before the dense run, not after it
    check_supported(model_path)
    parts = MODES + tuple(f"seed-{s}" for s in (cfg.seeds or ()))
    writes = (COMPARE_JSON, COMPARE_PNG, BUDGET_JSON, interleaved.INTERLEAVED_JSON)
    with claim_output_dir(out, "compare", writes=writes, parts=parts):  # marked as satlm's and locked
        measured = None
        if cfg.interleaved_pairs:
            measured = interleaved.measured_or_cached(cfg, cfg.max_steps, out, cfg.interleaved_pairs, quiet=quiet)
        runs = [compare_seed(cfg, seed, measured, callbacks, quiet) for seed in (cfg.seeds or [None])]
        result = _aggregate(cfg, runs, measured)
        (out / COMPARE_JSON).write_text(json.dumps(result, indent=2) + "\n")
        q = result["quality"]
        plot_compare(result["curves"], out / COMPARE_PNG, target=q["target_eval_loss"],
                     reached=q["sat_seconds_to_quality"], reached_tokens=q["sat_tokens_to_quality"],
                     thinned=_thinned(cfg))
        if not quiet:
            print_table(result, out)
    return result


def _thinned(cfg: RunConfig) -> bool:
    """Does the SAT side's forward omit units, so that its training loss is not the model's?"""
    return cfg.sat.to_sat_config().effective_forward == "sparse"


def _pct(value, se=None) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.2f}%" + (f" +- {se:.2f}%" if se is not None else "")


def print_table(result: dict, out: Path | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    def fmt(value, spec):
        return "n/a" if value is None else format(value, spec)

    seeds = result.get("seeds") or [None]
    table = Table(title="dense vs SAT" + (f" ({out})" if out else ""))
    for col in ("mode", "seed", "steps", "train loss", "eval loss", "vs dense (paired)", "time to quality",
                "tokens/s (separate runs)"):
        table.add_column(col, justify="left" if col == "mode" else "right")
    for r in result.get("per_seed") or [{**result, "seed": None}]:
        for mode in MODES:
            s = r[mode]
            q = r.get("quality") or {}
            ttq = q.get("time_to_quality")
            vs = "" if mode == "dense" else _pct(r.get("eval_loss_delta_pct"), r.get("eval_loss_delta_se_pct"))
            table.add_row(mode, fmt(r.get("seed"), "d"), str(s["steps"]), fmt(s["train_loss"], ".4f"),
                          fmt(s["eval_loss"], ".4f"), vs,
                          "1.00" if mode == "dense" else ("never" if ttq is None else f"{ttq:.2f}"),
                          fmt(s["tokens_per_second"], ",.0f"))
    console = Console(width=120)
    console.print(table)
    speed = result.get("speedup_interleaved")
    if speed is not None:
        lo, hi = result["speedup_interleaved_iqr"]
        cost = (result.get("interleaved") or {}).get("seconds")
        console.print(f"speedup (dense vs SAT steps interleaved in one process, as scheduled): {speed:.2f}x "
                      f"(IQR {lo:.2f}-{hi:.2f}x" + (f"; measured in {cost:.0f} s)" if cost else ")"))
    budget = result.get("budget", "tokens")
    same = "the same training time" if budget == "time" else "the same tokens"
    where = f"mean of {len(seeds)} seeds" if len(seeds) > 1 else "paired on the same eval tokens"
    delta, se = result.get("eval_loss_delta_pct"), result.get("eval_loss_delta_se_pct")
    if delta is not None:
        verdict = {True: "within", False: "not within", None: "undecided for"}[result.get("within_1pct")]
        console.print(f"SAT eval loss vs dense at {same}: {_pct(delta, se)} (SE; {where}); {verdict} +1% "
                      f"(mean + 2 SE <= 1%)")
    target = (result.get("quality") or {}).get("target_eval_loss")
    ttq = result.get("time_to_quality")
    if target is not None:
        if ttq is None:
            console.print(f"time to quality: SAT's eval loss never reached dense's final {target:.4f}")
        else:
            console.print(f"time to quality: SAT first reached dense's final eval loss {target:.4f} after "
                          f"{100 * ttq:.0f}% of dense's training time (interleaved ratios) and "
                          f"{100 * result['tokens_to_quality']:.0f}% of its tokens")
    console.print(f"tokens/s ratio of the two runs (separate processes, scatters by 15% or more on a shared "
                  f"machine): {fmt(result.get('speedup'), '.2f')}x")
    if out:
        console.print(f"wrote {out / COMPARE_JSON} and {out / COMPARE_PNG}")
