"""Quality sweep on a real model: one dense run, then `satlm compare` for each SAT setting against it.

    python benchmarks/quality_sweep.py --task cpt --out runs/sweep-cpt [--variants NAME,...] [key=value ...]

Every variant is `satlm compare configs/real-<task>.yaml <the sweep's overrides> <the variant's overrides>`
with output_dir=OUT/<variant>, whose dense/ is a link to one shared dense run (OUT/dense), so the dense side
is trained once and every SAT side is compared with the same run. After each variant, its row (eval loss
ratio, tokens/s ratio, time- and tokens-to-quality, the command) is appended to
benchmarks/quality/<task>.jsonl, so a stopped sweep loses nothing; rerunning skips finished variants.

The runs take the machine's CPUs: each one holds an exclusive lock on $SATLM_CPU_LOCK (default
/tmp/satlm-cpu.lock) while it trains, so other heavy jobs wrapped in `flock` the same file wait for it.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "quality"

# name -> (overrides, what it tests). Every variant states both rates: the shipped configs keep heads
# (sat.attn_omission_rate: 0), so a variant that left the attention rate out would not omit heads.
SAT_BASE = ["sat.enabled=true", "sat.source=current", "sat.metric=l2", "sat.schedule=ladder", "sat.dense_tail=0.1"]
VARIANTS: dict[str, tuple[list[str], str]] = {
    "sparse-hc50-l4-sample": (SAT_BASE + ["sat.forward=sparse", "sat.omission_rate=0.5",
                                          "sat.attn_omission_rate=0.5", "sat.rungs=4",
                                          "sat.selection=sample"],
                              "the shipped setting before: thinned forward, heads + channels"),
    "dense-hc50-l4-topk": (SAT_BASE + ["sat.forward=dense", "sat.omission_rate=0.5",
                                       "sat.attn_omission_rate=0.5", "sat.rungs=4",
                                       "sat.selection=topk"], "dense forward, heads + channels, ladder 4"),
    "dense-c50-l4-topk": (SAT_BASE + ["sat.forward=dense", "sat.omission_rate=0.5", "sat.attn_omission_rate=0",
                                      "sat.rungs=4", "sat.selection=topk"], "dense forward, channels only"),
    "dense-hc50-l4-sample": (SAT_BASE + ["sat.forward=dense", "sat.omission_rate=0.5",
                                         "sat.attn_omission_rate=0.5", "sat.rungs=4",
                                         "sat.selection=sample"], "dense forward, sample selection"),
    "dense-hc50-l1-topk": (SAT_BASE + ["sat.forward=dense", "sat.omission_rate=0.5",
                                       "sat.attn_omission_rate=0.5", "sat.rungs=1",
                                       "sat.selection=topk"], "dense forward, r=0.5 throughout (one rung)"),
    "dense-hc75-l2-topk": (SAT_BASE + ["sat.forward=dense", "sat.omission_rate=0.75",
                                       "sat.attn_omission_rate=0.75", "sat.rungs=2",
                                       "sat.selection=topk"], "dense forward, ladder 0.75, 0.375"),
    "dense-a25c75-l1-topk": (SAT_BASE + ["sat.forward=dense", "sat.omission_rate=0.75",
                                         "sat.attn_omission_rate=0.25", "sat.rungs=1", "sat.selection=topk"],
                             "dense forward, heads 0.25 and channels 0.75 throughout"),
    "dense-hc50-l1-topk-mid": (SAT_BASE + ["sat.forward=dense", "sat.omission_rate=0.5",
                                           "sat.attn_omission_rate=0.5", "sat.rungs=1",
                                           "sat.selection=topk", "sat.layers=[" + ",".join(map(str, range(2, 28))) + "]"],
                               "dense forward, r=0.5 throughout, first and last two layers dense"),
    "dense-c75-l1-topk": (SAT_BASE + ["sat.forward=dense", "sat.omission_rate=0.75", "sat.attn_omission_rate=0",
                                      "sat.rungs=1", "sat.selection=topk"],
                          "dense forward, channels only, r=0.75 throughout"),
    "dense-c75-l1-sample": (SAT_BASE + ["sat.forward=dense", "sat.omission_rate=0.75", "sat.attn_omission_rate=0",
                                        "sat.rungs=1", "sat.selection=sample"],
                            "dense forward, channels only, r=0.75 throughout, sample selection"),
    "dense-c50-l1-topk": (SAT_BASE + ["sat.forward=dense", "sat.omission_rate=0.5", "sat.attn_omission_rate=0",
                                      "sat.rungs=1", "sat.selection=topk"],
                          "dense forward, channels only, r=0.5 throughout"),
    "dense-c50-l2-topk": (SAT_BASE + ["sat.forward=dense", "sat.omission_rate=0.5", "sat.attn_omission_rate=0",
                                      "sat.rungs=2", "sat.selection=topk"],
                          "dense forward, channels only, ladder 0.5, 0.25"),
    "dense-c75-l4-topk": (SAT_BASE + ["sat.forward=dense", "sat.omission_rate=0.75", "sat.attn_omission_rate=0",
                                      "sat.rungs=4", "sat.selection=topk"],
                          "dense forward, channels only, ladder 4 from 0.75"),
    "sparse-c50-l4-topk": (SAT_BASE + ["sat.forward=sparse", "sat.omission_rate=0.5", "sat.attn_omission_rate=0",
                                       "sat.rungs=4", "sat.selection=topk"],
                           "thinned forward, channels only, ladder 4"),
    "dense-c50-l4-output": (SAT_BASE[:2] + SAT_BASE[3:] + ["sat.metric=output", "sat.forward=dense",
                                                          "sat.omission_rate=0.5", "sat.attn_omission_rate=0",
                                                          "sat.rungs=4", "sat.selection=topk"],
                            "dense forward, channels only, output metric (l2 x the down column's norm)"),
    "dense-c50-l4-topk-mid": (SAT_BASE + ["sat.forward=dense", "sat.omission_rate=0.5", "sat.attn_omission_rate=0",
                                          "sat.rungs=4", "sat.selection=topk",
                                          "sat.layers=[" + ",".join(map(str, range(2, 28))) + "]"],
                              "dense forward, channels only, first and last two layers dense"),
    "history-c50-l1-topk": (SAT_BASE + ["sat.source=history", "sat.forward=sparse", "sat.omission_rate=0.5",
                                        "sat.attn_omission_rate=0", "sat.rungs=1", "sat.selection=topk"],
                            "history (thinned forward, every projection shrinks), channels only"),
}


class cpu_lock:
    """An exclusive flock on $SATLM_CPU_LOCK while a heavy job runs."""

    def __init__(self):
        self.path = os.environ.get("SATLM_CPU_LOCK", "/tmp/satlm-cpu.lock")

    def __enter__(self):
        self.f = open(self.path, "w")
        fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


def run(cmd: list[str], log: Path) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    with cpu_lock(), open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    time.sleep(30)  # let a job waiting for the lock take it before the next run (flock is not first come, first served)
    return rc


def row(name: str, what: str, command: str, result: dict, budget: str) -> dict:
    dense, sat = result["dense"], result["sat"]
    q = result.get("quality") or {}
    return {
        "variant": name, "budget": budget, "what": what, "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "dense_eval_loss": dense["eval_loss"], "sat_eval_loss": sat["eval_loss"],
        "eval_loss_ratio": result["eval_loss_ratio"], "speedup": result["speedup"],
        "speedup_median": result.get("speedup_median"), "train_time_ratio": result.get("train_time_ratio"),
        "time_to_quality": result.get("time_to_quality"), "tokens_to_quality": result.get("tokens_to_quality"),
        "dense_steps": dense["steps"], "sat_steps": sat["steps"],
        "dense_tokens_per_second": dense["tokens_per_second"], "sat_tokens_per_second": sat["tokens_per_second"],
        "target_eval_loss": q.get("target_eval_loss"),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["cpt", "sft"], required=True)
    p.add_argument("--out", required=True, help="sweep folder (one subfolder per variant)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of: " + ", ".join(VARIANTS))
    p.add_argument("--budget", default="tokens", choices=["tokens", "time"])
    p.add_argument("--results", default=None, help="JSONL to append rows to (default benchmarks/quality/TASK.jsonl)")
    p.add_argument("overrides", nargs="*", help="key=value for every run (max_steps=120 ...)")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    config = f"configs/real-{args.task}.yaml"
    common = [*args.overrides, "progress=false", "overwrite=false"]
    results = Path(args.results) if args.results else RESULTS / f"{args.task}.jsonl"
    results.parent.mkdir(parents=True, exist_ok=True)
    satlm = [sys.executable, "-m", "satlm.cli"]

    dense_dir = out / "dense"
    if not (dense_dir / "summary.json").is_file():
        cmd = [*satlm, "train", config, *common, "sat.enabled=false", f"output_dir={dense_dir}", "resume=false",
               "overwrite=true"]
        print(f"[sweep] dense: {' '.join(cmd[2:])}", flush=True)
        if run(cmd, out / "logs" / "dense.log") != 0:
            print("[sweep] the dense run failed; see the log", flush=True)
            return 1
    done = set()
    if results.is_file():
        done = {(r["variant"], r["budget"], r.get("out")) for r in map(json.loads, results.read_text().splitlines())}
    for name in [v for v in args.variants.split(",") if v]:
        overrides, what = VARIANTS[name]
        tag = name if args.budget == "tokens" else f"{name}-time"
        if (name, args.budget, str(out)) in done:
            print(f"[sweep] {tag}: done already", flush=True)
            continue
        vdir = out / tag
        vdir.mkdir(parents=True, exist_ok=True)
        if not (vdir / "dense").exists():
            os.symlink(dense_dir, vdir / "dense")
        cmd = [*satlm, "compare", config, *common, *overrides, f"budget={args.budget}", f"output_dir={vdir}",
               "resume=true"]
        command = "satlm compare " + " ".join(cmd[len(satlm) + 1:])
        print(f"[sweep] {tag}: {command}", flush=True)
        rc = run(cmd, out / "logs" / f"{tag}.log")
        if rc != 0 or not (vdir / "compare.json").is_file():
            print(f"[sweep] {tag} failed (exit {rc}); see {out / 'logs' / (tag + '.log')}", flush=True)
            continue
        result = json.loads((vdir / "compare.json").read_text())
        r = row(name, what, command, result, args.budget)
        r["out"] = str(out)
        with open(results, "a") as f:
            f.write(json.dumps(r) + "\n")
        print(f"[sweep] {tag}: eval loss {100 * (r['eval_loss_ratio'] - 1):+.2f}%, tokens/s {r['speedup']:.2f}x, "
              f"time to quality {r['time_to_quality']}", flush=True)
    return 0




def table(out: Path, dense_dir: Path | None = None) -> str:
    """A markdown table of every finished variant under `out`, against `dense_dir` (default out/dense; a second,
    undisturbed dense run of the same config gives the same losses and cleaner times)."""
    from satlm.recipes.quality import quality_metrics

    dense_dir = dense_dir or out / "dense"
    dense = json.loads((dense_dir / "summary.json").read_text())
    lines = ["| variant | what | eval loss | vs dense | tokens/s vs dense (of medians) | time to quality "
             "| tokens to quality |",
             "|---|---|---|---|---|---|---|",
             f"| dense | | {dense['eval_loss']:.4f} | | 1.00x ({dense['tokens_per_second']:.0f} tokens/s; median "
             f"{dense['tokens_per_second_median']:.0f}) | 1.00 | 1.00 |"]
    for vdir in sorted(p for p in out.iterdir() if (p / "compare.json").is_file()):
        sat = json.loads((vdir / "sat" / "summary.json").read_text())
        q = quality_metrics(dense_dir, vdir / "sat", dense)
        name = vdir.name
        what = VARIANTS.get(name.removesuffix("-time"), ("", ""))[1]
        ttq = "never" if q["time_to_quality"] is None else f"{q['time_to_quality']:.2f}"
        tkq = "never" if q["tokens_to_quality"] is None else f"{q['tokens_to_quality']:.2f}"
        lines.append(f"| {name} | {what} | {sat['eval_loss']:.4f} | {100 * (sat['eval_loss'] / dense['eval_loss'] - 1):+.2f}% "
                     f"| {sat['tokens_per_second'] / dense['tokens_per_second']:.2f}x "
                     f"({sat['tokens_per_second_median'] / dense['tokens_per_second_median']:.2f}x) | {ttq} | {tkq} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "table":  # quality_sweep.py table OUT [DENSE_DIR]
        print(table(Path(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) > 3 else None))
        sys.exit(0)
    sys.exit(main())
