"""Quality sweep on a real model: one dense run per seed, then `satlm compare` for each SAT setting against them.

    python benchmarks/quality_sweep.py --task cpt --out runs/sweep-cpt [--seeds 0,1] [--variants NAME,...]
        [key=value ...]
    python benchmarks/quality_sweep.py table benchmarks/quality/cpt-paired.jsonl
    python benchmarks/quality_sweep.py speed --task cpt --variants c50,c28 [--pairs 6] [key=value ...]

Every variant is `satlm compare configs/real-<task>.yaml <the sweep's overrides> <the variant's overrides>
seeds=[...]` with output_dir=OUT/<variant>, whose seed-S/dense is a link to the shared dense run of seed S
(OUT/dense-seed-S), so the dense side is trained once per seed and every SAT side is compared with the same runs.
After each variant its row is appended to benchmarks/quality/<task>-paired.jsonl: the paired eval-loss delta
(mean over seeds, SE; per seed), speedup_interleaved and its IQR, time- and tokens-to-quality, the mean omission
rates, the curves and the command, so a stopped sweep loses nothing; rerunning skips variants already recorded
with those seeds, and rerunning with more seeds reuses the finished runs of the first ones.

`speed` measures only the variants' interleaved speed (`satlm compare`'s phase, satlm.app.interleaved.measure, no
training): every variant timed in one sitting on one machine, so that their ratios can be set side by side; rows
go to benchmarks/quality/<task>-speed.jsonl with the date, the machine's CPU and the allocator settings.

Timing: set SATLM_CPU_LOCK (default here /tmp/satlm-cpu.lock) and wrap any other heavy job in
`flock /tmp/satlm-cpu.lock ...`: the interleaved timing of each compare holds that lock, so the job waits while
the steps are timed (the training runs themselves may share the machine: only the timing needs it alone).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "quality"

MID = "[" + ",".join(map(str, range(2, 28))) + "]"  # SmolLM2-135M's 30 layers without the first and last two
# Every lever a shipped config may turn on is stated here, off, and turned on by the variants that name it: a variant
# that left sat.vocab_omission_rate unset took configs/real-cpt.yaml's 0.9 once that config shipped it (the 12-07
# speed rows of c40 and c50, and a c62 row, measured c40-v90, c50-v90 and c62-v90).
CHANNELS = ["sat.source=current", "sat.forward=dense", "sat.metric=l2", "sat.selection=topk",
            "sat.attn_omission_rate=0", "sat.vocab_omission_rate=0", "sat.vocab_omission_input_grad=false",
            "sat.loss_tokens_dense=false", "sat.dense_start=0", "sat.layer_drop_rate=0",
            "sat.omitted_update=zero", "sat.layer_rates=null"]


def constant(rate: float, *extra: str) -> list[str]:
    return [*CHANNELS, "sat.schedule=constant", f"sat.omission_rate={rate}", *extra]


def ladder(rate: float, rungs: int, *extra: str) -> list[str]:
    return [*CHANNELS, "sat.schedule=ladder", f"sat.omission_rate={rate}", f"sat.rungs={rungs}", *extra]


# name -> (overrides, what it tests). Every variant states its rates: the shipped configs keep heads.
VARIANTS: dict[str, tuple[list[str], str]] = {
    "shipped": (ladder(0.5, 4, "sat.dense_tail=0.1"), "the shipped setting: ladder 4 from 0.5, 10% dense tail"),
    "c50": (constant(0.5), "r=0.5 throughout, no dense tail (FLOP ceiling 1.227x)"),
    "c28": (constant(0.28), "r=0.28 throughout: the shipped ladder's mean rate (FLOP-matched to it)"),
    "l4-lr": (ladder(0.5, 4, "sat.dense_tail=0.1", "sat.rung_placement=lr", "sat.dense_start=0.05"),
              "ladder 4 from 0.5, rungs of equal LR share, 5% dense start, 10% dense tail"),
    "c50-auto": (constant(0.5, "sat.layer_rates=auto"), "r=0.5 throughout, per-layer rates by sensitivity"),
    "c62": (constant(0.625), "r=0.625 throughout, no dense tail (between 0.5 and 0.75)"),
    "c62-auto": (constant(0.625, "sat.layer_rates=auto"), "r=0.625 throughout, per-layer rates by sensitivity"),
    "c75-auto": (constant(0.75, "sat.layer_rates=auto"), "r=0.75 throughout, per-layer rates by sensitivity"),
    "c58-mid": (constant(0.577, f"sat.layers={MID}"),
                "first and last two layers dense, r=0.577 in the others (FLOP-matched to c50)"),
    "c50-unb": (constant(0.5, "sat.selection=unbiased"),
                "r=0.5 throughout, channels drawn with p proportional to l2 (capped at 1), gradients weighted by 1/p"),
    "c50-skip": (constant(0.5, "sat.omitted_update=skip"), "r=0.5 throughout, omitted units' updates skipped"),
    "drop50": (constant(0.0, "sat.layer_drop_rate=0.5"), "whole-layer backward skipping (DropBP) at 0.5, no "
               "channel omission"),
    "drop50-auto": (constant(0.0, "sat.layer_drop_rate=0.5", "sat.layer_rates=auto"),
                    "whole-layer backward skipping at 0.5, per-layer rates by sensitivity"),
    "drop25-c50": (constant(0.5, "sat.layer_drop_rate=0.25"), "layer skipping 0.25 and channels 0.5"),
    "thin-c50-auto": (constant(0.5, "sat.forward=sparse", "sat.layer_rates=auto"),
                      "the thinned forward (paper mode), r=0.5, per-layer rates"),
    "v90": (constant(0.0, "sat.vocab_omission_rate=0.9"), "the output layer's weight gradient over 10% of the "
            "vocabulary rows (those with the largest logit-gradient norm), no channel omission"),
    "c40": (constant(0.4), "r=0.4 throughout, no dense tail (FLOP ceiling 1.174x)"),
    "c45-v90": (constant(0.45, "sat.vocab_omission_rate=0.9"), "r=0.45 throughout and vocabulary rows 0.9 (FLOP "
                "ceiling 1.292x)"),
    "c40-v90": (constant(0.4, "sat.vocab_omission_rate=0.9"), "r=0.4 throughout and vocabulary rows 0.9 (FLOP ceiling "
                "1.262x)"),
    "c50-v90": (constant(0.5, "sat.vocab_omission_rate=0.9"), "r=0.5 throughout and vocabulary rows 0.9 (FLOP ceiling "
                "1.324x)"),
    "c20-v90": (constant(0.2, "sat.vocab_omission_rate=0.9"), "r=0.2 throughout and vocabulary rows 0.9 (FLOP ceiling "
                "1.154x)"),
    "c62-v90": (constant(0.625, "sat.vocab_omission_rate=0.9"), "r=0.625 throughout and vocabulary rows 0.9 (between "
                "0.5 and 0.75)"),
    "c28-v90": (constant(0.28, "sat.vocab_omission_rate=0.9"), "r=0.28 throughout and vocabulary rows 0.9 (FLOP "
                "ceiling 1.195x)"),
    "c28-v90i": (constant(0.28, "sat.vocab_omission_rate=0.9", "sat.vocab_omission_input_grad=true"),
                 "r=0.28 throughout, vocabulary rows 0.9 in the head's weight and input gradients"),
    "c40-v90i": (constant(0.4, "sat.vocab_omission_rate=0.9", "sat.vocab_omission_input_grad=true"),
                 "r=0.4 throughout, vocabulary rows 0.9 in the head's weight and input gradients"),
    "c50-ltd": (constant(0.5, "sat.loss_tokens_dense=true"), "SFT: r=0.5 in the rows without loss only"),
    "c62-ltd": (constant(0.625, "sat.loss_tokens_dense=true"), "SFT: r=0.625 in the rows without loss only"),
    "c75-ltd": (constant(0.75, "sat.loss_tokens_dense=true"), "SFT: r=0.75 in the rows without loss only"),
    "c50-ltd-v90": (constant(0.5, "sat.loss_tokens_dense=true", "sat.vocab_omission_rate=0.9"),
                    "SFT: r=0.5 in the rows without loss only, and vocabulary rows 0.9"),
    "c50-ltd-v90i": (constant(0.5, "sat.loss_tokens_dense=true", "sat.vocab_omission_rate=0.9",
                              "sat.vocab_omission_input_grad=true"),
                     "SFT: r=0.5 in the rows without loss only, vocabulary rows 0.9 in the head's weight and input "
                     "gradients"),
    "c75-ltd-auto": (constant(0.75, "sat.loss_tokens_dense=true", "sat.layer_rates=auto"),
                     "SFT: r=0.75 in the rows without loss only, per-layer rates"),
}


def run(cmd: list[str], log: Path) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode


def compact_curves(curves: dict) -> dict:
    keys = ("seed", "step", "tokens", "seconds", "train_seconds", "eval_loss")
    return {m: [{k: p.get(k) for k in keys} for p in pts] for m, pts in curves.items()}


def row(name: str, what: str, command: str, result: dict) -> dict:
    from satlm.config import SATConfig
    from satlm.schedules import mean_rate

    sat = SATConfig.from_dict({k: v for k, v in result["config"]["sat"].items() if k != "enabled"})
    steps = result["sat"]["steps"]
    attn, mlp = mean_rate(sat, steps) if sat.rung_placement != "lr" else (None, None)
    inter = result.get("interleaved") or {}
    return {
        "variant": name, "what": what, "command": command, "date": time.strftime("%Y-%m-%d %H:%M"),
        "seeds": result["seeds"], "budget": result["budget"],
        "eval_loss_delta_pct": result["eval_loss_delta_pct"], "eval_loss_delta_se_pct": result["eval_loss_delta_se_pct"],
        "eval_loss_delta_per_seed_pct": result.get("eval_loss_delta_per_seed_pct"),
        "within_1pct": result.get("within_1pct"),
        "speedup_interleaved": result["speedup_interleaved"], "speedup_interleaved_iqr": result["speedup_interleaved_iqr"],
        "interleaved_levels": [{k: lv[k] for k in ("schedule_fraction", "ratio", "steps_at_level")}
                               for lv in inter.get("levels", [])],
        "interleaved_seconds": inter.get("seconds"), "setup_dense_steps": inter.get("setup_dense_steps"),
        "layer_factors": inter.get("layer_factors"),
        "time_to_quality": result["time_to_quality"], "tokens_to_quality": result["tokens_to_quality"],
        "time_to_quality_separate": result.get("time_to_quality_separate"),
        "speedup_separate_processes": result["speedup"],
        "mean_attn_rate": attn, "mean_mlp_rate": mlp,
        "dense_eval_loss": [r["dense"]["eval_loss"] for r in result["per_seed"]],
        "sat_eval_loss": [r["sat"]["eval_loss"] for r in result["per_seed"]],
        "dense_steps": result["dense"]["steps"], "sat_steps": steps,
        "curves": compact_curves(result["curves"]),
    }


def link_dense(vdir: Path, dense_dirs: dict[int, Path]) -> None:
    """vdir/seed-S/dense -> the shared dense run of seed S, in folders marked as satlm comparisons (as `satlm
    compare` marks them), so that compare takes them as its own."""
    from satlm.app.compare import COMPARE_JSON, COMPARE_PNG, MODES
    from satlm.app.interleaved import INTERLEAVED_JSON
    from satlm.app.quality import BUDGET_JSON
    from satlm.app.train import claim_output_dir

    parts = MODES + tuple(f"seed-{s}" for s in dense_dirs)
    with claim_output_dir(vdir, "compare", writes=(COMPARE_JSON, COMPARE_PNG, BUDGET_JSON, INTERLEAVED_JSON),
                          parts=parts):
        for s, dense in dense_dirs.items():
            with claim_output_dir(vdir / f"seed-{s}", "compare", writes=(BUDGET_JSON,), parts=MODES):
                if not (vdir / f"seed-{s}" / "dense").exists():
                    os.symlink(dense, vdir / f"seed-{s}" / "dense")


def _dense(satlm: list[str], config: str, common: list[str], out: Path, seed: int) -> Path | None:
    dense_dir = out / f"dense-seed-{seed}"
    if (dense_dir / "summary.json").is_file() and json.loads((dense_dir / "summary.json").read_text()).get("completed"):
        return dense_dir
    cmd = [*satlm, "train", config, *common, f"seed={seed}", "sat.enabled=false", f"output_dir={dense_dir}",
           "resume=false", "overwrite=true"]
    print(f"[sweep] dense seed {seed}: {' '.join(cmd[2:])}", flush=True)
    if run(cmd, out / "logs" / f"dense-seed-{seed}.log") != 0:
        print("[sweep] the dense run failed; see the log", flush=True)
        return None
    return dense_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["cpt", "sft"], required=True)
    p.add_argument("--out", required=True, help="sweep folder (one subfolder per variant)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of: " + ", ".join(VARIANTS))
    p.add_argument("--seeds", default="0", help="comma list of seeds (both sides once per seed)")
    p.add_argument("--budget", default="tokens", choices=["tokens", "time"])
    p.add_argument("--results", default=None, help="JSONL to append rows to (default "
                   "benchmarks/quality/TASK-paired.jsonl)")
    p.add_argument("--retime", action="store_true", help="measure the listed variants' interleaved speed again "
                   "(their finished runs are reused) and append new rows: for timing that shared the machine")
    p.add_argument("overrides", nargs="*", help="key=value for every run (max_steps=120 ...)")
    args = p.parse_args(argv)
    os.environ.setdefault("SATLM_CPU_LOCK", "/tmp/satlm-cpu.lock")
    out = Path(args.out).resolve()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    config = f"configs/real-{args.task}.yaml"
    common = [*args.overrides, "progress=false", "overwrite=false"]
    results = Path(args.results) if args.results else RESULTS / f"{args.task}-paired.jsonl"
    results.parent.mkdir(parents=True, exist_ok=True)
    satlm = [sys.executable, "-m", "satlm.cli"]
    dense_dirs = {s: _dense(satlm, config, common, out, s) for s in seeds}
    if any(d is None for d in dense_dirs.values()):
        return 1
    done = set()
    if results.is_file():
        done = {(r["variant"], r["budget"], tuple(r["seeds"]), r.get("out"))
                for r in map(json.loads, results.read_text().splitlines())}
    for name in [v for v in args.variants.split(",") if v]:
        overrides, what = VARIANTS[name]
        tag = name if args.budget == "tokens" else f"{name}-time"
        vdir = out / tag
        if args.retime:
            for stale in ("interleaved.json", "compare.json"):  # satlm's own files: measured again below
                (vdir / stale).unlink(missing_ok=True)
        elif (name, args.budget, tuple(seeds), str(out)) in done:
            print(f"[sweep] {tag}: done already", flush=True)
            continue
        link_dense(vdir, {s: dense_dirs[s] for s in seeds})
        cmd = [*satlm, "compare", config, *common, *overrides, f"budget={args.budget}", f"output_dir={vdir}",
               "resume=true", f"seeds=[{','.join(map(str, seeds))}]"]
        command = "satlm compare " + " ".join(cmd[len(satlm) + 1:])
        print(f"[sweep] {tag}: {command}", flush=True)
        rc = run(cmd, out / "logs" / f"{tag}.log")
        if rc != 0 or not (vdir / "compare.json").is_file():
            print(f"[sweep] {tag} failed (exit {rc}); see {out / 'logs' / (tag + '.log')}", flush=True)
            continue
        result = json.loads((vdir / "compare.json").read_text())
        r = row(name, what, command, result)
        r["out"], r["retimed"] = str(out), args.retime
        with open(results, "a") as f:
            f.write(json.dumps(r) + "\n")
        print(f"[sweep] {tag}: eval loss {r['eval_loss_delta_pct']:+.2f}% +- {r['eval_loss_delta_se_pct']:.2f}%, "
              f"speedup (interleaved) {r['speedup_interleaved']:.3f}x, time to quality {r['time_to_quality']}",
              flush=True)
    return 0


def table(path: Path) -> str:
    """A markdown table of the rows of a results file (the last row of each variant and seeds)."""
    rows: dict = {}
    for r in map(json.loads, path.read_text().splitlines()):
        rows[(r["variant"], r["budget"], tuple(r["seeds"]))] = r
    lines = ["| variant | what | seeds | eval loss vs dense (paired, mean +- SE) | per seed | speedup (interleaved, "
             "IQR) | time to quality | mean MLP rate |", "|---|---|---|---|---|---|---|---|"]
    for (name, budget, seeds), r in rows.items():
        lo, hi = r["speedup_interleaved_iqr"] or (None, None)
        per = ", ".join(f"{d:+.2f}%" for d in r.get("eval_loss_delta_per_seed_pct") or [])
        ttq = "never" if r["time_to_quality"] is None else f"{r['time_to_quality']:.2f}"
        rate = "" if r.get("mean_mlp_rate") is None else f"{r['mean_mlp_rate']:.3f}"
        lines.append(f"| {name}{'' if budget == 'tokens' else ' (budget: time)'} | {r['what']} | "
                     f"{','.join(map(str, seeds))} | {r['eval_loss_delta_pct']:+.2f}% +- "
                     f"{r['eval_loss_delta_se_pct']:.2f}% | {per} | {r['speedup_interleaved']:.3f}x "
                     f"({lo:.3f}-{hi:.3f}) | {ttq} | {rate} |")
    return "\n".join(lines)


def speed(argv) -> int:
    """Interleaved speed of each variant alone (module doc), appended to benchmarks/quality/TASK-speed.jsonl."""
    import platform

    from satlm.app import interleaved
    from satlm.app.run_config import load_run_config

    p = argparse.ArgumentParser(prog="quality_sweep.py speed")
    p.add_argument("--task", choices=["cpt", "sft"], required=True)
    p.add_argument("--variants", required=True, help="comma list of: " + ", ".join(VARIANTS))
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--results", default=None)
    p.add_argument("overrides", nargs="*", help="key=value for every variant (max_steps=120 ...)")
    args = p.parse_args(argv)
    os.environ.setdefault("SATLM_CPU_LOCK", "/tmp/satlm-cpu.lock")
    results = Path(args.results) if args.results else RESULTS / f"{args.task}-speed.jsonl"
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else ""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    for name in [v for v in args.variants.split(",") if v]:
        overrides, what = VARIANTS[name]
        cfg = load_run_config(f"configs/real-{args.task}.yaml", [*args.overrides, *overrides, "progress=false"])
        m = interleaved.measure_isolated(cfg, cfg.max_steps, pairs=args.pairs, quiet=True)
        r = {"variant": name, "what": what, "date": time.strftime("%Y-%m-%d %H:%M"), "task": args.task,
             "overrides": [*args.overrides, *overrides], "steps": cfg.max_steps, "pairs": args.pairs,
             "speedup_interleaved": m["speedup_interleaved"], "speedup_interleaved_iqr": m["speedup_interleaved_iqr"],
             "dense_step_seconds": m.get("dense_step_seconds"), "seconds": m["seconds"],
             "levels": [{k: lv[k] for k in ("schedule_fraction", "ratio", "steps_at_level", "dense_seconds",
                                            "sat_seconds")} for lv in m["levels"]],
             "cpu": cpu, "avx512": "avx512f" in flags, "threads": torch_threads(),
             "isolated": m.get("isolated"), "allocator": m.get("allocator")}
        with open(results, "a") as f:
            f.write(json.dumps(r) + "\n")
        lo, hi = r["speedup_interleaved_iqr"]
        print(f"[speed] {name}: {r['speedup_interleaved']:.3f}x (IQR {lo:.3f}-{hi:.3f}), dense step "
              f"{r['dense_step_seconds']:.2f} s, {r['seconds']:.0f} s", flush=True)
    return 0


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "speed":  # quality_sweep.py speed --task cpt --variants ...
        sys.exit(speed(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "table":  # quality_sweep.py table RESULTS.jsonl
        print(table(Path(sys.argv[2])))
        sys.exit(0)
    sys.exit(main())
