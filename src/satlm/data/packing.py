"""SFT packing: several examples in each seq_len row, with no attention across examples.

Each row is the concatenation of whole examples (next fit, in data order: a row is closed when the next
example does not fit); position ids restart at 0 for each example, and the first label of each example is
ignored (it would be predicted from the previous example's last token). Batches carry `position_ids` and no attention mask: transformers then builds a block-diagonal causal
mask from the restarts (masking_utils.find_packed_sequence_indices), so each token attends within its own
example only, as it would in a padded batch. The tail of a row shorter than the batch's longest is padding: a
sequence of its own, with no label. SAT's importance then counts every token of the batch (there is no padding
mask), and so does the masked reference (tests/test_packing.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import DataError

IGNORE_INDEX = -100


def pack_examples(examples: list[dict], seq_len: int) -> list[dict]:
    """Rows of whole examples, each row at most seq_len tokens (an example longer than that is its own row;
    examples were cut to seq_len already)."""
    rows: list[dict] = []
    row = None
    for ex in examples:
        n = len(ex["input_ids"])
        if row is None or len(row["input_ids"]) + n > seq_len:
            row = {"input_ids": [], "labels": [], "position_ids": [], "examples": 0}
            rows.append(row)
        row["input_ids"] += ex["input_ids"]
        row["labels"] += [IGNORE_INDEX] + list(ex["labels"][1:])
        row["position_ids"] += list(range(n))
        row["examples"] += 1
    return rows


@dataclass
class PackedCollator:
    """Right-pads packed rows to the batch's longest; the padding is a sequence of its own with no label."""

    pad_token_id: int

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        positions = torch.arange(width).repeat(len(batch), 1)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n] = torch.as_tensor(b["input_ids"])
            labels[i, :n] = torch.as_tensor(b["labels"])
            positions[i, :n] = torch.as_tensor(b["position_ids"])
            positions[i, n:] = torch.arange(width - n)
        return {"input_ids": ids, "labels": labels, "position_ids": positions}


# -- CPT: documents packed into blocks (the one packer: `satlm pretrain-base` packs its corpus with it too) --
def _wrap_ids(tokenizer) -> tuple[list[int], list[int]]:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return ([bos] if bos is not None and bos != eos else []), ([eos] if eos is not None else [])


def pack_blocks(docs: list[str], tokenizer, seq_len: int, name: str = "data") -> torch.Tensor:
    """<bos> doc <eos> <bos> doc <eos> ... cut into (n_blocks, seq_len) int64; the ragged tail is dropped."""
    head, tail = _wrap_ids(tokenizer)
    chunks, total = [], 0
    for start in range(0, len(docs), 512):
        for ids in tokenizer(docs[start:start + 512], add_special_tokens=False, verbose=False)["input_ids"]:
            chunks.append(np.asarray(head + ids + tail, dtype=np.int64))
            total += len(chunks[-1])
    n_blocks = total // seq_len
    if n_blocks == 0:
        raise DataError(f"{name}: {total} tokens, fewer than one block of seq_len={seq_len}")
    stream = np.concatenate(chunks)[: n_blocks * seq_len]
    return torch.from_numpy(stream).view(n_blocks, seq_len)


