"""Training and evaluation data for the recipes: read, split, tokenize, pack (cpt) or mask prompts (sft).

cpt: documents from text files, folders, JSONL (`text`) or a local HF dataset, each wrapped as
     <bos> text <eos>, concatenated and cut into blocks of seq_len tokens; the ragged tail is dropped.
sft: Alpaca records (instruction/input/output) or chat records (messages), rendered with the tokenizer's
     chat template or a built-in one; labels are -100 on everything but the responses.
When no eval data is given, a fixed fraction of the documents (examples) is held out by a hash of its
content, so the split does not depend on file order, the process or the seed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from ..errors import DataError, ModelLoadError
from ..run_config import EMBEDDED, RunConfig
from . import formats
from .formats import TABLE_SUFFIXES, HubSource, read_table
from .packing import PackedCollator, pack_examples

TEXT_SUFFIXES = frozenset({".txt", ".text", ".md", ".markdown", ".rst", ".py", ".tex", ".html", ".htm"})
JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson"})
IGNORE_INDEX = -100  # label of tokens that carry no loss
ROLES = formats.ROLES
DEMO_FILES = {("cpt", "train"): "cpt_train.jsonl", ("cpt", "eval"): "cpt_eval.jsonl",
              ("sft", "train"): "sft_train.jsonl", ("sft", "eval"): "sft_eval.jsonl"}
EVAL_SPLITS = ("validation", "eval", "test")


# -- where the data is -----------------------------------------------------------------------------------
def demo_data_dir(cache_dir: str | None = None) -> Path:
    """The embedded demo data (written once from the standard library by satlm.recipes.corpus)."""
    from .. import __version__

    root = Path(cache_dir or os.environ.get("SATLM_CACHE") or "~/.cache/satlm").expanduser()
    out = root / f"demo-py{sys.version_info[0]}.{sys.version_info[1]}-satlm{__version__}"
    if all((out / name).is_file() for name in DEMO_FILES.values()):
        return out
    from .corpus import write_demo_data

    tmp = root / f".{out.name}.tmp-{os.getpid()}"
    write_demo_data(tmp)
    try:
        os.replace(tmp, out)  # whole or not at all; another process may have won the race
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_data(spec: str, task: str, split: str, cache_dir: str | None = None, subset: str | None = None,
                 hub_split: str | None = None):
    """A local path, the embedded demo data, or (a name like org/dataset that is no local path) a hub dataset."""
    if spec == EMBEDDED:
        return demo_data_dir(cache_dir) / DEMO_FILES[(task, split)]
    path = Path(spec).expanduser()
    if not path.exists():
        if formats.looks_like_hub_name(spec):
            return HubSource(spec, subset, hub_split or ("train" if split == "train" else "validation"))
        raise DataError(f"data.{split}: {spec!r} does not exist")
    return path


# -- reading records -------------------------------------------------------------------------------------
BOM = b"\xef\xbb\xbf"  # a UTF-8 byte-order mark, which some editors write first; dropped


def _decode(raw: bytes, path: Path, first_line: int = 1) -> str:
    """UTF-8 text, or a DataError naming the file and line of the first NUL byte or undecodable byte."""
    nul = raw.find(b"\0")
    if nul >= 0:
        line = first_line + raw.count(b"\n", 0, nul)
        raise DataError(f"{path}:{line}: holds a NUL byte, so it looks like a binary file, not UTF-8 text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + raw.count(b"\n", 0, e.start)
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); "
                        "re-save the file as UTF-8") from None


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    return _decode(raw[len(BOM):] if raw.startswith(BOM) else raw, path)


def check_unicode(text: str, where: str, name: str) -> str:
    """JSON can carry lone surrogates (\\ud800) that no tokenizer accepts; name them here instead."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{where}: field {name!r} holds an unpaired surrogate (\\u{ord(text[e.start]):04x} at "
                        f"character {e.start}), not valid Unicode text") from None
    return text


def read_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, record) for each non-blank line; `where` is 'file:line'. Read as bytes line by line, so a line
    of any length costs its own size and an encoding error names its line."""
    try:
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                if n == 1 and raw.startswith(BOM):
                    raw = raw[len(BOM):]
                line = _decode(raw, path, n)
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno})") from None
                except RecursionError:
                    raise DataError(f"{path}:{n}: JSON nested too deeply") from None
                if not isinstance(record, dict):
                    kind = "null" if record is None else type(record).__name__
                    raise DataError(f"{path}:{n}: expected a JSON object ({{...}}) per line, got {kind}")
                yield f"{path}:{n}", record
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def _read_json_list(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records")
    for i, record in enumerate(data):
        if not isinstance(record, dict):
            kind = "null" if record is None else type(record).__name__
            raise DataError(f"{path}: record {i} is {kind}, expected a JSON object")
        yield f"{path}[{i}]", record


def is_hf_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def _hf_rows(path: Path, split: str) -> Iterator[tuple[str, dict]]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path} is a Hugging Face dataset folder: reading it needs `pip install datasets`") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # a folder that only looks like a dataset: datasets raises many kinds
        first = str(e).strip().splitlines()
        raise DataError(f"{path}: cannot load the Hugging Face dataset ({first[0] if first else type(e).__name__})") from None
    if isinstance(ds, datasets.DatasetDict):
        names = ["train"] if split == "train" else list(EVAL_SPLITS)
        found = [n for n in names if n in ds] or (list(ds) if len(ds) == 1 else [])
        if not found:
            raise DataError(f"{path}: no {' or '.join(names)} split (splits: {', '.join(ds)})")
        ds = ds[found[0]]
    for i, row in enumerate(ds):
        yield f"{path}[{i}]", row


def hf_eval_split(path: Path) -> bool:
    """Whether a HF DatasetDict folder holds its own eval split (used when data.eval is null)."""
    if not (path / "dataset_dict.json").is_file():
        return False
    try:
        splits = json.loads(_read_text(path / "dataset_dict.json")).get("splits", [])
    except (json.JSONDecodeError, AttributeError):
        raise DataError(f"{path / 'dataset_dict.json'}: not a dataset_dict.json (expected {{\"splits\": [...]}})") from None
    return any(s in splits for s in EVAL_SPLITS)


def _files(path: Path, suffixes: frozenset[str]) -> list[Path]:
    if path.is_file():
        return [path]
    found = sorted(
        p for p in path.rglob("*")
        if p.is_file() and p.suffix.lower() in suffixes and not any(part.startswith(".") for part in p.parts)
    )
    if not found:
        raise DataError(f"{path}: folder holds no data files ({', '.join(sorted(suffixes))})")
    return found


def iter_records(path, split: str = "train") -> Iterator[tuple[str, dict | str]]:
    """(where, record) from a file, a folder, a save_to_disk folder or a hub dataset; plain text files give one
    string each; parquet, arrow and csv rows are records."""
    if isinstance(path, HubSource):
        yield from path.rows()
        return
    if is_hf_dataset(path):
        yield from _hf_rows(path, split)
        return
    # (a folder's .json files are often metadata: only a .json file given as such is read)
    for f in _files(path, TEXT_SUFFIXES | JSONL_SUFFIXES | frozenset(TABLE_SUFFIXES)):
        suffix = f.suffix.lower()
        if suffix in JSONL_SUFFIXES:
            yield from read_jsonl(f)
        elif suffix == ".json":
            yield from _read_json_list(f)
        elif suffix in TABLE_SUFFIXES:
            yield from read_table(f)
        else:
            yield str(f), _read_text(f)


def load_documents(path: Path, text_field: str = "text", split: str = "train") -> list[str]:
    """cpt: the non-empty texts of a file, folder, JSONL or HF dataset, in order."""
    docs = []
    for where, record in iter_records(path, split):
        if isinstance(record, dict):
            if text_field not in record:
                raise DataError(f"{where}: missing field {text_field!r}")
            record = record[text_field]
            if not isinstance(record, str):
                raise DataError(f"{where}: field {text_field!r} must be a string, got {type(record).__name__}")
            check_unicode(record, where, text_field)
        if record.strip():
            docs.append(record)
    if not docs:
        raise DataError(f"{path}: holds no text")
    return docs


def to_messages(record: dict, where: str, fmt: str = "auto", columns: dict | None = None,
                train_on: str = "all") -> list[dict]:
    """An SFT record (any format of recipes/formats.py) as chat messages {role, content, train}."""
    for key, value in record.items():
        if isinstance(value, str):
            check_unicode(value, where, key)
    messages = formats.to_messages(record, where, fmt, columns, train_on)
    for i, m in enumerate(messages):
        check_unicode(m["content"], where, f"messages[{i}].content")
    return messages


def load_conversations(path, split: str = "train", fmt: str = "auto", columns: dict | None = None,
                       train_on: str = "all") -> list[tuple[str, list[dict]]]:
    """sft: (where, messages) for every record of a file, folder or dataset."""
    out = []
    for where, record in iter_records(path, split):
        if not isinstance(record, dict):
            raise DataError(f"{where}: sft data must be records (JSONL, JSON, parquet, arrow, csv), not plain text")
        out.append((where, to_messages(record, where, fmt, columns, train_on)))
    if not out:
        raise DataError(f"{path}: holds no examples")
    return out


def detect_task(path: Path) -> str:
    """sft when the first record has Alpaca or chat fields, else cpt."""
    for _, record in iter_records(path, "eval"):
        return "sft" if isinstance(record, dict) and formats.detect_format(record) else "cpt"
    return "cpt"


# -- splitting -------------------------------------------------------------------------------------------
def _unit_hash(text: str) -> float:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2.0**64


def split_held_out(items: list, fraction: float, key: Callable[[Any], str] = str) -> tuple[list, list]:
    """(train, held out): an item is held out when the hash of its content falls below `fraction`;
    at least one item on each side when there are two or more."""
    hashes = [_unit_hash(key(x)) for x in items]
    held = {i for i, h in enumerate(hashes) if h < fraction}
    if not held and len(items) >= 2:
        held = {min(range(len(items)), key=hashes.__getitem__)}
    if len(held) == len(items) and len(items) >= 2:
        held.discard(max(range(len(items)), key=hashes.__getitem__))
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


# -- tokenizing ------------------------------------------------------------------------------------------
def ensure_pad_token(tokenizer) -> None:
    """Padding needs an id; a tokenizer without a pad token pads with EOS, else UNK (masked out of attention
    and loss, so which token pads does not matter)."""
    if tokenizer.pad_token_id is not None:
        return
    fallback = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    if fallback is None:
        raise ModelLoadError(f"the tokenizer of {getattr(tokenizer, 'name_or_path', '') or 'this model'!r} has no "
                             "pad, eos or unk token to pad sft batches with; set pad_token in its "
                             "tokenizer_config.json")
    tokenizer.pad_token = fallback


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


def _builtin_segments(messages: list[dict], tokenizer) -> list[tuple[str | list[int], bool]]:
    """### System / ### Instruction / ### Response, each response followed by EOS."""
    head, tail = _wrap_ids(tokenizer)
    segments: list[tuple[str | list[int], bool]] = [(head, False)] if head else []
    for m in messages:
        if m["role"] == "assistant":
            trained = m.get("train", True)
            segments += [("### Response:\n", False), (m["content"], trained), (tail, trained), ("\n\n", False)]
        else:
            title = "System" if m["role"] == "system" else "Instruction"
            segments.append((f"### {title}:\n{m['content']}\n\n", False))
    return segments


GENERATION_MARK = re.compile(r"\{%-?\s*generation\s*-?%\}")
PROBE = "SATLM-PROBE-7f3a"  # an answer no real data holds, to read the template's end-of-turn text


def _render(tokenizer, messages: list[dict], where: str, **kw):
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    try:
        return tokenizer.apply_chat_template(msgs, **kw)
    except Exception as e:  # jinja raises its own errors (roles must alternate, ...)
        raise DataError(f"{where}: the tokenizer's chat template rejected this example: {e}") from None


def _end_of_turn(tokenizer) -> str:
    """The text the template puts right after an assistant answer (ChatML: <|im_end|>), trained with it, so
    the model learns to stop; read once per tokenizer from a probe conversation."""
    cached = getattr(tokenizer, "_satlm_end_of_turn", None)
    if cached is None:
        try:
            text = tokenizer.apply_chat_template([{"role": "user", "content": "q"},
                                                  {"role": "assistant", "content": PROBE}], tokenize=False)
            cached = text[text.index(PROBE) + len(PROBE):].rstrip() if PROBE in text else ""
        except Exception:  # a template that needs more than one user turn: no end-of-turn text then
            cached = ""
        try:
            tokenizer._satlm_end_of_turn = cached
        except AttributeError:
            pass
    return cached


def _answer_in(text: str, content: str, pos: int) -> tuple[int, int] | None:
    """Where the template put this answer, searching from pos: as given, or, for templates that drop an earlier
    turn's reasoning, the part after its last </think>."""
    for candidate in (content, content.rsplit("</think>", 1)[-1].strip() if "</think>" in content else None):
        if candidate:
            at = text.find(candidate, pos)
            if at >= 0:
                return at, at + len(candidate)
    return None


def _chat_spans(messages: list[dict], tokenizer, where: str) -> tuple[str, list[tuple[int, int]]]:
    """The conversation rendered once by the chat template, and the character spans that carry the loss: each
    trained assistant answer where the template put it (found in order, so an answer that repeats an earlier
    message is not matched there), with the end-of-turn text that follows it. Whatever the template adds
    (default system prompts, dates, reasoning dropped from earlier turns) is in the text, untrained."""
    text = _render(tokenizer, messages, where, tokenize=False)
    end_mark = _end_of_turn(tokenizer)
    spans, pos = [], 0
    for i, m in enumerate(messages):
        content = m["content"]
        if not content:
            continue
        found = _answer_in(text, content, pos)
        if found is None:
            if m["role"] == "assistant" and m.get("train", True):
                raise DataError(f"{where}: the chat template does not render assistant turn {i} as its content, "
                                "so its trained tokens cannot be found; set data.template=builtin")
            continue
        start, pos = found
        if m["role"] == "assistant":
            if end_mark and text.startswith(end_mark, pos):
                pos += len(end_mark)
            if m.get("train", True):
                spans.append((start, pos))
    return text, spans


def _generation_marked(messages: list[dict], tokenizer, where: str) -> tuple[list[int], list[bool]]:
    """Templates with {% generation %} marks: transformers' assistant mask, one run of marked tokens per
    assistant turn, so turns that are not trained (data.train_on) are unmarked again."""
    out = _render(tokenizer, messages, where, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = list(out["input_ids"]), [bool(x) for x in out["assistant_masks"]]
    runs = [i for i in range(len(mask)) if mask[i] and (i == 0 or not mask[i - 1])]
    answers = [m for m in messages if m["role"] == "assistant" and m["content"]]
    if len(runs) != len(answers):
        raise DataError(f"{where}: the chat template marks {len(runs)} generation spans for {len(answers)} "
                        "assistant turns; set data.template=builtin")
    for start, m in zip(runs, answers):
        if not m.get("train", True):
            i = start
            while i < len(mask) and mask[i]:
                mask[i] = False
                i += 1
    return ids, mask


def _chat_tokens(messages: list[dict], tokenizer, where: str) -> tuple[list[int], list[bool]]:
    """(token ids, which tokens are trained) of one conversation, the template rendered once."""
    if GENERATION_MARK.search(tokenizer.chat_template or ""):
        return _generation_marked(messages, tokenizer, where)
    text, spans = _chat_spans(messages, tokenizer, where)
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"{where}: data.template=chat needs a fast tokenizer (character offsets); "
                        "set data.template=builtin")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    trained = [any(s < e_span and e > s_span for s_span, e_span in spans) for s, e in enc["offset_mapping"]]
    return list(enc["input_ids"]), trained


def uses_chat_template(tokenizer, template: str) -> bool:
    has = bool(getattr(tokenizer, "chat_template", None))
    if template == "chat" and not has:
        raise DataError("data.template=chat, but the tokenizer has no chat template; use auto or builtin")
    return template == "chat" or (template == "auto" and has)


def _encode(messages: list[dict], tokenizer, seq_len: int, chat: bool, where: str) -> tuple[dict | None, bool]:
    """(example truncated to seq_len, or None when no response token is left; whether truncation lost response
    tokens; losing only the untrained text after the last response does not count)."""
    later = False  # builtin: a trained segment left untokenized past seq_len
    if chat:
        ids, trained = _chat_tokens(messages, tokenizer, where)
    else:  # the builtin format: segments, tokenized one by one and not past seq_len (a huge example costs little)
        ids, trained = [], []
        segments = _builtin_segments(messages, tokenizer)
        for k, (part, train) in enumerate(segments):
            part_ids = part if isinstance(part, list) else tokenizer(part, add_special_tokens=False)["input_ids"]
            ids += part_ids
            trained += [train] * len(part_ids)
            if len(ids) > seq_len:
                later = any(t for _, t in segments[k + 1:])
                break
    cut = later or any(trained[seq_len:])
    ids, trained = ids[:seq_len], trained[:seq_len]
    labels = [i if t else IGNORE_INDEX for i, t in zip(ids, trained)]
    if all(label == IGNORE_INDEX for label in labels[1:]):  # the first label is never predicted
        return None, cut
    return {"input_ids": ids, "labels": labels}, cut


def encode_conversation(messages: list[dict], tokenizer, seq_len: int, chat: bool, where: str = "example",
                        truncation: str = "truncate"):
    """{'input_ids', 'labels'} (lists, truncated to seq_len), or None when truncation leaves no response token.
    truncation='error': a DataError naming `where` for an example longer than seq_len instead."""
    example, cut = _encode(messages, tokenizer, seq_len, chat, where)
    if cut and truncation == "error":
        raise _too_long(where, seq_len)
    return example


def _too_long(where: str, seq_len: int) -> DataError:
    return DataError(f"{where}: example is longer than seq_len={seq_len} tokens (data.truncation=error); "
                     "raise seq_len, shorten the example or set data.truncation=truncate")


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


def build_datasets(cfg: RunConfig, tokenizer) -> RunData:
    """The train and eval datasets and the collator of a run config; with data.cache (default) tokenized once
    into the on-disk cache (satlm.recipes.tokcache) and memory-mapped from it."""
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


def _build_in_memory(cfg: RunConfig, tokenizer, train_path, eval_path) -> RunData:
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
