"""The embedded corpus: the running interpreter's standard library, read in place (nothing is copied).

Three domains come out of the same files, so that the demos need no download:

- code  (`code_texts`):       Python source with every docstring cut out; the base model is pretrained on it.
- prose (`prose_texts`):      English: the docstrings themselves plus the topic texts of `pydoc_data.topics`;
                              the CPT demo adapts the base model to it.
- pairs (`docstring_pairs`):  (function source without its docstring -> first paragraph of its docstring),
                              Alpaca-style records for the SFT demo.

Splits are by a stable hash (sha256) of the file's path relative to the stdlib root (topics: of the topic
name), so they do not depend on the machine, the process or PYTHONHASHSEED. They do depend on the Python
version, whose standard library differs; the base model's PROVENANCE.json records which one it was built from.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import json
import sysconfig
import textwrap
from dataclasses import dataclass
from pathlib import Path

EVAL_PERCENT = 5
SKIP_DIRS = frozenset({"test", "tests", "idlelib", "turtledemo", "site-packages", "pydoc_data", "__pycache__"})
# pydoc_data/topics.py is one big dict of English text: it belongs to the prose domain, not the code one.
# _sysconfigdata_*.py is generated per build (paths of the build machine), not written code.
SKIP_PREFIXES = ("_sysconfigdata",)

PROSE_MIN_WORDS = 20
PAIR_MIN_WORDS, PAIR_MAX_WORDS = 5, 80
PAIR_MAX_INPUT_CHARS = 1200
SFT_INSTRUCTION = "Write a docstring for this Python function."

_DOC_OWNERS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def _relative(path: Path | str) -> str:
    path = Path(path)
    if path.is_absolute():
        path = path.resolve().relative_to(stdlib_root())
    return path.as_posix()


def _in_eval(key: str) -> bool:
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100 < EVAL_PERCENT


def _check_split(split: str) -> None:
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")


def split_of(path: Path | str) -> str:
    """'eval' for ~5% of files, 'train' for the rest; `path` is absolute or relative to the stdlib root."""
    return "eval" if _in_eval(_relative(path)) else "train"


# ---------------------------------------------------------------------------------------------------------
# Docstrings: find them with ast, cut them out of the source text


def _docstring_expr(node: ast.AST) -> ast.Expr | None:
    body = getattr(node, "body", None)
    if body and isinstance(body[0], ast.Expr):
        value = body[0].value
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            return body[0]
    return None


def strip_docstrings(source: str, tree: ast.Module | None = None) -> str:
    """`source` without the docstrings of its module, classes and functions; the result still parses.

    A docstring that is the whole body (`class Error(Exception): "doc"`) becomes `pass`. Line and column
    numbers from `ast` count bytes of UTF-8, so the edits are made on bytes, last one first.
    """
    tree = tree if tree is not None else ast.parse(source)
    spans = []
    for node in ast.walk(tree):
        if isinstance(node, _DOC_OWNERS) and (expr := _docstring_expr(node)) is not None:
            spans.append((expr, len(node.body) == 1))
    if not spans:
        return source
    lines = source.encode("utf-8").splitlines(keepends=True)
    for expr, sole in sorted(spans, key=lambda s: (s[0].lineno, s[0].col_offset), reverse=True):
        first, last = expr.lineno - 1, expr.end_lineno - 1
        head, tail = lines[first][: expr.col_offset], lines[last][expr.end_col_offset :]
        replacement = head + (b"pass" if sole else b"") + tail
        if not replacement.strip():
            replacement = b""
        elif not replacement.strip(b" \t;\r\n"):  # `"doc";` alone on its line
            replacement = b""
        lines[first : last + 1] = [replacement]
    return b"".join(lines).decode("utf-8")


def _first_paragraph(doc: str) -> str:
    return " ".join(doc.strip().split("\n\n")[0].split())


def _function_source(source_lines: list[str], node: ast.AST) -> str | None:
    """The dedented source of one function (decorators left out), docstrings stripped; None if it won't parse."""
    text = textwrap.dedent("".join(source_lines[node.lineno - 1 : node.end_lineno]))
    try:
        text = strip_docstrings(text)
    except SyntaxError:  # a multi-line string less indented than the def defeats dedent
        return None
    kept, total = [], 0
    for line in text.splitlines(keepends=True):
        if total + len(line) > PAIR_MAX_INPUT_CHARS and kept:
            break
        kept.append(line)
        total += len(line)
    return "".join(kept).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------------------
# One pass over the files, cached: each file is read and parsed once per process


@dataclass(frozen=True)
class _FileRecord:
    relpath: str
    split: str
    code: str  # source with docstrings stripped
    docstrings: tuple[str, ...]  # cleaned (inspect.cleandoc), in source order
    pairs: tuple[tuple[str, str], ...]  # (function source without docstring, first paragraph of docstring)


def _read(path: Path, root: Path) -> _FileRecord | None:
    try:
        source = path.read_bytes().decode("utf-8")
        tree = ast.parse(source, filename=str(path))
        code = strip_docstrings(source, tree)
    except (UnicodeDecodeError, SyntaxError, ValueError):
        return None
    docstrings, pairs = [], []
    # Lines as ast counts them (\n, \r\n, \r); str.splitlines would also break at form feeds and the like.
    source_lines = [line.decode("utf-8") for line in source.encode("utf-8").splitlines(keepends=True)]
    for node in ast.walk(tree):
        if not isinstance(node, _DOC_OWNERS) or _docstring_expr(node) is None:
            continue
        doc = inspect.cleandoc(_docstring_expr(node).value.value)
        n_words = len(doc.split())
        docstrings.append((node.lineno if hasattr(node, "lineno") else 0, doc))
        if isinstance(node, _FUNCTIONS) and PAIR_MIN_WORDS <= n_words <= PAIR_MAX_WORDS:
            answer = _first_paragraph(doc)
            function = _function_source(source_lines, node)
            if function and answer and not answer.startswith(">>>"):
                pairs.append((node.lineno, function, answer))
    relpath = path.relative_to(root).as_posix()
    return _FileRecord(
        relpath=relpath,
        split=split_of(relpath),
        code=code,
        docstrings=tuple(doc for _, doc in sorted(docstrings, key=lambda d: d[0])),
        pairs=tuple((f, a) for _, f, a in sorted(pairs, key=lambda p: p[0])),
    )


def _skipped(relative: Path) -> bool:
    return any(part in SKIP_DIRS for part in relative.parts[:-1]) or relative.name.startswith(SKIP_PREFIXES)


@functools.lru_cache(maxsize=1)
def _records() -> tuple[_FileRecord, ...]:
    root = stdlib_root()
    paths = sorted(
        (p for p in root.rglob("*.py") if not _skipped(p.relative_to(root))),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    return tuple(r for p in paths if (r := _read(p, root)) is not None)


def stdlib_files() -> list[Path]:
    """The stdlib `.py` files that make the corpus (tests, idlelib, turtledemo, site-packages left out), sorted."""
    root = stdlib_root()
    return [root / r.relpath for r in _records()]


def code_texts(split: str) -> list[str]:
    """The Python source of each file of `split`, docstrings stripped; one text per file, in path order."""
    _check_split(split)
    return [r.code for r in _records() if r.split == split]


@functools.lru_cache(maxsize=1)
def _topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return dict(topics)


@functools.lru_cache(maxsize=2)
def _prose(split: str) -> tuple[str, ...]:
    texts = [d for r in _records() if r.split == split for d in r.docstrings]
    texts += [_topics()[name].strip() for name in sorted(_topics()) if ("eval" if _in_eval(name) else "train") == split]
    texts = [t for t in texts if len(t.split()) >= PROSE_MIN_WORDS]
    seen = set(_prose("train")) if split == "eval" else set()
    unique = []
    for text in texts:  # the same docstring recurs (overloads, copies): keep the first, and keep eval unseen
        if text not in seen:
            seen.add(text)
            unique.append(text)
    return tuple(unique)


def prose_texts(split: str) -> list[str]:
    """English prose of `split`: docstrings of >= 20 words and pydoc topic texts, one text each, deduplicated.

    Eval texts that also occur in train are dropped, so the held-out prose is really unseen.
    """
    _check_split(split)
    return list(_prose(split))


@functools.lru_cache(maxsize=2)
def _pairs(split: str) -> tuple[tuple[str, str], ...]:
    pairs = [p for r in _records() if r.split == split for p in r.pairs]
    seen = set(_pairs("train")) if split == "eval" else set()
    unique = []
    for pair in pairs:
        if pair not in seen:
            seen.add(pair)
            unique.append(pair)
    return tuple(unique)


def docstring_pairs(split: str) -> list[dict]:
    """SFT examples: Alpaca records asking for the docstring of a function, split by file."""
    _check_split(split)
    return [{"instruction": SFT_INSTRUCTION, "input": function, "output": answer} for function, answer in _pairs(split)]


SHORT_INSTRUCTION = "Name the Python function that this docstring documents."


def short_answer_pairs(split: str) -> list[dict]:
    """A short-answer SFT set: a standard-library docstring in, the function's name out (a few tokens), as in
    most instruction sets, whose answers are one line; split by file like docstring_pairs."""
    import re

    _check_split(split)
    rows = []
    for function, answer in _pairs(split):
        name = re.search(r"def\s+(\w+)", function)
        if name:
            rows.append({"instruction": SHORT_INSTRUCTION, "input": answer, "output": name.group(1)})
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_demo_data(out_dir: Path | str) -> dict:
    """Write the CPT (field `text`) and SFT (Alpaca fields) demo sets as JSONL; return {name: {path, count}}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sets = {
        "cpt_train": [{"text": t} for t in prose_texts("train")],
        "cpt_eval": [{"text": t} for t in prose_texts("eval")],
        "sft_train": docstring_pairs("train"),
        "sft_eval": docstring_pairs("eval"),
    }
    written = {}
    for name, rows in sets.items():
        path = out_dir / f"{name}.jsonl"
        _write_jsonl(path, rows)
        written[name] = {"path": str(path), "count": len(rows)}
    return written
