"""Where the time of a training step goes, dense against SAT: torch.profiler, ops grouped by role.

    python benchmarks/profile_step.py                      # whole step: d=512, f=1408, 8 heads, 8 layers, T=256, r=0.5
    python benchmarks/profile_step.py --per-layer --batch-size 8
    python benchmarks/profile_step.py --threads 1 --steps 5 --rate 0.75

Variants are profiled one after another (not interleaved), so read the shares, not small differences of
absolute time; `satlm bench` gives the interleaved ratios. The groups:

    layer GEMMs     every matmul except the output head's
    output head     the matmuls with the vocabulary dimension
    attention core  the SDPA / flash kernels (forward and backward)
    loss            log-softmax and NLL, forward and backward
    optimizer       AdamW (fused or not) and zeroing gradients
    SAT gathers     index_select / index_copy_ / cat / zero-filled gradients that SAT adds
    elementwise     everything else: norms, RoPE, activations, residual adds, scoring, copies
"""

from __future__ import annotations

import argparse
import os
import sys


def _group(name: str, shapes, vocab: int) -> str:
    if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul"):
        flat = [d for s in shapes for d in (s if isinstance(s, (list, tuple)) else [])]
        return "output head" if vocab in flat else "layer GEMMs"
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention core"
    if "log_softmax" in name or "nll_loss" in name:
        return "loss"
    if "adam" in name.lower() or "Optimizer" in name or "_foreach" in name:
        return "optimizer"
    if name in ("aten::index_select", "aten::index_copy_", "aten::scatter_", "aten::cat", "aten::zeros_like",
                "aten::fill_"):
        return "SAT gathers" if name != "aten::fill_" else "elementwise"
    return "elementwise"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-layer", action="store_true")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rate", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)

    if os.environ.get("MALLOC_MMAP_MAX_") is None:  # the allocator settings of `satlm bench`
        from satlm.bench.cli import ALLOCATOR_ENV

        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **ALLOCATOR_ENV})

    import torch
    from torch.profiler import ProfilerActivity, profile

    from satlm.bench.runner import Bench, Shape, Variant, build_model

    if args.threads:
        torch.set_num_threads(args.threads)
    shape = Shape(512, 1408, 8, 8, 1 if args.per_layer else args.layers, 8192)
    model = build_model(shape, None, torch.float32, "cpu", args.seq_len)
    bench = Bench(model, per_layer=args.per_layer, batch_size=args.batch_size, seq_len=args.seq_len,
                  device="cpu", attn_unit="head")
    variants = [Variant("dense", None, 0.0), Variant("current", "current", args.rate),
                Variant("history", "history", args.rate)]
    table: dict[str, dict[str, float]] = {}
    for v in variants:
        with bench.variant(v):
            for _ in range(3):
                bench.step()
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                for _ in range(args.steps):
                    bench.step()
        groups: dict[str, float] = {}
        for e in prof.key_averages(group_by_input_shape=True):
            g = _group(e.key, e.input_shapes or [], shape.vocab_size)
            groups[g] = groups.get(g, 0.0) + e.self_cpu_time_total / args.steps / 1000.0
        table[v.name] = groups
    names = ["layer GEMMs", "attention core", "elementwise", "SAT gathers", "output head", "loss", "optimizer"]
    print(f"threads {torch.get_num_threads()}, rate {args.rate:g}, "
          f"{'one layer' if args.per_layer else f'{args.layers} layers'}, B={args.batch_size}, T={args.seq_len}; "
          "ms per step (share of the step)")
    print(f"{'group':16s}" + "".join(f"{n:>22s}" for n in table))
    for g in names:
        row = ""
        for n in table:
            ms, total = table[n].get(g, 0.0), sum(table[n].values())
            row += f"{ms:14.1f} ({100 * ms / total:4.1f}%)"
        print(f"{g:16s}{row}")
    print(f"{'total':16s}" + "".join(f"{sum(t.values()):22.1f}" for t in table.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
