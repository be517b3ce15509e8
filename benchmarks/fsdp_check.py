"""FSDP2 against DDP with SAT: the same losses and kept units, step by step (benchmarks/gpu.sh, 2+ GPUs).

    PYTHONPATH=src python -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/fsdp_check.py \
        --json OUT.json

Every rank builds the same tiny Llama (fp32, TF32 off), applies SAT and trains a few steps with SGD, first under
DistributedDataParallel, then (from the same weights) under FSDP2 (torch.distributed.fsdp.fully_shard on every
decoder layer, then on the model). Each step's global batch is the same in every process; rank r trains on
its own rows. The two wrappings must give the same mean losses (relative 1e-4) and keep the same units at
every step. NCCL on CUDA (one GPU per rank), gloo on the CPU (--device cpu, a test of this script only).
Rank 0 writes the JSON; exit status 0 when every case matched, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference import make_batch, read_kept, tiny_llama  # noqa: E402

import satlm  # noqa: E402

TOL = 1e-4


CASES = (("current", "sparse"), ("current", "dense"), ("history", "sparse"))


def train(wrap: str, source: str, forward: str, device: torch.device, steps: int, rows: int) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = tiny_llama(heads=4, kv_heads=2, hidden=64, inter=128).to(device)
    satlm.apply_sat(model, satlm.SATConfig(omission_rate=0.5, attn_omission_rate=0.5, mlp_omission_rate=0.5,
                                           schedule="constant", source=source, forward=forward, selection="sample",
                                           seed=3, history_exploration=2.0))
    if wrap == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        engine = model
    else:
        engine = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.SGD(engine.parameters(), lr=0.5, momentum=0.9)
    losses, kept = [], []
    for step in range(steps):
        data = make_batch(b=rows * world, t=32, pad=True, seed=1000 + step, device=device)
        mine = {k: v[rank * rows:(rank + 1) * rows] for k, v in data.items()}
        loss = engine(**mine).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append((mean / world).item())
        kept.append({f"{i}.{c}": v for (i, c), v in read_kept(model).items()})
    return {"losses": losses, "kept": kept}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--json", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rows", type=int, default=2, help="sequences per rank and step")
    args = p.parse_args(argv)
    local = int(os.environ.get("LOCAL_RANK", 0))
    if args.device == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {"world": world, "device": str(device), "tol": TOL, "cases": []}
    failures = 0
    for source, forward in CASES:
        case = {"source": source, "forward": forward}
        try:
            ddp = train("ddp", source, forward, device, args.steps, args.rows)
            fsdp = train("fsdp2", source, forward, device, args.steps, args.rows)
            diffs = [abs(a - b) / max(abs(b), 1e-30) for a, b in zip(fsdp["losses"], ddp["losses"])]
            same_kept = fsdp["kept"] == ddp["kept"]
            case.update(ddp_losses=ddp["losses"], fsdp2_losses=fsdp["losses"], max_rel_diff=max(diffs),
                        same_kept=same_kept, ok=max(diffs) <= TOL and same_kept)
        except Exception as e:  # noqa: BLE001 - recorded; the other case still runs
            case.update(ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        failures += not case["ok"]
        result["cases"].append(case)
        if rank == 0:
            if "error" in case:
                print(f"fsdp2 vs ddp, {source}/{forward}: ERROR {case['error']}  FAIL", flush=True)
            else:
                print(f"fsdp2 vs ddp, {source}/{forward}, {world} ranks, {args.steps} steps: "
                      f"max loss rel diff {case['max_rel_diff']:.1e}, same kept units {case['same_kept']}  "
                      f"{'ok' if case['ok'] else 'FAIL'}", flush=True)
                print("  ddp   losses", " ".join(f"{x:.6f}" for x in case["ddp_losses"]))
                print("  fsdp2 losses", " ".join(f"{x:.6f}" for x in case["fsdp2_losses"]))
    result["ok"] = failures == 0
    if rank == 0:
        Path(args.json).write_text(json.dumps(result, indent=1))
    dist.destroy_process_group()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
