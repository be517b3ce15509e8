"""Importance scoring per call, eager against fused (SATConfig.fused_scoring: one read of the activations),
interleaved in one process: `python benchmarks/scoring_bench.py [--device cuda] [--repeats 30]`.

Shapes are one layer of a batch (B x T tokens): head scores of (B, T, H, hd) attention outputs and channel
scores of (B, T, f) MLP activations, with and without a padding mask, by the l2 metric (the default)."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from satlm.core import importance


def _time(fn, args, device) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn(*args)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--intermediate-size", type=int, default=1536)
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args(argv)
    dev, dtype = args.device, getattr(torch, args.dtype)
    B, T = args.batch_size, args.seq_len
    g = torch.Generator().manual_seed(0)
    o = torch.randn(B, T, args.heads, args.head_dim, generator=g).to(dev, dtype)
    h = torch.randn(B, T, args.intermediate_size, generator=g).to(dev, dtype)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, : T // 4] = 0
    mask = mask.to(dev)
    print(f"scoring per call on {dev} ({torch.get_num_threads()} threads), {args.dtype}, B={B} T={T}, "
          f"medians of {args.repeats} interleaved calls")
    print(f"{'what':28} {'eager us':>10} {'fused us':>10} {'eager/fused':>12}")
    # paper mode's SiLU-gated MLP holds its activations channels first, (f, N); scored through a (B, T, f) view
    h_rows = h.reshape(B * T, -1).t().contiguous()
    for name, eager, fused, x in (("head l2 (H=%d, hd=%d)" % (args.heads, args.head_dim), importance.head_scores,
                                   importance.FUSED_HEAD_SCORES, o),
                                  ("MLP l2 (f=%d)" % args.intermediate_size, importance.mlp_scores,
                                   importance.FUSED_MLP_SCORES, h),
                                  ("MLP l2, channels first", importance.mlp_scores, importance.FUSED_MLP_SCORES,
                                   h_rows.t().reshape(B, T, -1))):
        for padded in (False, True):
            a = (x, mask if padded else None, "l2", None)
            for _ in range(3):  # warm-up, and the compile
                eager(*a), fused(*a)
            te, tf = [], []
            for _ in range(args.repeats):
                te.append(_time(eager, a, dev))
                tf.append(_time(fused, a, dev))
            me, mf = statistics.median(te) * 1e6, statistics.median(tf) * 1e6
            label = f"{name}{' padded' if padded else ''}"
            print(f"{label:28} {me:10.0f} {mf:10.0f} {me / mf:11.2f}x")
    # what paper mode's SiLU MLP runs on an unpadded batch: one read already, eager (importance.mlp_scores_rows)
    rows = [_time(importance.mlp_scores_rows, (h_rows, "l2"), dev) for _ in range(args.repeats)]
    print(f"{'MLP l2 rows (unpadded path)':28} {statistics.median(rows) * 1e6:10.0f} {'(eager)':>10}")


if __name__ == "__main__":
    main()
