"""The FLOP ceiling of SAT on a whole training step of a model: dense step FLOPs / SAT step FLOPs by
docs/method.md's formulas (per token; attention core 4 T d per token forward, causal masking not discounted;
the output head 2 d V forward, twice that backward; embeddings, norms, loss and optimizer left out).

    python benchmarks/flop_ceiling.py ~/.cache/satlm/models/smollm2-135m --seq-len 256
"""

from __future__ import annotations

import argparse

from transformers import AutoConfig


def step_flops(d, f, d_kv, L, V, T, km=1.0, kh=1.0, kg=1.0, mode="dense"):
    """Per-token FLOPs of one step. mode: dense, current-sparse, current-dense, history."""
    mlp_f = {"dense": 6 * d * f, "current-sparse": 4 * d * f + 2 * d * f * km, "current-dense": 6 * d * f,
             "history": 6 * d * f * km}[mode]
    mlp_b = 12 * d * f * (1 if mode == "dense" else km)
    att_f = {"dense": 2 * d * (2 * d + 2 * d_kv), "current-sparse": 2 * d * (d + 2 * d_kv) + 2 * d * d * kh,
             "current-dense": 2 * d * (2 * d + 2 * d_kv), "history": 4 * d * d * kh + 4 * d * d_kv * kg}[mode]
    att_b = 4 * d * (2 * d + 2 * d_kv) if mode == "dense" else 8 * d * d * kh + 8 * d * d_kv * kg
    core = 4 * T * d
    core_f = core * (kh if mode == "history" else 1)
    core_b = 2 * core * (1 if mode == "dense" else kh)
    head = 3 * 2 * d * V
    return L * (mlp_f + mlp_b + att_f + att_b + core_f + core_b) + head


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--seq-len", type=int, default=256)
    a = ap.parse_args()
    c = AutoConfig.from_pretrained(a.model)
    d, f, L, V = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    hd = getattr(c, "head_dim", None) or d // c.num_attention_heads
    d_kv = c.num_key_value_heads * hd
    dense = step_flops(d, f, d_kv, L, V, a.seq_len)
    print(f"{a.model}: d={d} f={f} d_kv={d_kv} layers={L} vocab={V} T={a.seq_len}; "
          f"output head {3 * 2 * d * V / dense:.0%} of the dense step")
    print("| setting | r=0.25 | r=0.5 | r=0.75 |\n|---|---|---|---|")
    for name, mode, heads in [("channels, current/dense", "current-dense", False),
                              ("channels, current/sparse", "current-sparse", False),
                              ("channels + heads, current/dense", "current-dense", True),
                              ("channels + heads, current/sparse", "current-sparse", True),
                              ("channels + heads, history", "history", True)]:
        row = []
        for r in (0.25, 0.5, 0.75):
            k = 1 - r
            row.append(f"{dense / step_flops(d, f, d_kv, L, V, a.seq_len, km=k, kh=k if heads else 1.0, mode=mode):.2f}x")
        print(f"| {name} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
