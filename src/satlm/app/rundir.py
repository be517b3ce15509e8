"""Whose the output folder is, before and while a run writes to it.

- `check_output_dir`: the run directory takes files and its disk has room for a checkpoint (or, with
  save_steps=0, the final model), before the run starts.
- `RunDir` (and `claim_output_dir` for `satlm compare`): satlm writes only into a new or empty folder or one its
  own marker `.satlm-run.json` claims, removes (on `overwrite`) only the names that marker lists, never through a
  symbolic link, moves a previous run aside (`.previous/`) until the new one has saved a checkpoint or finished,
  and lets one process at a time work in a folder (`fcntl.flock` on `.satlm-run.lock`, held for the run's life).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import time
import uuid
from pathlib import Path
from shutil import disk_usage
from typing import Iterator, Sequence

import torch

from ..errors import RunConfigError
from .guard import _exists, _fsync, _size, _write_json, checkpoint_step, checkpoints, remove_path


# -- before the run --------------------------------------------------------------------------------------
def model_bytes(model: torch.nn.Module) -> int:
    """About what the model's weights take on disk (final/; tied weights once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def checkpoint_bytes(model: torch.nn.Module, optim: str) -> int:
    """About what one checkpoint takes on disk: the weights plus the optimizer's state (Adam: two moments)."""
    moments = 2 if "adam" in optim.lower() else 1
    return model_bytes(model) + moments * sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)


PROBE_NAME = ".satlm-write-test"


def _write_probe(folder: Path) -> None:
    # One name per process: two runs started together on one folder probe it at the same moment, and one's
    # unlink must not take the other's file (which read as "not writable").
    probe = folder / f"{PROBE_NAME}.{os.getpid()}"
    with open(probe, "wb") as f:
        f.write(b"satlm")
        f.flush()
        os.fsync(f.fileno())
    probe.unlink()


def check_output_dir(out: Path, need_bytes: int = 0, what: str = "one checkpoint",
                     contents: str = "weights and optimizer state") -> None:
    """The run directory takes files, and its disk has room for `what` (`need_bytes`): one checkpoint, or
    with save_steps=0 the final model alone."""
    try:
        _write_probe(out)
    except OSError as e:
        raise RunConfigError(f"output_dir {out} is not writable: {e.strerror or e}") from None
    free = disk_usage(out).free
    if need_bytes and free < need_bytes:
        raise RunConfigError(f"output_dir {out}: {_size(free)} free on its disk, less than {what} takes "
                             f"(about {_size(need_bytes)}: {contents}); free some space or choose another "
                             "output_dir")


# -- the run directory: whose it is, one process at a time -----------------------------------------------
MARKER_NAME = ".satlm-run.json"  # the first file a run writes: what it is and what it writes
LOCK_NAME = ".satlm-run.lock"  # flock-ed by the one process working in the folder; holds its PID
PREVIOUS_DIR = ".previous"  # an overwritten run, until the new one has saved a checkpoint or finished
MARKER_VERSION = 1
KEPT_IN_PLACE = (MARKER_NAME, LOCK_NAME, PREVIOUS_DIR, PROBE_NAME, f".{MARKER_NAME}.tmp")  # never moved aside
PROGRESS = ("summary.json",)  # besides checkpoints: a run that wrote one of these got somewhere
SHOWN = 5  # files named when a folder is refused


class RunLock:
    """One process per run directory: an exclusive `fcntl.flock` on `.satlm-run.lock` in it, held until
    `release()` or the process's end (the OS drops it then, so a kill -9 leaves no stale lock). The file
    holds the holder's PID, which the refusal names; it is never removed (removing a lock file races with
    a process about to lock it). Where fcntl is missing (Windows) there is no lock."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> None:
        if self.fd is not None:
            return
        try:
            import fcntl
        except ImportError:
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as e:
            raise RunConfigError(f"cannot open the lock file {self.path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = self._holder(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunConfigError(f"output_dir {self.folder} is in use by another satlm process ({holder} "
                                     f"holds {self.path}); wait for it to end, or choose another output_dir") from None
            raise RunConfigError(f"cannot lock {self.path}: {e.strerror or e}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    @staticmethod
    def _holder(fd: int) -> str:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        return f"PID {text}" if text.isdigit() else "a process that has not written its PID yet"

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None


def _plain_name(name) -> bool:
    """A marker may list only names inside its folder: a crafted `../x` must not make overwrite reach out."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name)


def read_marker(folder: Path) -> dict | None:
    """The marker of a satlm run or comparison in `folder`, or None. A marker that does not read as one is a
    RunConfigError: satlm cannot tell then what in the folder is its own."""
    path = Path(folder) / MARKER_NAME
    if path.is_symlink() or not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
        ok = (isinstance(marker, dict) and marker.get("satlm_run") == MARKER_VERSION
              and isinstance(marker.get("kind"), str)
              and all(isinstance(marker.get(k), list) and all(map(_plain_name, marker[k]))
                      for k in ("writes", "checkpoints")))
    except (OSError, ValueError):
        ok = False
    if not ok:
        raise RunConfigError(f"{path} is not a satlm run marker (damaged or written by hand), so satlm cannot "
                             f"tell which files in {folder} are its own; choose another output_dir")
    return marker


def _legacy_kind(folder: Path) -> str | None:
    """'train' or 'compare' for a folder satlm wrote before it wrote markers: a config.yaml whose first line is
    the header satlm train writes (`# satlm train FOLDER/config.yaml`), or a compare.json whose config's
    output_dir is this folder; else None."""
    folder = Path(folder)
    try:
        with open(folder / "config.yaml", encoding="utf-8", errors="replace") as f:
            head = f.readline()
        if head.startswith("# satlm train "):
            named = Path(head[len("# satlm train "):].strip())
            if named.name == "config.yaml" and named.parent.name == folder.resolve().name:
                return "train"
    except OSError:
        pass
    try:
        config = json.loads((folder / "compare.json").read_text(encoding="utf-8")).get("config") or {}
        if Path(str(config.get("output_dir", ""))).name == folder.resolve().name:
            return "compare"
    except (OSError, ValueError, AttributeError):
        pass
    return None


def is_satlm_run(folder: Path) -> bool:
    """Whether `folder` holds a satlm run or comparison (marked, or written by satlm before markers)."""
    folder = Path(folder)
    return folder.is_dir() and (read_marker(folder) is not None or _legacy_kind(folder) is not None)


def _listing(paths: Sequence[Path]) -> str:
    names = [p.name + ("/" if p.is_dir() and not p.is_symlink() else "") for p in paths]
    more = f" (and {len(names) - SHOWN} more)" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


class RunDir:
    """The output folder of one satlm run (kind 'train') or comparison ('compare'), claimed by a marker.

    `.satlm-run.json`, the first file the run writes (after taking the lock), holds: satlm_run (the marker's
    version), kind, run_id, satlm_version, created (UTC), writes (every name the run may write in the folder),
    parts (sub-folders that are runs of their own, e.g. compare's dense/ and sat/) and checkpoints (the
    checkpoint-N folders it wrote that are still there).

    satlm works in a folder that is new or empty, or that a marker of the same kind claims; a folder satlm
    wrote before it wrote markers (`_legacy_kind`) counts as claimed, listing today's names. Anything else is
    refused, and so are '', '.', '..', '/' and the home folder unless they hold a claimed run. With overwrite,
    the names the marker lists (and only those) are moved into `.previous/` (links moved as links, never
    followed), which is removed once the new run saved its first checkpoint or finished (`saved_checkpoint`,
    `finished`); when a run that never got that far is overwritten in turn, its files are removed and the
    `.previous/` it left, the last run that did, is kept.

    `plan` checks and changes nothing but the lock; `prepare`, after every other pre-flight check, creates the
    folder, checks it takes files and has room, locks it, checks it again and only then moves anything.
    Both run on rank 0 (distributed.on_main_process); the lock lives in rank 0's process.
    """

    def __init__(self, path: str | Path, kind: str, writes: Sequence[str], parts: Sequence[str] = ()):
        self.spec = str(path)
        self.path = Path(path).expanduser()
        self.kind, self.writes, self.parts = kind, tuple(writes), tuple(parts)
        self.lock = RunLock(self.path)
        self.owner: dict | None = None  # the marker plan() found (None: a new or empty folder)
        self.resume = False
        self.replace: list[str] = []  # the previous run's names that prepare() moves aside
        self.marker: dict | None = None  # this run's, once prepare() wrote it
        self._previous_pending = False

    # -- whose the folder is -----------------------------------------------------------------------------
    def _special(self) -> str | None:
        if not self.spec.strip():
            return "empty (the current folder)"
        here = Path.cwd().resolve()
        named = {Path(here.anchor): "the root folder", Path.home().resolve(): "the home folder",
                 here.parent: "the parent folder", here: "the current folder"}
        return named.get(self.path.resolve())

    def _owner(self) -> dict | None:
        """The folder's marker; for a folder of an older satlm, one made up for it (its checkpoint-N folders)."""
        marker = read_marker(self.path)
        if marker is not None:
            return marker
        kind = _legacy_kind(self.path)
        if kind is None:
            return None
        found = [p.name for p in checkpoints(self.path)] if kind == "train" else []
        return {"satlm_run": MARKER_VERSION, "kind": kind, "legacy": True, "writes": list(self.writes),
                "parts": list(self.parts), "checkpoints": found}

    def _part_is_ours(self, path: Path) -> bool:
        return path.is_dir() and (not any(path.iterdir()) or is_satlm_run(path))

    def _foreign(self) -> list[Path]:
        """What in the folder satlm did not write (the lock, its probe and sub-runs that are satlm's aside)."""
        return [p for p in sorted(self.path.iterdir())
                if p.name != LOCK_NAME and not p.name.startswith(PROBE_NAME)
                and not (p.name in self.parts and self._part_is_ours(p))]

    def look(self) -> dict | None:
        """The folder's owner (None: new or empty), or a RunConfigError saying why satlm may not write there."""
        out = self.path
        if _exists(out) and not out.is_dir():
            raise RunConfigError(f"output_dir {out} is a file")
        owner = self._owner() if out.is_dir() else None
        special = self._special()
        if owner is None and special:
            raise RunConfigError(f"output_dir {self.spec!r} is {special} ({out.resolve()}), which holds no satlm "
                                 "run; name a folder for the run itself, new or empty, e.g. output_dir=runs/NAME")
        if owner is None:
            foreign = self._foreign() if out.is_dir() else []
            if foreign:
                raise RunConfigError(f"output_dir {out} is not empty and is not a satlm run (no {MARKER_NAME} in "
                                     f"it): it holds {_listing(foreign)}; satlm writes only into a new or empty "
                                     "folder or one of its own runs, and removes nothing it did not write: choose "
                                     "another output_dir, or an empty one")
            return None
        if owner["kind"] != self.kind:
            raise RunConfigError(f"output_dir {out} holds a satlm {owner['kind']} (see {out / MARKER_NAME}), not a "
                                 f"{self.kind} run; choose another output_dir")
        return owner

    def _names_of(self, owner: dict) -> list[str]:
        """The names of `owner`'s run that are in the folder now (what overwrite moves aside)."""
        names = [n for n in owner["writes"] if n not in KEPT_IN_PLACE and _exists(self.path / n)]
        return names + [n for n in owner["checkpoints"] if n not in names and _exists(self.path / n)]

    # -- before the run ------------------------------------------------------------------------------------
    def plan(self, overwrite: bool = False, resume: bool = False) -> None:
        """Check the folder (nothing changes): may this run write there, and what would overwrite replace?
        A claimed folder is locked now, so that a second process fails before it loads anything."""
        self.owner, self.resume = self.look(), resume
        if self.owner is None:
            return
        self.lock.acquire()
        names = self._names_of(self.owner)
        if names and not resume:
            if not overwrite:
                raise RunConfigError(f"output_dir {self.path} already holds a run; set resume=true to continue it "
                                     "or overwrite=true to replace it")
            self.replace = names

    def prepare(self, need_bytes: int = 0, what: str = "one checkpoint",
                contents: str = "weights and optimizer state") -> Path:
        """The last pre-flight checks (the folder takes files and has room for `what`), then the lock, then the
        changes: the previous run moved aside, this run's marker written. Returns the folder."""
        out = self.path
        created = not _exists(out)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunConfigError(f"cannot create output_dir {out}: {e.strerror or e}") from None
        try:
            check_output_dir(out, need_bytes, what, contents)
        except RunConfigError:
            if created:
                with contextlib.suppress(OSError):
                    out.rmdir()  # the empty folder this run made, and nothing else
            raise
        self.lock.acquire()
        now = self.look()  # again, under the lock: another process may have written here since plan()
        if (now or {}).get("run_id") != (self.owner or {}).get("run_id"):
            raise RunConfigError(f"output_dir {out} changed while this run was being set up (another satlm process "
                                 "wrote a run there); start again")
        if self.replace:
            self._move_aside()
        self.marker = self._continued(now) if self.resume and now is not None else self._new_marker()
        _write_json(out / MARKER_NAME, self.marker)
        self._previous_pending = _exists(out / PREVIOUS_DIR)
        return out

    def _new_marker(self) -> dict:
        from .. import __version__

        return {"satlm_run": MARKER_VERSION, "kind": self.kind, "run_id": uuid.uuid4().hex,
                "satlm_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "writes": sorted(set(self.writes) | set(KEPT_IN_PLACE)), "parts": list(self.parts),
                "checkpoints": []}

    def _continued(self, owner: dict) -> dict:
        """The marker of a run that is resumed (a folder of an older satlm gets one now)."""
        if not owner.get("legacy"):
            return owner
        return {**self._new_marker(), "checkpoints": owner["checkpoints"], "adopted": True}

    def _move_aside(self) -> None:
        out, previous = self.path, self.path / PREVIOUS_DIR
        got_somewhere = any(checkpoint_step(n) is not None or n in PROGRESS for n in self.replace)
        if _exists(previous) and not got_somewhere:
            for name in self.replace:  # a run that saved nothing: the .previous/ it left is the one to keep
                remove_path(out / name)
            return
        if _exists(previous):
            remove_path(previous)
        previous.mkdir()
        for name in self.replace:
            os.rename(out / name, previous / name)  # a link is renamed, not followed
        _fsync(out)

    # -- during and after the run --------------------------------------------------------------------------
    def _save(self) -> None:
        if self.marker is not None:
            _write_json(self.path / MARKER_NAME, self.marker)

    def saved_checkpoint(self, name: str) -> None:
        """checkpoint `name` is whole in the folder: list it, and drop the overwritten run now."""
        if self.marker is not None and name not in self.marker["checkpoints"]:
            self.marker["checkpoints"].append(name)
            self._save()
        self.finished()

    def removed_checkpoint(self, name: str) -> None:
        if self.marker is not None and name in self.marker["checkpoints"]:
            self.marker["checkpoints"].remove(name)
            self._save()

    def finished(self) -> None:
        """The run saved a checkpoint or finished: the run it overwrote (in .previous/) is not needed now."""
        if self._previous_pending:
            remove_path(self.path / PREVIOUS_DIR)
            self._previous_pending = False

    def claim(self) -> Path:
        """For a comparison's folder: check it is new, empty or one of satlm's comparisons, lock it, mark it."""
        self.plan(resume=True)
        return self.prepare()

    def release(self) -> None:
        self.lock.release()


@contextlib.contextmanager
def claim_output_dir(path: str | Path, kind: str = "compare", writes: Sequence[str] = (),
                     parts: Sequence[str] = ()) -> Iterator[RunDir]:
    """Claim `path` for the life of the block: refused (RunConfigError) unless it is new, empty or already a
    satlm `kind`; locked against a second process; marked (`.satlm-run.json`, listing `writes`, the names the
    block writes, and `parts`, sub-folders that are runs of their own such as compare's dense/ and sat/, which
    may be links to such runs). Nothing in it is moved or removed. Under torchrun rank 0 claims it and every
    rank gets its error. Call it after the pre-flight checks, so that a refused config leaves no folder."""
    from ..distributed import on_main_process

    run_dir = RunDir(path, kind, writes, parts)
    try:
        on_main_process(run_dir.claim)
        yield run_dir
    finally:
        run_dir.release()


__all__ = ["LOCK_NAME", "MARKER_NAME", "PREVIOUS_DIR", "RunDir", "RunLock", "check_output_dir", "checkpoint_bytes",
           "claim_output_dir", "is_satlm_run", "model_bytes", "read_marker"]
