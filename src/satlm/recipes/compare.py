"""`satlm compare`: the same run dense and with SAT (same data order, same seed), side by side.

    output_dir/dense/  output_dir/sat/   two run directories (see recipes/train.py)
    output_dir/compare.json              dense, sat (their summaries), speedup (tokens/s ratio),
                                         eval_loss_ratio (sat / dense), time_to_quality and
                                         tokens_to_quality (recipes/quality.py), budget
    output_dir/compare.png               loss against tokens and against training time, both runs, with
                                         dense's final eval loss and where SAT first reaches it
    output_dir/budget.json               budget: time only: how the SAT run's steps were planned

budget: tokens (default): both sides train max_steps steps. budget: time: the SAT side trains for the dense
side's training time (its steps estimated from its own measured step time).

With resume=true a finished run is reused and an interrupted one continues from its newest checkpoint.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Sequence

from ..errors import RunConfigError
from ..run_config import RunConfig
from .model_io import check_run_fits_model, check_supported, resolve_model_path
from .plots import plot_compare
from .quality import quality_metrics, time_budget
from .train import SUMMARY_NAME, checkpoints, run_train

COMPARE_JSON, COMPARE_PNG = "compare.json", "compare.png"
MODES = ("dense", "sat")


def mode_config(cfg: RunConfig, mode: str) -> RunConfig:
    """The config of one side: output_dir/<mode>, SAT on for 'sat' and off for 'dense'."""
    sub = copy.deepcopy(cfg)
    sub.output_dir = str(Path(cfg.output_dir) / mode)
    sub.sat.enabled = mode == "sat"
    if cfg.resume is not False:  # continue where each side stopped; a fresh start where nothing was saved
        has_checkpoint = bool(checkpoints(Path(sub.output_dir), sat=sub.sat.enabled))
        sub.resume, sub.overwrite = (True, False) if has_checkpoint else (False, True)
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


def run_compare(cfg: RunConfig, callbacks: Sequence = (), quiet: bool = False) -> dict:
    out = Path(cfg.output_dir)
    if (out / COMPARE_JSON).exists() and cfg.resume is False and not cfg.overwrite:
        raise RunConfigError(f"output_dir {out} already holds a comparison; set overwrite=true to replace it "
                             "or resume=true to continue it")
    model_path = resolve_model_path(cfg.model)
    check_run_fits_model(cfg, model_path)  # before the dense run, not after it
    check_supported(model_path)
    summaries, plan = {}, None
    for mode in MODES:
        sub = mode_config(cfg, mode)
        if mode == "sat" and cfg.budget == "time":
            plan = time_budget(cfg, summaries["dense"], out, quiet=quiet)
            sub.max_steps, sub.eval_steps, sub.save_steps = plan["sat_steps"], plan["sat_eval_steps"], \
                plan["sat_save_steps"]
            if not quiet:
                print(f"satlm compare: budget=time: the SAT run trains {plan['sat_steps']} steps (dense: "
                      f"{plan['dense_steps']}), predicted {plan['predicted_sat_step_seconds']:.2f} s a step against "
                      f"dense's {plan['dense_step_seconds']:.2f} s")
        done = _finished(Path(sub.output_dir)) if cfg.resume is not False else None
        if done is not None and done.get("steps") != sub.max_steps:
            done = None  # a finished run of another length (budget changed): train this one
        if done is not None:
            if not quiet:
                print(f"satlm compare: reusing the finished {mode} run in {sub.output_dir}")
            summaries[mode] = done
        else:
            summaries[mode] = run_train(sub, callbacks=callbacks, quiet=quiet)
    dense, sat = summaries["dense"], summaries["sat"]
    quality = quality_metrics(out / "dense", out / "sat", dense)
    result = {
        "dense": dense,
        "sat": sat,
        "speedup": _ratio(sat["tokens_per_second"], dense["tokens_per_second"]),
        "eval_loss_ratio": _ratio(sat["eval_loss"], dense["eval_loss"]),
        "wall_time_ratio": _ratio(sat["wall_seconds"], dense["wall_seconds"]),
        "train_time_ratio": _ratio(sat.get("train_seconds"), dense.get("train_seconds")),
        "speedup_median": _ratio(sat.get("tokens_per_second_median"), dense.get("tokens_per_second_median")),
        "time_to_quality": quality["time_to_quality"],
        "tokens_to_quality": quality["tokens_to_quality"],
        "quality": quality,
        "budget": cfg.budget,
        "budget_plan": plan,
        "config": cfg.to_dict(),
    }
    (out / COMPARE_JSON).write_text(json.dumps(result, indent=2) + "\n")
    plot_compare({m: out / m for m in MODES}, out / COMPARE_PNG, target=quality["target_eval_loss"],
                 reached=quality["sat_seconds_to_quality"], reached_tokens=quality["sat_tokens_to_quality"])
    if not quiet:
        print_table(result, out)
    return result


def print_table(result: dict, out: Path | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="dense vs SAT" + (f" ({out})" if out else ""))
    for col in ("mode", "steps", "tokens/s", "train time", "train loss", "eval loss", "perplexity", "speedup",
                "time to quality"):
        table.add_column(col, justify="left" if col == "mode" else "right")

    def fmt(value, spec):
        return "n/a" if value is None else format(value, spec)

    ttq = result.get("time_to_quality")
    for mode in MODES:
        s = result[mode]
        speedup = 1.0 if mode == "dense" else result["speedup"]
        quality = "1.00" if mode == "dense" else ("never" if ttq is None else f"{ttq:.2f}")
        table.add_row(mode, str(s["steps"]), fmt(s["tokens_per_second"], ",.0f"),
                      fmt(s.get("train_seconds"), ".1f") + " s", fmt(s["train_loss"], ".4f"), fmt(s["eval_loss"], ".4f"),
                      fmt(s["eval_perplexity"], ".2f"), fmt(speedup, ".2f") + "x", quality)
    console = Console(width=120)
    console.print(table)
    ratio = result["eval_loss_ratio"]
    budget = result.get("budget", "tokens")
    if ratio is not None:
        same = "the same training time" if budget == "time" else "the same tokens"
        console.print(f"SAT eval loss is {100 * (ratio - 1):+.2f}% relative to dense at {same}; "
                      f"tokens/s {fmt(result['speedup'], '.2f')}x")
    target = (result.get("quality") or {}).get("target_eval_loss")
    if target is not None:
        if ttq is None:
            console.print(f"time to quality: SAT's eval loss never reached dense's final {target:.4f}")
        else:
            console.print(f"time to quality: SAT first reached dense's final eval loss {target:.4f} after "
                          f"{100 * ttq:.0f}% of dense's training time and {100 * result['tokens_to_quality']:.0f}% "
                          f"of its tokens")
    mean, median = result["speedup"], result.get("speedup_median")
    if mean and median and abs(mean / median - 1) > 0.05:
        console.print(f"note: throughput varied within a run (another process on the machine?); the speedup "
                      f"from median tokens/s over logged intervals is {median:.2f}x")
    if out:
        console.print(f"wrote {out / COMPARE_JSON} and {out / COMPARE_PNG}")
