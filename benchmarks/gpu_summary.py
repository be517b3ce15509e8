"""The summary table of benchmarks/gpu.sh: section | status | seconds | key figures.

    python benchmarks/gpu_summary.py OUT_DIR

Reads OUT_DIR/sections.tsv (written by gpu.sh) and each section's JSON for its key figures; a figure that
cannot be read is shown as such, never as a failure of the table. Standard library only.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def env_figures(out: Path) -> str:
    e = _load(out / "env.json")
    if not e:
        return "no env.json"
    dev = ", ".join(sorted(set(e.get("gpus") or []))) or "no GPU"
    n = e.get("device_count", 0)
    bf16 = "bf16 yes" if e.get("bf16_supported") else "bf16 NO"
    return (f"torch {e.get('torch')}, transformers {e.get('transformers')}, {dev}"
            f"{f' x{n}' if n and n > 1 else ''}, {bf16}")


def check_figures(out: Path) -> str:
    c = _load(out / "check.json")
    if not c:
        return "no check.json"
    s = c["summary"]
    text = f"{s['ok']}/{s['cases']} cases ok, {s['failed']} failed"
    if s.get("errors"):
        text += f" ({s['errors']} raised)"
    text += f", {s['near_ties']} near-tie(s)"
    worst = {}
    for case in c["cases"]:
        if "grad_rel_err" in case:
            key = "fp32" if case["precision"] == "fp32" else "bf16"
            worst[key] = max(worst.get(key, 0.0), case["grad_rel_err"], case["loss_rel_err"])
    if worst:
        text += "; worst rel err " + ", ".join(f"{k} {v:.1e}" for k, v in sorted(worst.items(), reverse=True))
    if s.get("attn_reuse"):  # paper mode's scoring-pass reuse through CUDA's kernels, and any fallbacks
        text += "; attention reuse " + ", ".join(f"{k} {n}" for k, n in sorted(s["attn_reuse"].items()))
    if s.get("fused_scoring"):  # scoring compiled into one read, or a compile that failed (scored eager)
        text += "; fused scoring " + ", ".join(f"{k} {v}" for k, v in sorted(s["fused_scoring"].items()))
    return text


def bench_figures(out: Path, name: str) -> str:
    b = _load(out / f"{name}.json")
    if not b:
        return f"no {name}.json"
    parts = []
    for r in b.get("results", []):
        if abs(r["rate"] - 0.5) > 1e-9:
            continue
        label = r["source"] + ("/dense" if r.get("forward") == "dense" else "")
        text = f"{label} {r['speedup']:.2f}x eff {r['efficiency']:.2f}"
        if "kept_size_speedup" in r:
            text += f" (kept-size {r['kept_size_speedup']:.2f}x)"
        parts.append(text)
    if not parts:
        return "no rate-0.5 rows"
    text = "rate 0.5: " + "; ".join(parts)
    if name == "step":
        text += "; " + step_targets(b)
    return text


# The GPU targets for the whole step (tinyllama-1.1b preset, bf16, r=0.5): speedup over dense and efficiency.
STEP_TARGETS = {"current": (1.45, 0.85), "history": (1.8, 0.85)}


def step_targets(bench: dict) -> str:
    """Which of the targets the rate-0.5 rows of the step section meet (forward sparse: the targets' mode)."""
    missed, seen = [], []
    for r in bench.get("results", []):
        target = STEP_TARGETS.get(r["source"])
        if target is None or abs(r["rate"] - 0.5) > 1e-9 or r.get("forward", "sparse") != "sparse":
            continue
        seen.append(r["source"])
        if r["speedup"] < target[0] or r["efficiency"] < target[1]:
            missed.append(f"{r['source']} {r['speedup']:.2f}x/{r['efficiency']:.2f} < {target[0]}x/{target[1]}")
    if not seen:
        return "targets: no rows"
    return "targets met" if not missed else "targets MISSED: " + ", ".join(missed)


def fsdp_figures(out: Path) -> str:
    f = _load(out / "fsdp2.json")
    if not f:
        return "no fsdp2.json"
    parts = []
    for c in f.get("cases", []):
        if "error" in c:
            parts.append(f"{c['source']}/{c.get('forward')}: {c['error'][:60]}")
        else:
            parts.append(f"{c['source']}/{c.get('forward')}: loss rel diff {c['max_rel_diff']:.1e}, same kept {c['same_kept']}")
    return f"{f.get('world')} ranks; " + "; ".join(parts)


FIGURES = {"env": env_figures, "check": check_figures, "perlayer": lambda o: bench_figures(o, "perlayer"),
           "step": lambda o: bench_figures(o, "step"), "fsdp2": fsdp_figures}


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else "gpu-results")
    with open(out / "sections.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    table = []
    for r in rows:
        name, status, note = r["section"], r["status"], r.get("note") or ""
        try:
            figures = FIGURES[name](out) if name in FIGURES and status != "skipped" else ""
        except Exception as e:  # noqa: BLE001 - a figure that cannot be read is reported, the table still prints
            figures = f"(figures unreadable: {type(e).__name__}: {e})"
        if status == "skipped":
            figures = note
        elif note:
            figures = f"[{note}] {figures}"
        table.append((name, status, r["seconds"], figures))
    head = ("section", "status", "seconds", "key figures")
    w = [max(len(head[i]), *(len(t[i]) for t in table)) for i in range(3)]
    print(f"{head[0]:<{w[0]}} | {head[1]:<{w[1]}} | {head[2]:>{w[2]}} | {head[3]}")
    print(f"{'-' * w[0]}-+-{'-' * w[1]}-+-{'-' * w[2]}-+-{'-' * 11}")
    for name, status, secs, figures in table:
        print(f"{name:<{w[0]}} | {status:<{w[1]}} | {secs:>{w[2]}} | {figures}")
    failed = [t[0] for t in table if t[1] == "FAIL"]
    print(f"{len(table)} sections: {sum(t[1] == 'ok' for t in table)} ok, {len(failed)} failed"
          + (f" ({', '.join(failed)})" if failed else "")
          + f", {sum(t[1] == 'skipped' for t in table)} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
