"""Tokenize once: a run's tokenized train and eval data cached on disk and memory-mapped by every process.

The key hashes what decides the tokens: the data files (path, size, mtime), the tokenizer (its serialized
vocabulary and merges, special tokens, chat template), seq_len, the task and every data.* setting that changes
the rows. A folder `<cache>/tokenized/<key>/` holds per split `ids` (uint16 when the vocabulary fits, else
uint32), `trained` (uint8; sft only: labels are ids where trained, -100 elsewhere), `positions` (packed sft
only) and `offsets` (row starts), as .npy files read with mmap, plus info.json. One process builds it under a
file lock while the others (the other ranks of a torchrun launch) wait, then read it; a resume reads it too.

Written by hand because no library does this part: `datasets` caches its own map() results, but satlm's rows come
from its own validation (file:line errors), chat rendering and packing, and a datasets cache per rank would
tokenize on every rank.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .readers import cache_root as satlm_cache_root
from .packing import IGNORE_INDEX

FORMAT = 1  # bump when the rows a config produces change
SPLITS = ("train", "eval")


def cache_root(cache_dir: str | None) -> Path:
    """data.cache_dir, else $SATLM_TOKENIZED_CACHE (the tests point it at a temporary folder), else
    $SATLM_CACHE or ~/.cache/satlm; under each, `tokenized/`."""
    if cache_dir is None and os.environ.get("SATLM_TOKENIZED_CACHE"):
        return Path(os.environ["SATLM_TOKENIZED_CACHE"]).expanduser()
    return (Path(cache_dir).expanduser() if cache_dir else satlm_cache_root()) / "tokenized"


def _files_fingerprint(path) -> list:
    if path is None:
        return [None]
    p = Path(str(path))
    if not p.exists():  # a hub dataset name: its name is all there is to key on
        return [str(path)]
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()
                                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
    out = [str(p.resolve())]
    for f in files:
        st = f.stat()
        out.append([str(f.relative_to(p)) if f != p else f.name, st.st_size, st.st_mtime_ns])
    return out


def _tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    special = {k: getattr(tokenizer, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    h.update(json.dumps([type(tokenizer).__name__, len(tokenizer), special,
                         getattr(tokenizer, "chat_template", None)], default=str).encode())
    return h.hexdigest()


def cache_key(cfg, tokenizer, train_path, eval_path) -> str:
    from dataclasses import asdict

    data = {k: v for k, v in asdict(cfg.data).items() if k not in ("cache_dir", "cache", "group_by_length")}
    material = {"format": FORMAT, "task": cfg.task, "seq_len": cfg.seq_len, "data": data,
                "train": _files_fingerprint(train_path), "eval": _files_fingerprint(eval_path),
                "tokenizer": _tokenizer_fingerprint(tokenizer)}
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:24]


class CachedRows(torch.utils.data.Dataset):
    """Rows read from the memory-mapped arrays: input_ids and labels (and position_ids when packed), int64."""

    def __init__(self, folder: Path, split: str, task: str):
        def load(name):
            f = folder / f"{split}_{name}.npy"
            return np.load(f, mmap_mode="r") if f.is_file() else None

        self.ids, self.trained, self.positions = load("ids"), load("trained"), load("positions")
        self.offsets = np.asarray(load("offsets"))
        self.task = task

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        ids = torch.from_numpy(self.ids[a:b].astype(np.int64))
        if self.trained is None:  # cpt: the model shifts the labels itself
            return {"input_ids": ids, "labels": ids}
        mask = torch.from_numpy(self.trained[a:b].astype(bool))
        row = {"input_ids": ids, "labels": ids.masked_fill(~mask, IGNORE_INDEX)}
        if self.positions is not None:
            row["position_ids"] = torch.from_numpy(self.positions[a:b].astype(np.int64))
        return row

    def num_tokens(self) -> int:
        return int(self.offsets[-1])


def _write_split(folder: Path, split: str, dataset, vocab: int, task: str) -> None:
    rows = [dataset[i] for i in range(len(dataset))]
    ids = [np.asarray(r["input_ids"]).reshape(-1) for r in rows]
    lengths = np.array([0] + [len(x) for x in ids], dtype=np.int64)
    dtype = np.uint16 if vocab <= np.iinfo(np.uint16).max + 1 else np.uint32
    np.save(folder / f"{split}_offsets.npy", np.cumsum(lengths))
    np.save(folder / f"{split}_ids.npy", np.concatenate(ids).astype(dtype) if ids else np.zeros(0, dtype))
    if task == "sft":
        trained = [np.asarray(r["labels"]).reshape(-1) != IGNORE_INDEX for r in rows]
        np.save(folder / f"{split}_trained.npy", np.concatenate(trained).astype(np.uint8))
    if rows and "position_ids" in rows[0]:
        pos = np.concatenate([np.asarray(r["position_ids"]).reshape(-1) for r in rows]).astype(np.uint32)
        np.save(folder / f"{split}_positions.npy", pos)


def cached_build(cfg, tokenizer, train_path, eval_path, build: Callable[[], Any], finish: Callable):
    """finish(train, eval, info) of the cached rows: built by build() (a RunData) under the lock when the cache
    has no entry for this key, read otherwise. info['tokenized_cache'] says which (built / read)."""
    root = cache_root(cfg.data.cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    key = cache_key(cfg, tokenizer, train_path, eval_path)
    folder = root / key
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other ranks wait here while one tokenizes
        how = "read"
        if not (folder / "info.json").is_file():
            data = build()
            tmp = root / f".{key}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            vocab = len(tokenizer)
            for split, ds in zip(SPLITS, (data.train, data.eval)):
                _write_split(tmp, split, ds, vocab, cfg.task)
            (tmp / "info.json").write_text(json.dumps(data.info, default=str))
            os.replace(tmp, folder)
            how = "built"
            with open(root / "builds.log", "a") as log:  # who tokenized what: one line per build
                log.write(f"{key} rank={os.environ.get('RANK', '0')} pid={os.getpid()}\n")
    info = json.loads((folder / "info.json").read_text())
    if how == "read" and (info.get("truncated_examples") or info.get("dropped_examples")):
        import warnings

        warnings.warn(f"{train_path}: {info.get('truncated_examples', 0)} sft examples truncated and "
                      f"{info.get('dropped_examples', 0)} dropped at seq_len={cfg.seq_len} (read from the "
                      "tokenized cache)", UserWarning, stacklevel=3)
    info.update(tokenized_cache=how, tokenized_cache_dir=str(folder))
    return finish(CachedRows(folder, "train", cfg.task), CachedRows(folder, "eval", cfg.task), info)
