"""Reading training and evaluation data: files, folders, JSONL, JSON lists, tables, HF datasets saved to disk, the
embedded demo data; Unicode checked with the file and line; a held-out split by a hash of the content, so that it
does not depend on file order, the process or the seed."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator


from ..errors import DataError
from .config import EMBEDDED
from . import formats
from .formats import TABLE_SUFFIXES, HubSource, read_table



TEXT_SUFFIXES = frozenset({".txt", ".text", ".md", ".markdown", ".rst", ".py", ".tex", ".html", ".htm"})
JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson"})
IGNORE_INDEX = -100  # label of tokens that carry no loss
ROLES = formats.ROLES
DEMO_FILES = {("cpt", "train"): "cpt_train.jsonl", ("cpt", "eval"): "cpt_eval.jsonl",
              ("sft", "train"): "sft_train.jsonl", ("sft", "eval"): "sft_eval.jsonl"}
EVAL_SPLITS = ("validation", "eval", "test")


# -- where the data is -----------------------------------------------------------------------------------
def cache_root() -> Path:
    """Where satlm keeps what it builds once (the demo data, tokenized data, converted models): $SATLM_CACHE or
    ~/.cache/satlm."""
    return Path(os.environ.get("SATLM_CACHE") or "~/.cache/satlm").expanduser()


def demo_data_dir(cache_dir: str | None = None) -> Path:
    """The embedded demo data (written once from the standard library by satlm.data.corpus)."""
    from .. import __version__

    root = Path(cache_dir).expanduser() if cache_dir else cache_root()
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
    """An SFT record (any format of data/formats.py) as chat messages {role, content, train}."""
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


