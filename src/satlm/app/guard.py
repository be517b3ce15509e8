"""What `satlm train` does when the run is stopped, the disk fills up or the loss goes non-finite.

Three pieces, each a TrainerCallback (or a context manager around `trainer.train()`):

- `AtomicCheckpoints`: the Trainer writes checkpoints into `output_dir/.tmp-checkpoints/checkpoint-N`
  (the recipe points TrainingArguments.output_dir there); once the folder is whole (the Trainer's files,
  every rank's RNG state, SATCallback's sat_state.pt) and on disk (fsync), it is renamed to
  `output_dir/checkpoint-N`. A `checkpoint-N` name therefore only ever holds a whole checkpoint, whenever
  the process dies (SIGKILL, power loss). Rotation (save_total_limit) happens here, after the rename.
- `FaultGuard` plus `catch_stop_signals`: SIGINT / SIGTERM set a flag; at the end of the step the run
  writes a checkpoint and stops; a second signal of the same kind stops at once (KeyboardInterrupt).
  Before each optimizer step it checks the step's training loss (every micro-batch) and gradients: a NaN
  or inf stops the run before the update is applied, or, with `max_skipped_steps`, drops that update.
  Under torchrun both flags are agreed by all ranks (one tiny all-reduce per step), so every rank stops
  or skips at the same step.
- The run directory itself (whose it is, one process at a time, room on its disk): app/rundir.py.
- Good checkpoints: `checkpoint-N` is *good* once step N+1, the first step trained from it, had a finite loss
  and finite gradients and a loss at most `EXPLOSION_FACTOR` times the median of the recent good steps' losses
  (FaultGuard writes `satlm_good.json` into it then). The guard names the newest good one, and rotation
  never removes it.

Test hooks (not part of the interface): SATLM_TEST_HOOK=step-sleep:SECONDS sleeps after every step;
SATLM_TEST_HOOK=pause-save:STEP stops inside checkpoint-STEP's save, after the Trainer wrote it and before
the rename, and writes `.tmp-checkpoints/paused` (a test kills the process there).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import signal
import statistics
import sys
import time
from collections import deque
from pathlib import Path
from shutil import disk_usage
from typing import Iterator

import torch
from transformers import TrainerCallback

from ..distributed import barrier, is_main_process, world_size
from ..errors import CheckpointError, NumericalError, TrainingInterrupted
from ..integrations.hf_trainer import CHECKPOINT_PREFIX  # one name for checkpoint-<step>

STAGING_DIR = ".tmp-checkpoints"  # inside output_dir: checkpoints being written
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
TEST_HOOK_ENV = "SATLM_TEST_HOOK"


def _test_hook(name: str) -> float | None:
    kind, _, value = os.environ.get(TEST_HOOK_ENV, "").partition(":")
    return float(value) if kind == name and value else None


def resume_hint(out: Path, checkpoint: Path | None = None) -> str:
    """The command that continues the run: from its newest checkpoint, or from `checkpoint` when that is an
    older one (--resume would pick the newest)."""
    launcher = " (under the same torchrun / accelerate launch)" if world_size() > 1 else ""
    found = checkpoints(out) if checkpoint is not None else []
    which = f"resume={checkpoint}" if found and Path(checkpoint) != found[-1] else "--resume"
    return f"resume with: satlm train {out / 'config.yaml'} {which}{launcher}"


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


# -- checkpoints -----------------------------------------------------------------------------------------
def checkpoint_step(name: str) -> int | None:
    """N for a folder name checkpoint-N, else None."""
    step = name[len(CHECKPOINT_PREFIX):]
    return int(step) if name.startswith(CHECKPOINT_PREFIX) and step.isdigit() else None


def checkpoints(out_dir: Path, sat: bool = False) -> list[Path]:
    """checkpoint-N folders of a run, oldest first. Each holds trainer_state.json (and sat_state.pt when
    `sat`); the ones written through AtomicCheckpoints are whole by construction, these two files keep
    out a folder left half-written by an older satlm or by hand."""
    from ..integrations.hf_trainer import SAT_STATE_NAME

    found = []
    if out_dir.is_dir():
        for p in out_dir.iterdir():
            step = checkpoint_step(p.name)
            if step is not None and p.is_dir() and (p / "trainer_state.json").is_file() and (
                    not sat or (p / SAT_STATE_NAME).is_file()):
                found.append((step, p))
    return [p for _, p in sorted(found)]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems cannot fsync a directory
        if e.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            _fsync(Path(root) / name)
        _fsync(Path(root))


def remove_path(path: Path) -> None:
    """Remove a file, a folder tree or a symbolic link. A link is unlinked, never followed: what it points to
    is not satlm's to remove (shutil.rmtree refuses a link and, inside the tree, unlinks links)."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


def replace_dir(src: Path, dst: Path, trash: Path) -> None:
    """Rename the whole folder `src` to `dst`, an older `dst` first out of the way (to `trash`, then removed),
    so that the name `dst` only ever holds a whole folder."""
    _fsync_tree(src)
    if dst.exists() or dst.is_symlink():
        if trash.exists() or trash.is_symlink():
            remove_path(trash)  # left by a kill during an earlier replace
        os.replace(dst, trash)
        os.replace(src, dst)
        remove_path(trash)
    else:
        os.replace(src, dst)
    _fsync(dst.parent)


GOOD_NAME = "satlm_good.json"  # in checkpoint-N once the step after it trained well (FaultGuard)
EXPLOSION_FACTOR = 4.0  # a step loss above this many times the recent median is an explosion
RECENT_STEPS = 20  # the good steps whose median is that reference


def is_good(checkpoint: Path) -> bool:
    return (checkpoint / GOOD_NAME).is_file()


def last_good(out_dir: Path) -> Path | None:
    """The newest checkpoint known good (see the module doc), or None."""
    good = [p for p in checkpoints(out_dir) if is_good(p)]
    return good[-1] if good else None


def _write_json(path: Path, obj) -> None:
    """Whole or not at all (a temporary name, fsync, rename): a kill leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class AtomicCheckpoints(TrainerCallback):
    """Rename each checkpoint from the staging folder into the run directory once it is whole; keep the
    newest `keep` (None: all) and, besides them, the newest good one. Must be the last callback, so that every
    other on_save has written its files. `run_dir` (a RunDir) records each checkpoint in the run's marker."""

    def __init__(self, out_dir: Path, keep: int | None = None, run_dir=None):
        self.out = Path(out_dir)
        self.staging = self.out / STAGING_DIR
        self.keep = keep
        self.run_dir = run_dir

    def on_train_begin(self, args, state, control, **kwargs):
        # What a killed run left half-written is never resumed from (plan_output_dir refuses it): remove it.
        if args.should_save and self.staging.is_dir():
            for p in self.staging.iterdir():
                remove_path(p)

    def on_save(self, args, state, control, **kwargs):
        barrier()  # every rank has written its part (RNG state, FSDP shards) into the staging folder
        if not args.should_save:
            return
        name = f"{CHECKPOINT_PREFIX}{state.global_step}"
        src, dst = self.staging / name, self.out / name
        pause = _test_hook("pause-save")
        if pause is not None and int(pause) == state.global_step:
            (self.staging / "paused").write_text(name)
            time.sleep(600)
        # saved again after resuming from an earlier checkpoint: the old one is replaced
        replace_dir(src, dst, self.staging / f"old-{name}")
        if self.run_dir is not None:
            self.run_dir.saved_checkpoint(name)
        self._rotate(dst)

    def _rotate(self, newest: Path) -> None:
        if self.keep is None:
            return
        # The oldest go first, but never the one just written nor the newest good one (which may make keep + 1:
        # a run of steps that did not train well never rotates the last good checkpoint out).
        found = checkpoints(self.out)
        spare = [p for p in found if p not in (newest, last_good(self.out))]
        for p in spare[: max(0, len(found) - self.keep)]:
            # Out of the checkpoint-N namespace first, so that a kill during the removal leaves no half folder.
            trash = self.staging / f"old-{p.name}"
            os.replace(p, trash)
            remove_path(trash)
            if self.run_dir is not None:
                self.run_dir.removed_checkpoint(p.name)

    def tidy(self) -> None:
        """Remove the staging folder if nothing is left in it. Not in on_train_end: under torchrun another
        rank may still be listing it there (the Trainer's _finalize_training); the recipe calls this after
        a barrier."""
        if self.staging.is_dir() and not any(self.staging.iterdir()):
            self.staging.rmdir()

    def partial(self) -> Path | None:
        """The checkpoint folder a failed save left in the staging folder, if any."""
        if not self.staging.is_dir():
            return None
        found = [p for p in self.staging.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)]
        return found[0] if found else None

    def failed(self, partial: Path, error: BaseException) -> CheckpointError:
        """The error to raise when writing `partial` failed; removes it (it may be what filled the disk)."""
        reason = ("no space left on device" if disk_full(error)
                  else f"{type(error).__name__}: {' '.join(str(error).split())}")
        remove_path(partial)
        try:
            free = f"; {_size(disk_usage(self.out).free)} free on its disk"
        except OSError:
            free = ""
        newest = checkpoints(self.out)
        kept = (f"the newest complete checkpoint is {newest[-1]}; {resume_hint(self.out)}" if newest
                else "no complete checkpoint was written before it")
        return CheckpointError(f"writing {self.out / partial.name} failed ({reason}{free}); nothing of it was "
                               f"kept; {kept}")


def disk_full(error: BaseException) -> bool:
    """Whether `error` (or what caused it) is a full disk or quota: an OSError with ENOSPC / EDQUOT, or a
    SafetensorError, which carries the OS error in its text only."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(cause)
        if "No space left on device" in text or "StorageFull" in text or "Disk quota exceeded" in text:
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def mount_point(path: Path) -> Path:
    """The mount point of the file system `path` is on (what "no space left on DEVICE" names)."""
    path = Path(path).resolve()
    while path != path.parent and os.stat(path.parent).st_dev == os.stat(path).st_dev:
        path = path.parent
    return path


def no_space(path: Path, need_bytes: int) -> str:
    """'no space left on device MOUNT (needs N MiB, M MiB free)' for a write of `need_bytes` under `path`."""
    try:
        free = f", {_size(disk_usage(path).free)} free"
        where = f" {mount_point(path)}"
    except OSError:
        free = where = ""
    return f"no space left on device{where} (needs {_size(need_bytes)}{free})"


# -- loading a checkpoint --------------------------------------------------------------------------------
NOT_LOADED_ON_RESUME = ("training_args.bin",)  # a pickled TrainingArguments the Trainer writes and never reads


def _load_check(path: Path) -> None:
    """Load one checkpoint file as a resume would (torch files with weights_only=True and the Trainer's
    allow-list of numpy RNG types; memory-mapped, so a large optimizer state is not read twice)."""
    if path.suffix == ".json":
        json.loads(path.read_text(encoding="utf-8"))
    elif path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            list(f.keys())
    elif path.suffix in (".pt", ".pth", ".bin"):
        try:
            from transformers.trainer_pt_utils import safe_globals
        except ImportError:
            safe_globals = contextlib.nullcontext
        with safe_globals():
            try:
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                torch.load(path, map_location="cpu", weights_only=True)  # an old (non-zip) torch.save format


def _why_not_loaded(error: BaseException) -> str:
    """One line: why a checkpoint file does not load (a refused pickle says what it asked for)."""
    import pickle

    text = " ".join(str(error).split())
    if isinstance(error, pickle.UnpicklingError):
        found = [line.strip() for line in str(error).splitlines() if "Unsupported" in line or "GLOBAL" in line]
        what = f" ({found[0][:160]})" if found else ""
        return f"torch.load(weights_only=True) refused its pickle, which asks for more than tensors{what}"
    return f"{type(error).__name__}: {text[:200]}"


def check_checkpoint_loads(checkpoint: Path) -> None:
    """Every file a resume reads from `checkpoint` loads; else a CheckpointError naming the file and why.
    Run before anything is trained or changed, so a torn or crafted checkpoint is one line, not a traceback."""
    checkpoint = Path(checkpoint)
    for path in sorted(checkpoint.rglob("*")):
        if path.name in NOT_LOADED_ON_RESUME or not path.is_file():
            continue
        try:
            _load_check(path)
        except Exception as e:  # noqa: BLE001 - whatever the loader raises, said in one line
            raise CheckpointError(f"cannot resume from {checkpoint}: {path.name} does not load: "
                                  f"{_why_not_loaded(e)}; resume from another checkpoint with resume=PATH, or "
                                  f"start again without resume") from None


# -- signals and non-finite steps ------------------------------------------------------------------------
def _all_reduce_max(flags: torch.Tensor) -> torch.Tensor:
    """The element-wise max over ranks (as is in a single process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flags
    device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in str(dist.get_backend()) else "cpu"
    flags = flags.to(device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags


class NothingLeftToTrain(Exception):
    """FaultGuard's way out of trainer.train() when the run resumes at max_steps (caught by the recipe)."""


class FaultGuard(TrainerCallback):
    """Stop at the end of the step after SIGINT / SIGTERM (with a checkpoint); stop before, or skip, the
    update of a step whose loss or gradients are not finite; mark a checkpoint good once the step after it
    trained well (module doc).

    Args:
        out_dir: the run directory (its last good checkpoint is named in the errors).
        max_skipped_steps: how many non-finite steps may have their update dropped before the run stops;
            0: stop at the first.
        resume_from: the checkpoint the run resumes from: the recent step losses (the reference of the
            explosion rule) continue from the ones saved in it.
    """

    STATE_NAME = "satlm_guard.json"  # in each checkpoint: the recent good steps' losses

    def __init__(self, out_dir: Path, max_skipped_steps: int = 0, resume_from: str | None = None):
        self.out = Path(out_dir)
        self.max_skipped_steps = max_skipped_steps
        self.resume_from = resume_from
        self.received = 0  # signal number set by the handler (this process)
        self.stop_signal = 0  # the signal that stops training, agreed by all ranks
        self.skipped: list[int] = []
        self.trained = False  # a step finished in this session (a load error comes before)
        self.check_grads = True
        self.recent: deque[float] = deque(maxlen=RECENT_STEPS)  # losses of the recent good steps
        self._losses: list[torch.Tensor] = []
        self._hook = None
        self._sleep = _test_hook("step-sleep")

    # The raw loss of every micro-batch, before the Trainer's logging_nan_inf_filter hides a NaN.
    def _record_loss(self, module, inputs, output):
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if module.training and isinstance(loss, torch.Tensor):
            self._losses.append(loss.detach())

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.close()
        if state.global_step >= state.max_steps:
            # Resumed from the last step's checkpoint (stopped before the final evaluation): the Trainer
            # would train one step past max_steps; everything is loaded now, so leave the loop here.
            raise NothingLeftToTrain(state.global_step)
        saved = Path(self.resume_from) / self.STATE_NAME if self.resume_from and state.global_step else None
        if saved is not None and saved.is_file():
            self.recent.extend(json.loads(saved.read_text())["recent_losses"])
        self._hook = model.register_forward_hook(self._record_loss)
        # fp16 mixed precision: an inf gradient is the GradScaler's cue to lower the scale and skip the step.
        self.check_grads = not args.fp16

    def on_step_begin(self, args, state, control, **kwargs):
        self._losses.clear()

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:  # into the staging folder, before AtomicCheckpoints renames it
            folder = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{state.global_step}"
            _write_json(folder / self.STATE_NAME, {"recent_losses": list(self.recent)})

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        losses, self._losses = self._losses, []
        device = losses[0].device if losses else next(model.parameters()).device
        loss_bad = (~torch.stack([x.float() for x in losses]).isfinite().all()) if losses else torch.tensor(False)
        total = torch.stack([x.float() for x in losses]).sum() if losses else torch.tensor(0.0)
        grad_bad = torch.tensor(False)
        if self.check_grads:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]  # FSDP2: this rank's shard
            if grads:
                norms = torch._foreach_norm(grads)
                grad_bad = ~torch.stack([n.float().to(device) for n in norms]).isfinite().all()
        loss_bad, grad_bad, total = loss_bad.to(device), grad_bad.to(device), total.to(device)
        flags = torch.stack([loss_bad.float(), grad_bad.float(), torch.tensor(float(self.received), device=device),
                             torch.where(loss_bad, torch.zeros_like(total), total)])
        loss_bad, grad_bad, signum, total = _all_reduce_max(flags).tolist()  # the one host sync
        if signum:
            self.stop_signal = int(signum)
        self._judge(state.global_step, not (loss_bad or grad_bad) and not self._exploded(total), total)
        if loss_bad or grad_bad:
            self._non_finite(args, state, model, losses, bool(loss_bad))

    # -- good checkpoints ------------------------------------------------------------------------------
    def _exploded(self, loss: float) -> bool:
        """Above EXPLOSION_FACTOR times the median of the recent good steps' losses (losses >= 0, as a language
        model's are; with no good step yet, nothing counts as an explosion)."""
        return bool(self.recent) and loss > EXPLOSION_FACTOR * statistics.median(self.recent)

    def _judge(self, step: int, trained_well: bool, loss: float) -> None:
        """Step `step` + 1 is about to be applied: it trained from checkpoint-`step` (if there is one), which
        is good when this step `trained_well`."""
        if not trained_well:
            return
        self.recent.append(loss)
        checkpoint = self.out / f"{CHECKPOINT_PREFIX}{step}"
        if is_main_process() and step and (checkpoint / "trainer_state.json").is_file() and not is_good(checkpoint):
            _write_json(checkpoint / GOOD_NAME, {"checked_by_step": step + 1, "step_loss": loss})

    def _kept(self) -> str:
        """What is left to resume from, for the error of a step that did not train well."""
        found = checkpoints(self.out)
        if not found:
            return "no checkpoint was written before it"
        good = last_good(self.out)
        newer = [p.name for p in found if good is None or checkpoint_step(p.name) > checkpoint_step(good.name)]
        unproven = (f"{', '.join(newer)} {'is' if len(newer) == 1 else 'are'} not known good: the step after "
                    f"{'it' if len(newer) == 1 else 'each'} did not train with a finite loss of at most "
                    f"{EXPLOSION_FACTOR:g}x the recent median") if newer else ""
        if good is None:
            return f"no checkpoint is known good ({unproven}); train again from the start, with a lower lr"
        return (f"the last good checkpoint is {good} ({resume_hint(self.out, good)})"
                + (f"; {unproven}" if unproven else ""))

    def _non_finite(self, args, state, model, losses, loss_bad: bool) -> None:
        step = state.global_step + 1
        bad = [v for v in (x.item() for x in losses) if not math.isfinite(v)]
        what = (f"the training loss is {bad[0] if bad else 'not finite (on another rank)'}" if loss_bad
                else "a gradient is not finite")
        if len(self.skipped) >= self.max_skipped_steps:
            more = (f" after {len(self.skipped)} skipped step(s) (max_skipped_steps={self.max_skipped_steps})"
                    if self.max_skipped_steps else "")
            hint = ("" if self.max_skipped_steps else "; or set max_skipped_steps=N to drop the update of up to N "
                    "such steps")
            raise NumericalError(f"step {step}: {what}{more}; stopped before applying its update; {self._kept()}; "
                                 f"a lower lr or max_grad_norm may help{hint}")
        self.skipped.append(step)
        if not args.fp16:  # (fp16: the GradScaler skips a step with non-finite gradients itself)
            for p in model.parameters():
                p.grad = None  # the optimizer leaves a parameter without a gradient untouched
        if is_main_process():
            print(f"satlm: step {step}: {what}; its update is skipped ({len(self.skipped)} of at most "
                  f"{self.max_skipped_steps})", file=sys.stderr, flush=True)

    def on_step_end(self, args, state, control, **kwargs):
        self.trained = True
        if self._sleep:
            time.sleep(self._sleep)
        if state.global_step >= state.max_steps and not self.stop_signal:
            # A signal after the last step's check: stop all the same; the resume evaluates and saves final/.
            self.stop_signal = int(_all_reduce_max(torch.tensor([float(self.received)])).tolist()[0])
        if self.stop_signal:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        """Remove the loss hook (also when training raised)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def stopped_at_once(self, step: int) -> TrainingInterrupted:
        name = signal.Signals(self.received).name
        newest = checkpoints(self.out)
        kept = f"the newest checkpoint is {newest[-1]}; {resume_hint(self.out)}" if newest else "no checkpoint"
        return TrainingInterrupted(f"stopped at once by a second {name} at step {step}, without saving; {kept}",
                                   signum=self.received)

    def interrupted(self, step: int) -> TrainingInterrupted:
        name = signal.Signals(self.stop_signal).name
        newest = checkpoints(self.out)
        saved = f"checkpoint saved to {newest[-1]}" if newest else "no checkpoint could be saved"
        return TrainingInterrupted(f"interrupted by {name} at step {step}; {saved}; {resume_hint(self.out)}",
                                   signum=self.stop_signal)


@contextlib.contextmanager
def catch_stop_signals(guard: FaultGuard) -> Iterator[None]:
    """SIGINT / SIGTERM set `guard.received` (training then stops after the step, with a checkpoint); the
    same signal again raises KeyboardInterrupt. The previous handlers are back afterwards. Outside the main
    thread (where Python cannot handle signals) this does nothing."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if guard.received == signum:
            raise KeyboardInterrupt
        guard.received = guard.received or signum
        if is_main_process():
            print(f"\nsatlm: {signal.Signals(signum).name} received: finishing this step, saving a checkpoint and "
                  "stopping (send it again to stop at once, without saving)", file=sys.stderr, flush=True)

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


__all__ = ["AtomicCheckpoints", "FaultGuard", "GOOD_NAME", "NothingLeftToTrain", "STAGING_DIR", "catch_stop_signals",
           "check_checkpoint_loads", "checkpoints", "is_good", "last_good"]
