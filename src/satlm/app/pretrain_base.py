"""Pretrain the embedded base model: a 5M-parameter Llama (GQA, SwiGLU) on the stdlib's Python code.

    python -m satlm.app.pretrain_base --out src/satlm/assets/base

Flat recipe, top to bottom: tokenizer -> packed blocks -> model -> train loop -> held-out evaluation -> save.
The corpus is `corpus.code_texts` (stdlib sources, docstrings stripped); the prose the CPT demo adapts to
(`corpus.prose_texts`) is evaluated too, so the demo has a "before" figure. Everything is fp32 on the CPU
and seeded; the saved weights are fp16 (half the package size) and the figures land in PROVENANCE.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from ..data import corpus
from ..data.packing import pack_blocks

SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<unk>"]  # ids 0..3, in this order
# 650 steps x 2,048 tokens = 1.3M tokens (~0.6 epoch): 12-15 min at 1,500-1,900 tokens/s on one CPU thread.
DEFAULT_STEPS = 650
MODEL_SHAPE = dict(
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
)


def train_tokenizer(texts: list[str], vocab_size: int = 8192):
    """Byte-level BPE (any text encodes, nothing is <unk>) wrapped as a transformers fast tokenizer.

    Like Llama's tokenizer it prepends <s> to every encoded text; </s> ends documents in packing.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=MODEL_SHAPE["max_position_embeddings"],
    )


def save_tokenizer(tokenizer, out_dir: Path) -> None:
    """`save_pretrained`, naming the class `PreTrainedTokenizerFast`, which transformers 4.x and 5.x both load
    (5.x writes its own `TokenizersBackend`, unknown to 4.x)."""
    tokenizer.save_pretrained(out_dir)
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def spread(blocks: torch.Tensor, cap: int) -> torch.Tensor:
    """At most `cap` blocks evenly spaced over all of them (the files are in path order; don't take only a-c)."""
    if len(blocks) <= cap:
        return blocks
    return blocks[torch.linspace(0, len(blocks) - 1, cap).round().long()]


def unigram_loss(train_blocks: torch.Tensor, eval_blocks: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of the eval targets under the training unigram distribution, add-one smoothed.

    Scored on the same positions as the model's loss (every token but the first of each block).
    """
    counts = torch.bincount(train_blocks.flatten(), minlength=vocab_size).double() + 1.0
    log_p = counts.log() - counts.sum().log()
    return -log_p[eval_blocks[:, 1:].flatten()].mean().item()


@torch.no_grad()
def evaluate(model, blocks: torch.Tensor, batch_size: int) -> float:
    """Mean next-token loss (nats/token) over `blocks`; every block has the same number of targets."""
    was_training = model.training
    model.eval()
    losses = [model(input_ids=x, labels=x).loss.item() * len(x) for x in blocks.split(batch_size)]
    model.train(was_training)
    return sum(losses) / len(blocks)


def lr_at(step: int, steps: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warmup to `peak`, then cosine down to `floor * peak` at the last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def _default_command(out_dir, steps, max_minutes, seed, threads) -> str:
    args = ["--out", str(out_dir), "--steps", str(steps), "--max-minutes", str(max_minutes), "--seed", str(seed)]
    args += ["--threads", str(threads)] if threads else []
    return "python -m satlm.app.pretrain_base " + shlex.join(args)


def pretrain_base(
    out_dir: Path | str,
    steps: int = DEFAULT_STEPS,
    max_minutes: float = 20.0,
    seed: int = 0,
    threads: int | None = None,
    batch_size: int = 8,
    block_size: int = 256,
    lr: float = 2e-3,
    warmup: int = 50,
    vocab_size: int = 8192,
    eval_cap: int = 200,
    log_every: int = 50,
    command: str | None = None,
) -> dict:
    """Train tokenizer and model, save both (fp16 safetensors) with PROVENANCE.json into `out_dir`.

    `steps` fixes the run (and the cosine schedule); `max_minutes` only stops a run on a machine far slower
    than expected, and PROVENANCE.json then says how many steps were done. `threads` sets torch's intra-op
    threads: on a small machine shared with other jobs one thread is steadier than two (OpenMP threads that
    wait for a descheduled sibling made a 2-thread step 3x slower than a 1-thread one under contention).
    Returns the provenance dict.
    """
    import tokenizers
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    command = command or _default_command(out_dir, steps, max_minutes, seed, threads)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    started = time.perf_counter()

    # --- data: tokenizer from the training code only; blocks of train code, eval code, eval prose
    train_texts, eval_texts = corpus.code_texts("train"), corpus.code_texts("eval")
    prose_eval_texts = corpus.prose_texts("eval")
    tokenizer = train_tokenizer(train_texts, vocab_size)
    train_blocks = pack_blocks(train_texts, tokenizer, block_size, "train")  # (N, T)
    eval_blocks = pack_blocks(eval_texts, tokenizer, block_size, "eval")
    prose_blocks = pack_blocks(prose_eval_texts, tokenizer, block_size, "prose eval")
    eval_sample, prose_sample = spread(eval_blocks, eval_cap), spread(prose_blocks, eval_cap)
    train_bytes = sum(len(t.encode("utf-8")) for t in train_texts)
    print(
        f"corpus: {len(train_texts)} train / {len(eval_texts)} eval files, {train_blocks.numel():,} train tokens "
        f"({train_bytes / train_blocks.numel():.2f} bytes/token), {eval_blocks.numel():,} eval tokens, "
        f"{prose_blocks.numel():,} eval prose tokens; data ready in {time.perf_counter() - started:.0f}s",
        flush=True,
    )

    # --- model: fp32, seeded init
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MODEL_SHAPE,
    )
    model = LlamaForCausalLM(config).float().train()
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1, fused=True
    )
    generator = torch.Generator().manual_seed(seed)
    print(f"model: {n_params / 1e6:.2f}M parameters; {steps} steps of {batch_size}x{block_size} tokens", flush=True)

    # --- train: shuffled blocks, a new permutation each epoch
    order, cursor = torch.randperm(len(train_blocks), generator=generator), 0
    history, loss_sum, loss_count = [], 0.0, 0
    train_started = time.perf_counter()
    step = 0
    for step in range(steps):
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(train_blocks), generator=generator), 0
        x = train_blocks[order[cursor : cursor + batch_size]]  # (B, T)
        cursor += batch_size
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

        loss_sum, loss_count = loss_sum + loss.item(), loss_count + 1
        elapsed = time.perf_counter() - train_started
        out_of_time = elapsed > max_minutes * 60
        if (step + 1) % log_every == 0 or step + 1 == steps or out_of_time:
            tokens_per_s = (step + 1) * batch_size * block_size / elapsed
            history.append({"step": step + 1, "train_loss": round(loss_sum / loss_count, 4), "elapsed_s": round(elapsed, 1)})
            print(
                f"step {step + 1:5d}/{steps}  loss {loss_sum / loss_count:.3f}  lr {lr_at(step, steps, lr, warmup):.2e}  "
                f"{tokens_per_s:,.0f} tok/s  {elapsed / 60:.1f} min",
                flush=True,
            )
            loss_sum, loss_count = 0.0, 0
        if out_of_time:
            print(f"stopping after {step + 1} steps: max_minutes={max_minutes} reached", flush=True)
            break
    steps_done = step + 1
    train_seconds = time.perf_counter() - train_started

    # --- evaluate: held-out code (the pretraining domain), the unigram baseline, and the CPT prose domain
    eval_loss = evaluate(model, eval_sample, batch_size)
    prose_loss = evaluate(model, prose_sample, batch_size)
    unigram = unigram_loss(train_blocks, eval_sample, len(tokenizer))
    unigram_prose = unigram_loss(train_blocks, prose_sample, len(tokenizer))
    model.half()  # what ships: weights rounded to fp16, scored again in fp32
    eval_loss_fp16 = evaluate(model.float(), eval_sample, batch_size)
    print(
        f"held-out code loss {eval_loss:.3f} (fp16 weights {eval_loss_fp16:.3f}) vs unigram {unigram:.3f}; "
        f"prose loss {prose_loss:.3f} vs unigram {unigram_prose:.3f}",
        flush=True,
    )

    # --- save: fp16 safetensors, tokenizer, provenance
    out_dir.mkdir(parents=True, exist_ok=True)
    model.half().save_pretrained(out_dir)
    save_tokenizer(tokenizer, out_dir)
    provenance = {
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "torch_threads": torch.get_num_threads(),
        "corpus": {
            "source": "stdlib .py files of the interpreter above (satlm.data.corpus), docstrings stripped",
            "train_files": len(train_texts),
            "eval_files": len(eval_texts),
            "train_bytes": train_bytes,
            "train_tokens": train_blocks.numel(),
            "eval_tokens": eval_blocks.numel(),
            "eval_tokens_scored": eval_sample.numel(),
            "prose_eval_texts": len(prose_eval_texts),
            "prose_eval_tokens_scored": prose_sample.numel(),
        },
        "tokenizer": {"type": "byte-level BPE", "vocab_size": len(tokenizer), "special_tokens": SPECIAL_TOKENS},
        "model": {"architecture": "LlamaForCausalLM", "parameters": n_params, **MODEL_SHAPE},
        "training": {
            "seed": seed,
            "steps_planned": steps,
            "steps": steps_done,
            "batch_size": batch_size,
            "block_size": block_size,
            "tokens_seen": steps_done * batch_size * block_size,
            "optimizer": "AdamW fused, betas (0.9, 0.95), weight_decay 0.1, grad clip 1.0",
            "lr": f"{lr} peak, {warmup} warmup steps, cosine to 10%",
            "dtype": "float32 (saved as float16)",
            "wall_seconds": round(train_seconds, 1),
            "tokens_per_second": round(steps_done * batch_size * block_size / train_seconds),
            "history": history,
        },
        "eval": {
            "units": "nats/token",
            "code_loss": round(eval_loss, 4),
            "code_loss_fp16_weights": round(eval_loss_fp16, 4),
            "code_unigram_baseline": round(unigram, 4),
            "prose_loss": round(prose_loss, 4),
            "prose_unigram_baseline": round(unigram_prose, 4),
        },
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    (out_dir / "PROVENANCE.json").write_text(json.dumps(provenance, indent=2) + "\n")
    print(f"saved to {out_dir}", flush=True)
    return provenance


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="satlm pretrain-base", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for the model, tokenizer and PROVENANCE.json")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimizer steps (fixes the schedule)")
    parser.add_argument("--max-minutes", type=float, default=20.0, help="stop early if training takes longer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    return pretrain_base(
        args.out, steps=args.steps, max_minutes=args.max_minutes, seed=args.seed, threads=args.threads
    )


if __name__ == "__main__":
    main()
