"""Dense against SAT on the batches a `satlm train` run feeds its model, interleaved in one process.

    python benchmarks/trainer_ab.py configs/real-sft.yaml [--batches 8] [--repeats 1] [key=value ...]

The Trainer is built as `satlm train` builds it (the config's data, collator, sampler such as
`group_by_length`, optimizer and gradient clipping); each of the first --batches batches is then trained
once dense (`satlm.disable_sat`) and once with SAT, in alternating order, by the Trainer's own
`training_step` plus the optimizer step, so every batch shape is timed on both sides. SAT runs at the
config's maximum rates (the schedule is set constant). Prints per batch its shape and both times, then the
ratio of total times (token-weighted, as tokens/s would be) and the median of the per-batch ratios.
The weights move a little with every step (lr from the config); both sides see the same sequence of models.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--repeats", type=int, default=1, help="passes over the batches (the first one also warms up)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="then profile N steps of each side (torch.profiler) and print the ops whose self CPU time "
                        "differs most between them: where SAT's time goes that its FLOPs do not explain")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()

    from transformers import Trainer, set_seed

    import satlm
    from satlm.modeling.patch import apply_sat
    from satlm.data import build_datasets
    from satlm.app.model_io import load_model, load_tokenizer, resolve_model_path
    from satlm.app.train import training_arguments
    from satlm.app.run_config import load_run_config

    cfg = load_run_config(args.config, [*args.overrides, "sat.enabled=true", "sat.schedule=constant",
                                        "output_dir=/tmp/satlm-trainer-ab", "report_to=none"])
    targs = training_arguments(cfg, "fp32")
    set_seed(cfg.seed)
    path = resolve_model_path(cfg.model)
    tok = load_tokenizer(path)
    data = build_datasets(cfg, tok)
    model = load_model(path, torch.float32, cfg.attn_implementation)
    model.config.use_cache = False
    apply_sat(model, cfg.sat.to_sat_config())
    satlm.set_sat_step(model, 0, cfg.max_steps)
    trainer = Trainer(model=model, args=targs, train_dataset=data.train, data_collator=data.collator,
                      processing_class=tok)
    trainer.create_optimizer_and_scheduler(num_training_steps=cfg.max_steps)
    trainer.current_gradient_accumulation_steps = 1
    opt = trainer.optimizer
    batches = []
    for b in trainer.get_train_dataloader():
        batches.append(b)
        if len(batches) == args.batches:
            break
    model.train()

    def step(batch, sat: bool) -> float:
        t = time.perf_counter()
        if sat:
            trainer.training_step(model, batch)
        else:
            with satlm.disable_sat(model):
                trainer.training_step(model, batch)
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    rows = []
    for r in range(args.repeats + 1):
        for i, b in enumerate(batches):
            order = (False, True) if (i + r) % 2 == 0 else (True, False)
            t = {sat: step(b, sat) for sat in order}
            if r:
                B, T = b["input_ids"].shape
                real = int(b["attention_mask"].sum()) if "attention_mask" in b else B * T
                rows.append((B, T, real, t[False], t[True]))
                print(f"batch {i}: {B} x {T} ({real} real tokens): dense {t[False]:.2f} s, SAT {t[True]:.2f} s, "
                      f"{t[False] / t[True]:.2f}x", flush=True)
    dense, sat = sum(r[3] for r in rows), sum(r[4] for r in rows)
    print(f"total: dense {dense:.1f} s, SAT {sat:.1f} s: {dense / sat:.3f}x; median per-batch "
          f"{statistics.median(r[3] / r[4] for r in rows):.3f}x")
    if args.profile:
        _profile(step, batches, args.profile)


def _profile(step, batches, n: int, top: int = 25) -> None:
    """Self CPU ms per step of each op (grouped by input shapes) on both sides, the largest differences first."""
    from torch.profiler import ProfilerActivity, profile

    per_side: dict = {False: {}, True: {}}
    for i in range(2 * n):  # alternating, one step per profile, so that a drift of the machine hits both sides
        sat = bool(i % 2) if (i // 2) % 2 == 0 else not i % 2
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            step(batches[(i // 2) % len(batches)], sat)
        for e in prof.key_averages(group_by_input_shape=True):
            k = (e.key, str(e.input_shapes)[:90])
            ms, calls = per_side[sat].get(k, (0.0, 0.0))
            per_side[sat][k] = (ms + e.self_cpu_time_total / n / 1000.0, calls + e.count / n)
    keys = set(per_side[False]) | set(per_side[True])
    rows = sorted(keys, key=lambda k: -abs(per_side[True].get(k, (0, 0))[0] - per_side[False].get(k, (0, 0))[0]))
    total = {sat: sum(v[0] for v in per_side[sat].values()) for sat in per_side}
    print(f"profile, self CPU ms per step: dense {total[False]:.0f}, SAT {total[True]:.0f}")
    print(f"{'dense ms':>9s} {'SAT ms':>9s} {'SAT-dense':>9s} {'calls d/s':>11s}  op  shapes")
    for k in rows[:top]:
        d, s_ = per_side[False].get(k, (0.0, 0)), per_side[True].get(k, (0.0, 0))
        print(f"{d[0]:9.1f} {s_[0]:9.1f} {s_[0] - d[0]:+9.1f} {d[1]:5.0f}/{s_[1]:<5.0f}  {k[0]}  {k[1]}")


if __name__ == "__main__":
    main()
