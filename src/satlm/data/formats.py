"""Data as users bring it: table files (parquet, arrow, csv) and hub datasets through `datasets`, and the SFT
record formats people use, turned into chat messages with a per-message `train` flag.

Formats (`data.format`, auto-detected from the first record's fields by default):
    alpaca             instruction, input (optional), output
    messages           messages: [{role: system|user|assistant|tool, content: text or [{type: text, text}, ...]}]
    sharegpt           conversations: [{from: system|human|user|gpt|assistant|tool|function_call|observation, value}]
    prompt_completion  prompt, completion: two strings, or two lists of messages (conversational)
`data.columns` maps satlm's field names to the data's (`{instruction: question, output: answer}`).
Which assistant turns carry the loss (`data.train_on`): all (default), last, or completion (prompt/completion
records: the completion's turns only; other formats: as last).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from ..errors import DataError

TABLE_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}
FORMATS = ("auto", "alpaca", "messages", "sharegpt", "prompt_completion")
TRAIN_ON = ("all", "last", "completion")
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "tool": "tool", "function_call": "assistant", "observation": "tool"}


def _datasets():
    try:
        import datasets
    except ImportError:
        raise DataError("reading parquet/arrow/csv files or hub datasets needs `pip install datasets`") from None
    return datasets


def read_table(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, row) of a parquet, arrow or csv file; `where` names the file and row (csv: its line)."""
    kind = TABLE_SUFFIXES[path.suffix.lower()]
    datasets = _datasets()
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as e:  # pyarrow and datasets raise many kinds for a bad file
        first = str(e).strip().splitlines()
        raise DataError(f"{path}: cannot read it as {kind} ({first[0] if first else type(e).__name__})") from None
    for i, row in enumerate(ds):
        yield (f"{path}:{i + 2}" if kind == "csv" else f"{path}:row {i + 1}"), row


class HubSource:
    """A `datasets` hub name given as data.train / data.eval (used when the network allows)."""

    def __init__(self, name: str, subset: str | None, split: str):
        self.name, self.subset, self.split = name, subset, split

    def __str__(self) -> str:
        return self.name + (f" ({self.subset})" if self.subset else "") + f"[{self.split}]"

    def exists(self) -> bool:
        return True

    def is_dir(self) -> bool:
        return False

    def is_file(self) -> bool:
        return False

    def rows(self) -> Iterator[tuple[str, dict]]:
        datasets = _datasets()
        try:
            ds = datasets.load_dataset(self.name, self.subset, split=self.split)
        except Exception as e:
            first = str(e).strip().splitlines()
            raise DataError(f"cannot load the hub dataset {self}: {first[0] if first else type(e).__name__} (no "
                            "network? data.train / data.eval also take local files and folders)") from None
        for i, row in enumerate(ds):
            yield f"{self}:row {i + 1}", row


def looks_like_hub_name(spec: str) -> bool:
    """`org/name` (or a bare name) that is no local path: no suffix, no leading ./ or /."""
    return (not spec.startswith((".", "/", "~")) and spec.count("/") <= 1 and not Path(spec).suffix
            and all(part for part in spec.split("/")))


# -- records -> messages ---------------------------------------------------------------------------------
def _text(content, where: str, name: str) -> str:
    """Message content as text: a string, or a list of parts whose text parts are joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise DataError(f"{where}: {name}[{j}] is a {kind!r} part; satlm trains on text parts only")
        return "".join(texts)
    kind = "null" if content is None else type(content).__name__
    raise DataError(f"{where}: {name} must be a string or a list of text parts, got {kind}")


def _messages(items, where: str, field: str) -> list[dict]:
    if not isinstance(items, list) or not items:
        raise DataError(f"{where}: {field!r} must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(items):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise DataError(f"{where}: {field}[{i}] must be {{\"role\": one of {'/'.join(ROLES)}, \"content\": ...}}")
        out.append({"role": m["role"], "content": _text(m.get("content"), where, f"{field}[{i}].content")})
    return out


def _sharegpt(items, where: str) -> list[dict]:
    if not isinstance(items, list) or not items:
        raise DataError(f"{where}: 'conversations' must be a non-empty list of {{from, value}} objects")
    out = []
    for i, m in enumerate(items):
        if not isinstance(m, dict) or m.get("from") not in SHAREGPT_ROLES:
            raise DataError(f"{where}: conversations[{i}] must be {{\"from\": one of "
                            f"{'/'.join(SHAREGPT_ROLES)}, \"value\": a string}}")
        out.append({"role": SHAREGPT_ROLES[m["from"]], "content": _text(m.get("value"), where,
                                                                        f"conversations[{i}].value")})
    return out


def detect_format(record: dict) -> str | None:
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "instruction" in record or "output" in record:  # (a missing half is named by the alpaca reader)
        return "alpaca"
    return None


def _alpaca(record: dict, where: str) -> list[dict]:
    for key in ("instruction", "input", "output"):
        value = record.get(key)
        if key in record and not isinstance(value, str) and not (key == "input" and value is None):
            kind = "null" if value is None else type(value).__name__
            raise DataError(f"{where}: field {key!r} must be a string{' or null' if key == 'input' else ''}, "
                            f"got {kind}")
    prompt = record["instruction"]
    if record.get("input"):
        prompt = f"{prompt}\n\n{record['input']}"
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]


def to_messages(record: dict, where: str, fmt: str = "auto", columns: dict | None = None,
                train_on: str = "all") -> list[dict]:
    """An SFT record as chat messages {role, content, train}; train marks the assistant turns with the loss."""
    if columns:
        record = {**record, **{ours: record[theirs] for ours, theirs in columns.items() if theirs in record}}
    kind = detect_format(record) if fmt == "auto" else fmt
    if kind is None:
        raise DataError(f"{where}: not an SFT record: it needs instruction/output (alpaca), messages, conversations "
                        "(ShareGPT) or prompt/completion fields (or set data.columns to map yours)")
    completion_from = None
    try:
        if kind == "messages":
            messages = _messages(record["messages"], where, "messages")
        elif kind == "sharegpt":
            messages = _sharegpt(record["conversations"], where)
        elif kind == "prompt_completion":
            prompt, completion = record["prompt"], record["completion"]
            if isinstance(prompt, str) and isinstance(completion, str):
                messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
                completion_from = 1
            else:
                head = _messages(prompt, where, "prompt")
                messages = head + _messages(completion, where, "completion")
                completion_from = len(head)
        else:
            messages = _alpaca(record, where)
    except KeyError as e:
        raise DataError(f"{where}: missing field {e.args[0]!r} of the {kind} format") from None
    roles = [m["role"] for m in messages]
    if "assistant" not in roles or "user" not in roles[: roles.index("assistant")]:
        raise DataError(f"{where}: the conversation needs a user message followed by an assistant message")
    last = max(i for i, r in enumerate(roles) if r == "assistant")
    for i, m in enumerate(messages):
        if train_on == "all":
            m["train"] = m["role"] == "assistant"
        elif train_on == "completion" and completion_from is not None:
            m["train"] = m["role"] == "assistant" and i >= completion_from
        else:  # last, or completion for a record without a completion part
            m["train"] = i == last
    if not any(m["train"] for m in messages):
        raise DataError(f"{where}: no assistant turn to train on (data.train_on={train_on})")
    return messages
