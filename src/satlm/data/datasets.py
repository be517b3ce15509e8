"""Training and evaluation data for a run: read, split, tokenize, pack (cpt) or mask prompts (sft).

cpt: documents from text files, folders, JSONL (`text`) or a local HF dataset, each wrapped as
     <bos> text <eos>, concatenated and cut into blocks of seq_len tokens; the ragged tail is dropped.
sft: Alpaca records (instruction/input/output) or chat records (messages), rendered with the tokenizer's
     chat template or a built-in one; labels are -100 on everything but the responses.
When no eval data is given, a fixed fraction of the documents (examples) is held out by a hash of its
content, so the split does not depend on file order, the process or the seed.

The datasets and collators of a run, built from its config (`build_datasets`), cached tokenized
(data/tokcache.py) or in memory."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import DataError
from .config import EMBEDDED
from .chat import _encode, _too_long, ensure_pad_token, uses_chat_template
from .packing import IGNORE_INDEX, PackedCollator, pack_blocks, pack_examples
from .readers import (hf_eval_split, is_hf_dataset, load_conversations, load_documents, resolve_data,
                      split_held_out)



# -- datasets and collators ------------------------------------------------------------------------------
class BlockDataset(torch.utils.data.Dataset):
    """Packed fixed-length blocks; labels are the inputs (the model shifts them)."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks  # (n_blocks, seq_len)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}

    def num_tokens(self) -> int:
        return self.blocks.numel()


class SFTDataset(torch.utils.data.Dataset):
    def __init__(self, examples: list[dict]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.examples[i]

    def num_tokens(self) -> int:
        return sum(len(e["input_ids"]) for e in self.examples)


def collate_blocks(batch: list[dict]) -> dict[str, torch.Tensor]:
    ids = torch.stack([b["input_ids"] for b in batch])  # (B, T)
    return {"input_ids": ids, "labels": ids.clone()}


@dataclass
class SFTCollator:
    """Right-pads a batch to its longest example; padding is masked out of attention and loss."""

    pad_token_id: int

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n] = torch.as_tensor(b["input_ids"])
            labels[i, :n] = torch.as_tensor(b["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collator_for(task: str, tokenizer) -> Callable:
    if task == "cpt":
        return collate_blocks
    ensure_pad_token(tokenizer)
    return SFTCollator(tokenizer.pad_token_id)


@dataclass
class RunData:
    train: torch.utils.data.Dataset
    eval: torch.utils.data.Dataset
    collator: Callable
    info: dict[str, Any] = field(default_factory=dict)
    eval_collator: Callable | None = None  # when it differs from the training one (packed SFT)

    def __post_init__(self):
        if self.eval_collator is None:
            self.eval_collator = self.collator


def _sft_examples(convs, tokenizer, seq_len, chat, name, truncation="truncate") -> tuple[list[dict], int, int]:
    """(examples, how many were dropped, how many were cut to seq_len and kept)."""
    kept, dropped, cut = [], 0, 0
    for where, messages in convs:
        example, was_cut = _encode(messages, tokenizer, seq_len, chat, where)
        if was_cut and truncation == "error":
            raise _too_long(where, seq_len)
        if example is None:
            dropped += 1
        else:
            kept.append(example)
            cut += was_cut
    if not kept:
        raise DataError(f"{name}: no example keeps a response token within seq_len={seq_len} "
                        f"({dropped} of {len(convs)} dropped by truncation); raise seq_len")
    return kept, dropped, cut


def _warn_truncation(name: str, seq_len: int, cut: int, dropped: int, total: int) -> None:
    """One warning per data set, never one per example."""
    if cut or dropped:
        warnings.warn(f"{name}: {cut + dropped} of {total} sft examples are longer than seq_len={seq_len}: "
                      f"{cut} truncated, {dropped} dropped (truncation left no response token); raise seq_len "
                      "to keep them whole, or set data.truncation=error to stop on the first", UserWarning,
                      stacklevel=3)


def build_datasets(cfg, tokenizer) -> RunData:
    """The train and eval datasets and the collator of a run config; with data.cache (default) tokenized once
    into the on-disk cache (satlm.data.tokcache) and memory-mapped from it."""
    d, task = cfg.data, cfg.task
    train_path = resolve_data(d.train, task, "train", d.cache_dir, d.subset, d.split)
    eval_spec = d.eval if d.eval is not None else (EMBEDDED if d.train == EMBEDDED else None)
    eval_path = resolve_data(eval_spec, task, "eval", d.cache_dir, d.subset) if eval_spec is not None else None
    if eval_path is None and is_hf_dataset(train_path) and hf_eval_split(train_path):
        eval_path = train_path
    if not d.cache:
        return _build_in_memory(cfg, tokenizer, train_path, eval_path)
    from .tokcache import cached_build

    def finish(train, eval_, info):
        if task == "sft" and d.packing:
            return RunData(train, eval_, PackedCollator(tokenizer.pad_token_id), info, collator_for(task, tokenizer))
        return RunData(train, eval_, collator_for(task, tokenizer), info)

    return cached_build(cfg, tokenizer, train_path, eval_path,
                        lambda: _build_in_memory(cfg, tokenizer, train_path, eval_path), finish)


def _build_in_memory(cfg, tokenizer, train_path, eval_path) -> RunData:
    d, task = cfg.data, cfg.task
    cap = d.max_eval_samples
    info: dict[str, Any] = {"train_path": str(train_path), "eval_path": str(eval_path) if eval_path else "held out"}

    if task == "cpt":
        docs = load_documents(train_path, d.text_field, "train")
        if eval_path is not None:
            train_docs, eval_docs = docs, load_documents(eval_path, d.text_field, "eval")
        else:
            train_docs, eval_docs = split_held_out(docs, d.eval_fraction)
        train_blocks = pack_blocks(train_docs, tokenizer, cfg.seq_len, str(train_path))
        if eval_docs:
            eval_blocks = pack_blocks(eval_docs, tokenizer, cfg.seq_len, f"{eval_path or train_path} (eval)")
        else:  # a single document: hold out its last blocks
            n_eval = max(1, round(d.eval_fraction * len(train_blocks)))
            if len(train_blocks) < 2:
                raise DataError(f"{train_path}: one block of seq_len={cfg.seq_len}; too little to hold out eval data")
            train_blocks, eval_blocks = train_blocks[:-n_eval], train_blocks[-n_eval:]
        train_ds, eval_ds = BlockDataset(train_blocks), BlockDataset(eval_blocks[:cap] if cap else eval_blocks)
        info.update(train_documents=len(train_docs), eval_documents=len(eval_docs))
    else:
        chat = uses_chat_template(tokenizer, d.template)
        how = (d.format, d.columns, d.train_on)
        convs = load_conversations(train_path, "train", *how)
        if eval_path is not None:
            train_convs, eval_convs = convs, load_conversations(eval_path, "eval", *how)
        else:
            train_convs, eval_convs = split_held_out(convs, d.eval_fraction, key=lambda c: json.dumps(c[1]))
            if not eval_convs:
                raise DataError(f"{train_path}: one example; too little to hold out eval data (set data.eval)")
        eval_convs = eval_convs[:cap] if cap else eval_convs
        eval_name = f"{eval_path or train_path} (eval)"
        train_ex, dropped, cut = _sft_examples(train_convs, tokenizer, cfg.seq_len, chat, str(train_path),
                                               d.truncation)
        eval_ex, eval_dropped, eval_cut = _sft_examples(eval_convs, tokenizer, cfg.seq_len, chat, eval_name,
                                                        d.truncation)
        _warn_truncation(str(train_path), cfg.seq_len, cut, dropped, len(train_convs))
        _warn_truncation(eval_name, cfg.seq_len, eval_cut, eval_dropped, len(eval_convs))
        train_ds, eval_ds = SFTDataset(train_ex), SFTDataset(eval_ex)
        info.update(template="chat" if chat else "builtin", dropped_examples=dropped + eval_dropped,
                    truncated_examples=cut + eval_cut)
        if d.packing:  # the eval examples stay unpacked: their loss is the same either way
            rows = pack_examples(train_ex, cfg.seq_len)
            info.update(packed_rows=len(rows), packed_examples=len(train_ex))
            train_ds = SFTDataset(rows)
            info.update(train_examples=len(train_ds), eval_examples=len(eval_ds), train_tokens=train_ds.num_tokens())
            eval_collator = collator_for(task, tokenizer)
            return RunData(train_ds, eval_ds, PackedCollator(tokenizer.pad_token_id), info, eval_collator)
    info.update(train_examples=len(train_ds), eval_examples=len(eval_ds), train_tokens=train_ds.num_tokens())
    return RunData(train_ds, eval_ds, collator_for(task, tokenizer), info)


def build_eval_dataset(path: Path, task: str, tokenizer, seq_len: int, template: str = "auto",
                       max_samples: int | None = None, text_field: str = "text",
                       truncation: str = "truncate", fmt: str = "auto", columns: dict | None = None,
                       train_on: str = "all") -> torch.utils.data.Dataset:
    """Held-out data alone, for `satlm eval` (fmt, columns, train_on: as data.format, data.columns,
    data.train_on)."""
    if task == "cpt":
        blocks = pack_blocks(load_documents(path, text_field, "eval"), tokenizer, seq_len, str(path))
        return BlockDataset(blocks[:max_samples] if max_samples else blocks)
    convs = load_conversations(path, "eval", fmt, columns, train_on)
    chat = uses_chat_template(tokenizer, template)
    convs = convs[:max_samples] if max_samples else convs
    examples, dropped, cut = _sft_examples(convs, tokenizer, seq_len, chat, str(path), truncation)
    _warn_truncation(str(path), seq_len, cut, dropped, len(convs))
    return SFTDataset(examples)
