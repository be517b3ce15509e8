"""The FLOP ceiling of SAT on a whole training step of a model: dense step FLOPs / SAT step FLOPs by
docs/method.md's formulas (per token; attention core 4 T d per token forward, causal masking not discounted;
the output head 2 d V forward, twice that backward; embeddings, norms, loss and optimizer left out).

    python benchmarks/flop_ceiling.py ~/.cache/satlm/models/smollm2-135m --seq-len 256
    python benchmarks/flop_ceiling.py --run configs/real-sft.yaml max_steps=120 batch_size=4

--run reads the run's own first max_steps batches (as its Trainer draws them) and prints the ceiling of MLP
channels at a few rates, all rows and with `loss_tokens_dense` (which omits only in the rows that carry no loss:
its ceiling depends on their share, which only the batches tell).
"""

from __future__ import annotations

import argparse

from transformers import AutoConfig


def step_flops(d, f, d_kv, L, V, T, km=1.0, kh=1.0, kg=1.0, mode="dense", kv=1.0, kvi=1.0):
    """Per-token FLOPs of one step. mode: dense, current-sparse, current-dense, history. kv: the kept fraction of the
    output layer's vocabulary rows in its weight gradient (vocab_omission_rate = 1 - kv); kvi: in its input gradient
    (vocab_omission_input_grad)."""
    mlp_f = {"dense": 6 * d * f, "current-sparse": 4 * d * f + 2 * d * f * km, "current-dense": 6 * d * f,
             "history": 6 * d * f * km}[mode]
    mlp_b = 12 * d * f * (1 if mode == "dense" else km)
    att_f = {"dense": 2 * d * (2 * d + 2 * d_kv), "current-sparse": 2 * d * (d + 2 * d_kv) + 2 * d * d * kh,
             "current-dense": 2 * d * (2 * d + 2 * d_kv), "history": 4 * d * d * kh + 4 * d * d_kv * kg}[mode]
    att_b = 4 * d * (2 * d + 2 * d_kv) if mode == "dense" else 8 * d * d * kh + 8 * d * d_kv * kg
    core = 4 * T * d
    core_f = core * (kh if mode == "history" else 1)
    core_b = 2 * core * (1 if mode == "dense" else kh)
    head = 2 * d * V + 2 * d * V * kvi + 2 * d * V * kv  # forward over every row; input, weight gradient over kvi, kv
    return L * (mlp_f + mlp_b + att_f + att_b + core_f + core_b) + head


def run_ceilings(config: str, overrides: list[str], rates=(0.28, 0.5, 0.625, 0.75)) -> None:
    """The channels-only (dense forward) ceilings of a run's batches, all rows and loss tokens dense."""
    import tempfile
    from pathlib import Path

    from satlm.app.interleaved import _trainer
    from satlm.app.model_io import load_tokenizer, resolve_model_path
    from satlm.app.run_config import load_run_config
    from satlm.data.datasets import build_datasets

    cfg = load_run_config(config, [*overrides, "progress=false"])
    cfg.sat.enabled = False
    path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(path)
    trainer = _trainer(cfg, False, build_datasets(cfg, tokenizer), tokenizer, path, Path(tempfile.mkdtemp()))
    c = AutoConfig.from_pretrained(path)
    d, f, L, V = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    d_kv = c.num_key_value_heads * (getattr(c, "head_dim", None) or d // c.num_attention_heads)
    dense = n_all = n_loss = 0.0
    for i, batch in enumerate(trainer.get_train_dataloader()):
        if i >= cfg.max_steps * cfg.grad_accum:
            break
        labels = batch["labels"]
        n = labels.numel()
        dense += n * step_flops(d, f, d_kv, L, V, labels.shape[1])
        n_all += n
        n_loss += (labels[:, 1:] != -100).sum().item()  # a row carries loss when the next label is not -100
    print(f"{config}: {min(i + 1, cfg.max_steps * cfg.grad_accum)} batches, {n_all:.0f} tokens (padding included), {n_loss / n_all:.1%} carry loss")
    print("| r | all rows | loss tokens dense |\n|---|---|---|")
    for r in rates:
        saved = L * 12 * d * f * r  # the omitted channels' share of the MLP backward, per token
        print(f"| {r} | {dense / (dense - saved * n_all):.3f}x | {dense / (dense - saved * (n_all - n_loss)):.3f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--run", metavar="CONFIG", help="a run config: the ceilings of its own batches")
    ap.add_argument("overrides", nargs="*", help="key=value for --run")
    a = ap.parse_args()
    if a.run:
        return run_ceilings(a.run, [a.model, *a.overrides] if a.model else a.overrides)  # no model with --run
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
    print("\nMLP channels (current/dense) with the output layer's vocabulary rows omitted in its weight gradient "
          "(vocab_omission_rate), and in its input gradient too (+ input: vocab_omission_input_grad):\n"
          "| MLP rate | vocab 0 | vocab 0.9 | vocab 0.95 | vocab 0.9 + input |\n|---|---|---|---|---|")
    for r in (0.0, 0.28, 0.4, 0.5, 0.625):
        row = [f"{dense / step_flops(d, f, d_kv, L, V, a.seq_len, km=1 - r, mode='current-dense', kv=1 - v):.3f}x"
               for v in (0.0, 0.9, 0.95)]
        row.append(f"{dense / step_flops(d, f, d_kv, L, V, a.seq_len, km=1 - r, mode='current-dense', kv=0.1, kvi=0.1):.3f}x")
        print(f"| {r} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
