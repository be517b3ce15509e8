"""SAT's loss and gradients against the masked dense reference (benchmarks/reference.py), case by case.

    PYTHONPATH=src python benchmarks/gpu_check.py [--device cuda|cpu] [--json PATH] [--rates 0.5]

Needs torch, transformers and satlm only (no pytest, nothing from tests/). The cases: precision fp32 (TF32
off), bf16 autocast over fp32 master weights (what the HF Trainer runs with bf16=True) and pure bf16 weights;
GQA (8 heads / 2 KV) and multi-head (4 / 4) tiny Llamas with SDPA; padded batches (2-D attention mask) and
unpadded ones (no mask: the is_causal path); attention units head and kv_group; current/sparse, current/dense
and history/sparse (after one seeding step). Tolerances: fp32 1e-4, bf16 5e-2 (relative loss error and
relative gradient-norm error of the worst parameter). A kept set that differs from the reference's counts as a
near-tie, and not as a failure, when the reference masked with SAT's own kept sets matches and the swapped
units' reference scores are within the tolerance of each other; every such case is reported.

One line per case; exit status 0 when every case is ok, 1 when one failed (or raised), 2 without the device.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference import check_case, make_batch, tiny_llama  # noqa: E402

from satlm.core import importance  # noqa: E402
from satlm.core.ops import CUDA_REUSE_COUNTS  # noqa: E402

PRECISIONS = {  # name -> (weights dtype, autocast dtype, tolerance)
    "fp32": (torch.float32, None, 1e-4),
    "bf16-autocast": (torch.float32, torch.bfloat16, 5e-2),
    "bf16": (torch.bfloat16, None, 5e-2),
}
MODELS = {"gqa-8/2": (8, 2), "mha-4/4": (4, 4)}
ROWS = (("current", "sparse"), ("current", "dense"), ("history", "sparse"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", metavar="PATH", help="write every case's record here")
    p.add_argument("--rates", default="0.5", help="comma list of omission rates")
    p.add_argument("--precisions", default=",".join(PRECISIONS))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device")
        return 2
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        hidden, inter, t = 128, 256, 64
    else:
        torch.set_num_threads(min(torch.get_num_threads(), 2))
        hidden, inter, t = 64, 128, 24  # tiny: the dry run of benchmarks/gpu.sh --cpu
    rates = [float(r) for r in args.rates.split(",") if r]
    precisions = [x for x in args.precisions.split(",") if x]
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        print("gpu_check: this GPU has no bf16; bf16 cases skipped")
        precisions = [x for x in precisions if not x.startswith("bf16")]
    batches = {"padded": make_batch(t=t, pad=True, device=device),
               "unpadded": make_batch(t=t, pad=False, device=device)}
    seeds = {"padded": make_batch(t=t, pad=True, seed=3, device=device),
             "unpadded": make_batch(t=t, pad=False, seed=3, device=device)}
    records = []
    start = time.perf_counter()
    print(f"gpu_check on {device}: d={hidden} f={inter} T={t} B=3, 2 layers, SDPA, topk by L2", flush=True)
    for prec in precisions:
        weights, autocast, tol = PRECISIONS[prec]
        for model_name, (heads, kv) in MODELS.items():
            base = tiny_llama(heads=heads, kv_heads=kv, hidden=hidden, inter=inter)
            for pad_name, data in batches.items():
                for unit in ("head", "kv_group"):
                    for source, forward in ROWS:
                        for rate in rates:
                            case = {"precision": prec, "model": model_name, "batch": pad_name, "unit": unit,
                                    "source": source, "forward": forward, "rate": rate, "tol": tol}
                            t0 = time.perf_counter()
                            CUDA_REUSE_COUNTS.clear()
                            try:
                                case.update(check_case(base, data, rate=rate, unit=unit, source=source,
                                                       forward=forward, tol=tol, weights=weights, autocast=autocast,
                                                       seed_data=seeds[pad_name]))
                            except Exception as e:  # noqa: BLE001 - a failed case, recorded; the others still run
                                case.update(ok=False, error=f"{type(e).__name__}: {e}",
                                            traceback=traceback.format_exc())
                            case["seconds"] = round(time.perf_counter() - t0, 3)
                            case["attn_reuse"] = dict(CUDA_REUSE_COUNTS)  # CUDA kernels reused / fallbacks
                            records.append(case)
                            print(line(case), flush=True)
    failed = [c for c in records if not c["ok"]]
    ties = [c for c in records if c.get("near_tie")]
    reuse: dict[str, int] = {}
    for c in records:
        for key, n in c.get("attn_reuse", {}).items():
            reuse[key] = reuse.get(key, 0) + n
    summary = {"device": str(device), "cases": len(records), "ok": len(records) - len(failed), "failed": len(failed),
               "near_ties": len(ties), "errors": sum("error" in c for c in records), "attn_reuse": reuse,
               "fused_scoring": fused_scoring_status(), "seconds": round(time.perf_counter() - start, 1)}
    print(f"gpu_check: {summary['ok']}/{summary['cases']} ok, {summary['failed']} failed, "
          f"{summary['near_ties']} near-tie case(s) compared with SAT's own kept sets, {summary['seconds']} s")
    if device.type == "cuda":  # paper mode's scoring-pass reuse through CUDA's kernels (ops.reuse_kernel)
        print(f"gpu_check: attention kernels reused {reuse or 'never'} (fallback:* = the kernel refused, "
              "the exact fallback ran)")
    print(f"gpu_check: fused scoring {summary['fused_scoring']} (SATConfig.fused_scoring=auto; failed = the "
          "compile failed and scoring ran eager)")
    for c in failed:
        print("FAILED:", line(c))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "cases": records}, indent=1))
    return 1 if failed else 0


def fused_scoring_status() -> dict:
    """Whether each scoring function ran compiled (one read of the activations), failed to compile, or unused."""
    return {name: "failed" if f.failed else "compiled" if f.compiled is not None else "unused"
            for name, f in (("mlp", importance.FUSED_MLP_SCORES), ("head", importance.FUSED_HEAD_SCORES))}


def line(c: dict) -> str:
    head = (f"{c['precision']:13} {c['model']:7} {c['batch']:8} unit={c['unit']:8} {c['source']}/{c['forward']:6} "
            f"rate={c['rate']:.2f}")
    if "error" in c:
        return f"{head} ERROR {c['error']}  FAIL"
    kept = "same_kept" if c["same_kept"] else ("KEPT-COUNTS-DIFFER" if not c["same_kept_counts"] else
                                               f"NEAR-TIE({c['kept_units_differing']} units, gap {c['tie_gap']:.1e})"
                                               if c["near_tie"] else
                                               f"KEPT-DIFFER({c['kept_units_differing']} units, gap {c['tie_gap']:.1e})")
    zero = "" if c["zero_grad_on_omitted"] else " OMITTED-GRAD-NONZERO"
    reuse = "".join(f" {k}={n}" for k, n in sorted(c.get("attn_reuse", {}).items()))
    return (f"{head} loss={c['loss']:.5f} ref={c['ref_loss']:.5f} loss_err={c['loss_rel_err']:.1e} "
            f"grad_err={c['grad_rel_err']:.1e} {kept}{zero}{reuse}  {'ok' if c['ok'] else 'FAIL'}")


if __name__ == "__main__":
    sys.exit(main())
