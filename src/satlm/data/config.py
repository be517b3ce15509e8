"""The `data:` section of a run config: where the training and evaluation data come from and how they are cut."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import RunConfigError
from ..fields import check_fields
from .formats import FORMATS, TRAIN_ON

TEMPLATES = ("auto", "builtin", "chat")
TRUNCATIONS = ("truncate", "error")
EMBEDDED = "embedded"  # sentinel for `model:` and `data.*`: the demo assets that ship with satlm


@dataclass
class DataConfig:
    """Where the training and evaluation data come from and how they are cut."""

    train: str = field(default=EMBEDDED, metadata={
        "help": "Training data: a file (txt, md, jsonl, json, parquet, arrow, csv), a folder of them, a save_to_disk "
                "folder, or a hub dataset name (org/name, with data.split / data.subset; needs the network). cpt: "
                "text, or records with a `text` field. sft: records of any data.format (alpaca, messages, sharegpt, "
                "prompt_completion). `embedded`: the demo corpus of this task."})
    eval: str | None = field(default=None, metadata={
        "help": "Held-out data in the same forms; null: split eval_fraction of the training documents off "
                "(deterministically), or the demo's eval split when data.train is `embedded`."})
    eval_fraction: float = field(default=0.05, metadata={
        "range": "(0, 1)",
        "help": "Fraction of training documents held out for evaluation when data.eval is null."})
    max_eval_samples: int | None = field(default=256, metadata={
        "range": "[1, inf)", "null": "all",
        "help": "At most this many eval blocks (cpt) or examples (sft), the first ones in file order; null: all."})
    text_field: str = field(default="text", metadata={
        "help": "cpt: the JSONL / dataset field that holds the text."})
    format: str = field(default="auto", metadata={
        "choices": FORMATS,
        "help": "sft record format: auto (from the first record's fields), alpaca, messages, sharegpt, "
                "prompt_completion."})
    columns: dict | None = field(default=None, metadata={
        "help": "sft: satlm's field names mapped to the data's, e.g. {instruction: question, output: answer}; null: "
                "as is."})
    train_on: str = field(default="all", metadata={
        "choices": TRAIN_ON,
        "help": "sft: which assistant turns carry the loss: all, last, completion (prompt/completion records)."})
    split: str | None = field(default=None, metadata={
        "help": "A hub dataset name as data.train: its split (null: train; data.eval hub names read validation)."})
    subset: str | None = field(default=None, metadata={
        "help": "A hub dataset name as data.train / data.eval: its subset (configuration), or null."})
    template: str = field(default="auto", metadata={
        "choices": TEMPLATES,
        "help": "sft prompt format: auto (the tokenizer's chat template when it has one, else builtin), builtin "
                "(### Instruction / ### Response), chat (the tokenizer's chat template, an error if it has none)."})
    truncation: str = field(default="truncate", metadata={
        "choices": TRUNCATIONS,
        "help": "sft examples longer than seq_len: truncate (cut at seq_len, with one warning that counts them; an "
                "example left with no response token is dropped) or error (a DataError naming the first one's "
                "file:line). cpt documents are never cut: they are packed across blocks."})
    packing: bool = field(default=False, metadata={
        "help": "sft: pack several whole examples into each seq_len row (position ids restart per example, no "
                "attention across examples, loss on the trained spans only); eval examples stay unpacked."})
    group_by_length: bool = field(default=True, metadata={
        "help": "sft: batch examples of similar length together (less padding, same examples per epoch); cpt blocks "
                "all have one length."})
    cache: bool = field(default=True, metadata={
        "help": "Tokenize once: the tokenized train and eval rows are cached under <cache_dir>/tokenized (keyed by the "
                "data files, tokenizer, seq_len and data settings), built by one process and memory-mapped by all "
                "(the ranks of torchrun, a resume); false: tokenize in memory at every launch."})
    cache_dir: str | None = field(default=None, metadata={
        "help": "Where the embedded demo data and the tokenized cache are written; null: $SATLM_CACHE or "
                "~/.cache/satlm."})

    def validate(self) -> "DataConfig":
        """Every key as its field declares it; errors name the key as `data.<field>`."""
        check_fields(self, lambda problem: RunConfigError(problem.as_key("data.")))
        return self
