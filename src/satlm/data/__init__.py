"""Data as users bring it: readers (files, folders, JSONL, tables, HF datasets, the embedded demo), SFT record
formats and chat templates, CPT and SFT packing, the tokenized cache, and a run's datasets and collators.
Nothing here knows the app above it: a run config is read only through its fields."""

from .chat import encode_conversation, ensure_pad_token, uses_chat_template
from .config import EMBEDDED, TEMPLATES, TRUNCATIONS, DataConfig
from .datasets import (BlockDataset, RunData, SFTCollator, SFTDataset, build_datasets, build_eval_dataset,
                       collate_blocks, collator_for)
from .packing import IGNORE_INDEX, PackedCollator, pack_blocks, pack_examples
from .readers import (cache_root, demo_data_dir, detect_task, iter_records, load_conversations, load_documents,
                      resolve_data, split_held_out, to_messages)

__all__ = ["BlockDataset", "DataConfig", "EMBEDDED", "IGNORE_INDEX", "PackedCollator", "RunData", "SFTCollator",
           "SFTDataset", "TEMPLATES", "TRUNCATIONS", "build_datasets", "build_eval_dataset", "cache_root",
           "collate_blocks", "collator_for", "demo_data_dir", "detect_task", "encode_conversation", "ensure_pad_token",
           "iter_records", "load_conversations", "load_documents", "pack_blocks", "pack_examples", "resolve_data",
           "split_held_out", "to_messages", "uses_chat_template"]
