"""Dense against SAT as a user runs them: whole `satlm train` processes, alternated, per-step times compared.

    python benchmarks/process_ab.py configs/real-cpt.yaml [--pairs 3] [--steps 12] [--skip 2] [key=value ...]

The yardstick for `satlm compare`'s interleaved speed measurement (`speedup_interleaved`): that one times a dense
and a SAT copy of the model stepping in turn in one process, which is cheap and paired, but is not what a user's
run is (one model per process, the allocator's and caches' state its own). Here each side is its own `satlm
train` process (`max_steps=--steps`, `logging_steps=1`, no checkpoints, evaluation only at the end), dense,
SAT, SAT, dense, ... (the order alternating, so that the machine's drift falls on both sides alike); a process's
step time is the median of its per-step `train_seconds` differences after the first --skip steps. SAT runs the
config's `sat:` section with the schedule made constant at its maximum rates (key=value overrides apply to both
sides). Prints each process's median and the ratios of the pairs, then the median ratio and its range.
The runs go to a temporary folder that is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def step_seconds(run_dir: Path, skip: int) -> float:
    """Median seconds per optimizer step of a finished run, from metrics.jsonl (logging_steps=1)."""
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    recs = [r for r in recs if "train_seconds" in r and "step" in r]
    steps = [(r["step"], r["train_seconds"]) for r in recs]
    diffs = [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(steps, steps[1:]) if s0 >= skip and s1 > s0]
    if not diffs:
        raise SystemExit(f"process_ab: {run_dir / 'metrics.jsonl'} has no timed steps after step {skip}")
    return statistics.median(diffs)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--skip", type=int, default=2, help="first steps left out (warm-up)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args()
    common = [*args.overrides, f"max_steps={args.steps}", "logging_steps=1", "save_steps=0", "eval_steps=0",
              "progress=false", "overwrite=true", "resume=false", "sat.schedule=constant", "sat.dense_start=0"]
    side = {"dense": ["sat.enabled=false"], "sat": ["sat.enabled=true"]}
    times: dict[str, list[float]] = {"dense": [], "sat": []}
    with tempfile.TemporaryDirectory(prefix="satlm-process-ab-") as tmp:
        for i in range(args.pairs):
            for mode in (("dense", "sat") if i % 2 == 0 else ("sat", "dense")):
                out = Path(tmp) / f"{mode}-{i}"
                cmd = [sys.executable, "-m", "satlm.cli", "train", args.config, *common, *side[mode],
                       f"output_dir={out}"]
                done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                if done.returncode != 0:
                    print(done.stderr[-2000:], file=sys.stderr)
                    return done.returncode
                times[mode].append(step_seconds(out, args.skip))
                print(f"pair {i} {mode:5s} {times[mode][-1]:.3f} s/step", flush=True)
    ratios = [d / s for d, s in zip(times["dense"], times["sat"])]
    print(f"dense s/step {[round(t, 3) for t in times['dense']]}, SAT s/step {[round(t, 3) for t in times['sat']]}")
    print(f"speedup (separate processes, alternated): median {statistics.median(ratios):.3f}x, "
          f"range {min(ratios):.3f}-{max(ratios):.3f} over {len(ratios)} pairs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
