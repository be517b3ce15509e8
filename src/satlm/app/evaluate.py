"""Dense held-out loss: perplexity (cpt) or response loss (sft).

    satlm eval MODEL_DIR --data PATH [--task auto|cpt|sft] [--seq-len N] [--batch-size N]

The loss is token-weighted: the mean over every predicted token of the data (responses only for sft).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from pathlib import Path
from typing import Callable

import torch
import yaml

from ..errors import DataError
from .run_config import EMBEDDED, TEMPLATES
from ..data import IGNORE_INDEX, build_eval_dataset, collator_for, detect_task, resolve_data
from ..data.formats import FORMATS, TRAIN_ON


@torch.no_grad()
def evaluate_loss(model, dataset, collator: Callable, batch_size: int = 8,
                  autocast_dtype: torch.dtype | None = None) -> dict:
    """{'loss', 'perplexity', 'tokens'}: token-weighted mean loss in eval mode (SAT layers run dense)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator)
    total, count = 0.0, 0
    amp = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    try:
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # predicted positions (the model shifts)
            if n == 0:
                continue
            with amp:
                loss = model(**batch).loss  # mean over the n predicted tokens
            total += float(loss) * n
            count += n
    finally:
        model.train(was_training)
    if count == 0:
        raise DataError("evaluation data has no token to predict")
    mean = total / count
    return {"loss": mean, "perplexity": math.exp(min(mean, 80.0)), "tokens": count}


@torch.no_grad()
def evaluate_examples(model, dataset, collator: Callable, batch_size: int = 8,
                      autocast_dtype: torch.dtype | None = None) -> tuple[list[float], list[int]]:
    """Per eval example (cpt: per block; sft: per example): (summed token losses, predicted tokens), in the
    dataset's order, dense in eval mode. Two models evaluated on the same dataset give paired losses, whose
    difference has a far smaller standard error than either mean (quality.paired_delta). The token-weighted
    mean sum(sums) / sum(counts) is evaluate_loss's loss up to float rounding."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator)
    sums: list[float] = []
    counts: list[int] = []
    amp = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    try:
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")[:, 1:]  # the model predicts token t+1 at position t
            with amp:
                logits = model(**batch).logits[:, :-1]
            losses = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels,
                                                       ignore_index=IGNORE_INDEX, reduction="none")  # (B, T-1)
            sums += losses.sum(dim=1).double().tolist()
            counts += (labels != IGNORE_INDEX).sum(dim=1).tolist()
    finally:
        model.train(was_training)
    if not any(counts):
        raise DataError("evaluation data has no token to predict")
    return sums, counts


def _run_seq_len(model_dir: Path) -> int | None:
    """seq_len of the run that wrote MODEL_DIR (run/final or run/checkpoint-N), if its config.yaml is there."""
    for cfg in (model_dir / "config.yaml", model_dir.parent / "config.yaml"):
        if cfg.is_file():
            try:
                raw = yaml.safe_load(cfg.read_text()) or {}
                return int(raw["seq_len"])
            except Exception:
                return None
    return None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="satlm eval", description="Dense held-out loss of a saved model.")
    parser.add_argument("model_dir", help="a saved model folder (a run's final/ or checkpoint-N/), or a hub name")
    parser.add_argument("--data", required=True,
                        help="held-out data (text, folder, JSONL, HF dataset folder), or 'embedded' for the demo's")
    parser.add_argument("--task", choices=("auto", "cpt", "sft"), default="auto",
                        help="cpt: perplexity of packed text; sft: response loss; auto: from the data's fields")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="block / truncation length; default: the run's seq_len, else the model's context up to 1024")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-samples", type=int, default=None, help="evaluate the first N blocks or examples")
    parser.add_argument("--template", choices=TEMPLATES, default="auto", help="sft prompt format")
    parser.add_argument("--text-field", default="text", help="cpt: the JSONL field that holds the text")
    parser.add_argument("--format", choices=FORMATS, default="auto",
                        help="sft record format (as data.format in a run config); auto: from the fields")
    parser.add_argument("--columns", default=None, metavar="JSON",
                        help='sft: field renames as data.columns, as JSON, e.g. \'{"instruction": "question"}\'')
    parser.add_argument("--train-on", choices=TRAIN_ON, default="all",
                        help="sft: which assistant turns the loss counts (as data.train_on)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = parser.parse_args(argv)

    from .model_io import load_model, load_tokenizer, resolve_model_path

    model_path = resolve_model_path(args.model_dir)
    task = args.task
    if task == "auto":
        task = "cpt" if args.data == EMBEDDED else detect_task(resolve_data(args.data, "cpt", "eval"))
    data_path = resolve_data(args.data, task, "eval")
    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path)
    seq_len = args.seq_len or _run_seq_len(Path(model_path)) or min(
        1024, int(getattr(model.config, "max_position_embeddings", 1024) or 1024))
    try:
        columns = json.loads(args.columns) if args.columns else None
    except json.JSONDecodeError as e:
        parser.error(f"--columns must be a JSON object: {e}")
    if columns is not None and not isinstance(columns, dict):
        parser.error("--columns must be a JSON object, e.g. '{\"instruction\": \"question\"}'")
    dataset = build_eval_dataset(data_path, task, tokenizer, seq_len, args.template, args.max_samples,
                                 args.text_field, fmt=args.format, columns=columns, train_on=args.train_on)
    result = evaluate_loss(model, dataset, collator_for(task, tokenizer), args.batch_size)
    result = {"model": model_path, "data": str(data_path), "task": task, "seq_len": seq_len,
              "examples": len(dataset), **result}
    if args.json:
        print(json.dumps(result))
    else:
        what = "perplexity" if task == "cpt" else "response perplexity"
        print(f"{model_path} on {data_path} ({task}, {len(dataset):,} {'blocks' if task == 'cpt' else 'examples'}, "
              f"{result['tokens']:,} tokens): loss {result['loss']:.4f}, {what} {result['perplexity']:.2f}")
    return result


if __name__ == "__main__":
    main()
