"""The SAT core on a real model in a plain training loop, without the Trainer: dense and SAT steps interleaved in
one process (satlm.disable_sat around the dense ones), median seconds per step, unpadded and padded batches.

    python benchmarks/core_loop.py [--model smollm2-135m] [--batch-size 4] [--seq-len 384] [--rate 0.5]

Channels only, dense forward, top-k (the shipped defaults); BENCHMARKS.md compares it with `satlm train`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import satlm
from satlm.app.model_io import load_model, resolve_model_path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=384)
    p.add_argument("--rate", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.manual_seed(0)
    model = load_model(resolve_model_path(args.model), torch.float32, None)
    model.train()
    B, T = args.batch_size, args.seq_len
    ids = torch.randint(0, model.config.vocab_size, (B, T))
    lengths = torch.linspace(T, T * 0.4, B).long()  # padded batch: lengths from T down to 0.4 T
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    satlm.apply_sat(model, satlm.SATConfig(omission_rate=args.rate, schedule="constant"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)

    def step(padded: bool, sat: bool) -> float:
        kw = {"input_ids": ids, "labels": labels, **({"attention_mask": mask} if padded else {})}
        t = time.perf_counter()
        if sat:
            model(**kw).loss.backward()
        else:
            with satlm.disable_sat(model):
                model(**kw).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    times: dict = {}
    for r in range(args.repeats + 1):  # round 0 warms up
        for padded in (False, True):
            for sat in (False, True):
                dt = step(padded, sat)
                if r:
                    times.setdefault((padded, sat), []).append(dt)
    for padded in (False, True):
        d, s = statistics.median(times[padded, False]), statistics.median(times[padded, True])
        print(f"{'padded' if padded else 'unpadded'}: dense {d:.2f} s/step, SAT {s:.2f} s/step, {d / s:.2f}x")


if __name__ == "__main__":
    main()
