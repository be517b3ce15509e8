"""On a CUDA device: SAT's loss and gradients against the masked dense reference of the test suite.

    python benchmarks/gpu_check.py            # fp32 (TF32 off) and bf16, SDPA, both attention units

Prints one line per case with the loss error and the worst relative gradient error, and exits non-zero
when a case is outside its tolerance (fp32: 1e-4, bf16: 5e-2 relative gradient-norm error).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import batch, tiny_model  # noqa: E402
from test_sparse_reference import history_step_and_reference, reference_step, rel_err, sat_step  # noqa: E402

import satlm  # noqa: E402


def _report(source, dtype, unit, rate, tol, loss, ref_loss, grads, ref_grads, same_kept) -> int:
    worst = max(rel_err(grads[n].float(), g.float()) for n, g in ref_grads.items())
    ok = worst <= tol and same_kept
    print(f"{source:8} {str(dtype):15} unit={unit:8} rate={rate:.2f} loss={loss.item():.5f} "
          f"ref={ref_loss.item():.5f} worst_grad_rel_err={worst:.2e} same_kept={same_kept} "
          f"{'ok' if ok else 'FAIL'}", flush=True)
    return 0 if ok else 1


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    failures = 0
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
        for unit in ("head", "kv_group"):
            for rate in (0.25, 0.5):
                model = tiny_model("llama", heads=8, kv_heads=2, hidden=128, inter=256, attn="sdpa")
                model = model.to("cuda", dtype)
                ref = copy.deepcopy(model)
                data = {k: v.cuda() for k, v in batch(t=64).items()}
                ref_loss, ref_grads, ref_kept = reference_step(ref, data, rate, unit)
                cfg = satlm.SATConfig(omission_rate=rate, schedule="constant", selection="topk",
                                      attn_unit=unit)
                loss, grads, kept = sat_step(model, data, cfg)
                failures += _report("current", dtype, unit, rate, tol, loss, ref_loss, grads, ref_grads,
                                    kept == ref_kept)
                # history: the selection comes first and every projection runs over kept units only
                model = tiny_model("llama", heads=8, kv_heads=2, hidden=128, inter=256, attn="sdpa")
                model = model.to("cuda", dtype)
                seed = {k: v.cuda() for k, v in batch(t=64, seed=3).items()}
                (loss, grads, _), (ref_loss, ref_grads) = history_step_and_reference(model, data, seed, rate, unit)
                failures += _report("history", dtype, unit, rate, tol, loss, ref_loss, grads, ref_grads, True)
    print("gpu_check:", "all ok" if not failures else f"{failures} case(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
