"""Two satlm trees against each other in one process: the same SAT step timed interleaved, and checked equal.

    cp -r OLD/src/satlm /tmp/old/satlm_old        # the other tree under another package name
    PYTHONPATH=src:/tmp/old python benchmarks/tree_ab.py --other satlm_old [--repeats 15]

For a refactor that must change neither numbers nor speed. Each case builds one model, copies it, applies SAT from
this tree to one copy and from the other tree to the other, and runs forward + backward on the same batch, the order
alternating, after warm-ups; it prints each case's median time ratio (other / this) with its quartiles, and whether
the losses and gradients agree bit for bit. Cases: one Llama layer at the benchmark's shape (d=512, f=1408, 8 heads /
2 KV, T=256, B=8: paper mode with the dense and the thinned forward, and history, r=0.5 for heads and channels),
and with --model, a whole training step of a saved model (its shipped setting: MLP channels r=0.5, dense forward).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import statistics
import time

import torch


def llama(layers: int = 1):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1408, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512, use_cache=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).train()


def step(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def case(name: str, base, batch, configs: dict, repeats: int, warmup: int = 2) -> None:
    models = {}
    for tree, (lib, cfg) in configs.items():
        m = copy.deepcopy(base)
        lib.apply_sat(m, cfg)
        lib.set_sat_step(m, 0, 100)
        models[tree] = m
    torch.manual_seed(1)
    results = {t: step(m, batch) for t, m in models.items()}
    (la, ga), (lb, gb) = results.values()
    same = torch.equal(la, lb) and ga.keys() == gb.keys() and all(torch.equal(ga[k], gb[k]) for k in ga)
    for _ in range(warmup):
        for m in models.values():
            step(m, batch)
    times = {t: [] for t in models}
    for i in range(repeats):
        order = list(models) if i % 2 == 0 else list(models)[::-1]
        for t in order:
            t0 = time.perf_counter()
            step(models[t], batch)
            times[t].append(time.perf_counter() - t0)
    this, other = times["this"], times["other"]
    ratios = [o / t for o, t in zip(other, this)]
    q1, med, q3 = statistics.quantiles(ratios, n=4)
    print(f"{name}: this {statistics.median(this) * 1e3:.0f} ms, other {statistics.median(other) * 1e3:.0f} ms; "
          f"other/this {med:.3f} (IQR {q1:.3f}-{q3:.3f}); same loss and gradients: {same}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--other", required=True, help="the other tree's package name (importable)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--model", default=None, help="a saved model folder for the whole-step case")
    args = p.parse_args()
    import satlm

    other = importlib.import_module(args.other)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 512, (8, 256), generator=g)
    batch = {"input_ids": ids, "labels": ids}
    base = llama()
    for source, forward in (("current", "dense"), ("current", "sparse"), ("history", "sparse")):
        kw = dict(omission_rate=0.5, attn_omission_rate=0.5, source=source, forward=forward, schedule="constant")
        configs = {"this": (satlm, satlm.SATConfig(**kw)), "other": (other, other.SATConfig(**kw))}
        case(f"layer {source}/{forward}", base, batch, configs, args.repeats)
    if args.model:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).train()
        model.config.use_cache = False
        ids = torch.randint(0, model.config.vocab_size, (4, 256), generator=g)
        kw = dict(omission_rate=0.5, attn_omission_rate=0.0, schedule="constant")
        configs = {"this": (satlm, satlm.SATConfig(**kw)), "other": (other, other.SATConfig(**kw))}
        case("whole step (model)", model, {"input_ids": ids, "labels": ids}, configs, max(6, args.repeats // 2))


if __name__ == "__main__":
    main()
