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
- `check_output_dir`: the run directory is writable and its disk has room for a checkpoint, before the
  run starts.

Test hooks (not part of the interface): SATLM_TEST_HOOK=step-sleep:SECONDS sleeps after every step;
SATLM_TEST_HOOK=pause-save:STEP stops inside checkpoint-STEP's save, after the Trainer wrote it and before
the rename, and writes `.tmp-checkpoints/paused` (a test kills the process there).
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from shutil import disk_usage
from typing import Iterator

import torch
from transformers import TrainerCallback

from ..distributed import barrier, is_main_process, world_size
from ..errors import CheckpointError, NumericalError, RunConfigError, TrainingInterrupted
from ..integrations.hf_trainer import CHECKPOINT_PREFIX  # one name for checkpoint-<step>

STAGING_DIR = ".tmp-checkpoints"  # inside output_dir: checkpoints being written
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
TEST_HOOK_ENV = "SATLM_TEST_HOOK"


def _test_hook(name: str) -> float | None:
    kind, _, value = os.environ.get(TEST_HOOK_ENV, "").partition(":")
    return float(value) if kind == name and value else None


def resume_hint(out: Path) -> str:
    launcher = " (under the same torchrun / accelerate launch)" if world_size() > 1 else ""
    return f"resume with: satlm train {out / 'config.yaml'} --resume{launcher}"


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


class AtomicCheckpoints(TrainerCallback):
    """Rename each checkpoint from the staging folder into the run directory once it is whole; keep the
    newest `keep` (None: all). Must be the last callback, so that every other on_save has written its files."""

    def __init__(self, out_dir: Path, keep: int | None = None):
        self.out = Path(out_dir)
        self.staging = self.out / STAGING_DIR
        self.keep = keep

    def on_train_begin(self, args, state, control, **kwargs):
        # What a killed run left half-written is never resumed from (plan_output_dir refuses it): remove it.
        if args.should_save and self.staging.is_dir():
            for p in self.staging.iterdir():
                shutil.rmtree(p) if p.is_dir() else p.unlink()

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
        _fsync_tree(src)
        if dst.exists():  # saved again after resuming from an earlier checkpoint: replace it
            old = self.staging / f"old-{name}"
            os.replace(dst, old)
            os.replace(src, dst)
            shutil.rmtree(old)
        else:
            os.replace(src, dst)
        _fsync(self.out)
        self._rotate(dst)

    def _rotate(self, newest: Path) -> None:
        if self.keep is None:
            return
        found = checkpoints(self.out)
        for p in [p for p in found if p != newest][: max(0, len(found) - self.keep)]:
            # Out of the checkpoint-N namespace first, so that a kill during the removal leaves no half folder.
            trash = self.staging / f"old-{p.name}"
            os.replace(p, trash)
            shutil.rmtree(trash)

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
        reason = f"{type(error).__name__}: {' '.join(str(error).split())}"
        cause: BaseException | None = error
        while cause is not None:
            if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
                reason = "no space left on device"
                break
            cause = cause.__cause__ or cause.__context__
        shutil.rmtree(partial, ignore_errors=True)
        try:
            free = f"; {_size(disk_usage(self.out).free)} free on its disk"
        except OSError:
            free = ""
        newest = checkpoints(self.out)
        kept = (f"the newest complete checkpoint is {newest[-1]}; {resume_hint(self.out)}" if newest
                else "no complete checkpoint was written before it")
        return CheckpointError(f"writing {self.out / partial.name} failed ({reason}{free}); nothing of it was "
                               f"kept; {kept}")


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
    update of a step whose loss or gradients are not finite.

    Args:
        out_dir: the run directory (its newest checkpoint is named in the errors).
        max_skipped_steps: how many non-finite steps may have their update dropped before the run stops;
            0: stop at the first.
    """

    def __init__(self, out_dir: Path, max_skipped_steps: int = 0):
        self.out = Path(out_dir)
        self.max_skipped_steps = max_skipped_steps
        self.received = 0  # signal number set by the handler (this process)
        self.stop_signal = 0  # the signal that stops training, agreed by all ranks
        self.skipped: list[int] = []
        self.check_grads = True
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
        self._hook = model.register_forward_hook(self._record_loss)
        # fp16 mixed precision: an inf gradient is the GradScaler's cue to lower the scale and skip the step.
        self.check_grads = not args.fp16

    def on_step_begin(self, args, state, control, **kwargs):
        self._losses.clear()

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        losses, self._losses = self._losses, []
        device = losses[0].device if losses else next(model.parameters()).device
        loss_bad = (~torch.stack([x.float() for x in losses]).isfinite().all()) if losses else torch.tensor(False)
        grad_bad = torch.tensor(False)
        if self.check_grads:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]  # FSDP2: this rank's shard
            if grads:
                norms = torch._foreach_norm(grads)
                grad_bad = ~torch.stack([n.float().to(device) for n in norms]).isfinite().all()
        flags = torch.stack([loss_bad.to(device).float(), grad_bad.to(device).float(),
                             torch.tensor(float(self.received), device=device)])
        loss_bad, grad_bad, signum = (int(v) for v in _all_reduce_max(flags).tolist())  # the one host sync
        if signum:
            self.stop_signal = signum
        if loss_bad or grad_bad:
            self._non_finite(args, state, model, losses, bool(loss_bad))

    def _non_finite(self, args, state, model, losses, loss_bad: bool) -> None:
        step = state.global_step + 1
        bad = [v for v in (x.item() for x in losses) if not math.isfinite(v)]
        what = (f"the training loss is {bad[0] if bad else 'not finite (on another rank)'}" if loss_bad
                else "a gradient is not finite")
        if len(self.skipped) >= self.max_skipped_steps:
            newest = checkpoints(self.out)
            kept = (f"the last good checkpoint is {newest[-1]} ({resume_hint(self.out)})" if newest
                    else "no checkpoint was written before it")
            more = (f" after {len(self.skipped)} skipped step(s) (max_skipped_steps={self.max_skipped_steps})"
                    if self.max_skipped_steps else "")
            hint = ("" if self.max_skipped_steps else "; or set max_skipped_steps=N to drop the update of up to N "
                    "such steps")
            raise NumericalError(f"step {step}: {what}{more}; stopped before applying its update; {kept}; "
                                 f"a lower lr or max_grad_norm may help{hint}")
        self.skipped.append(step)
        if not args.fp16:  # (fp16: the GradScaler skips a step with non-finite gradients itself)
            for p in model.parameters():
                p.grad = None  # the optimizer leaves a parameter without a gradient untouched
        if is_main_process():
            print(f"satlm: step {step}: {what}; its update is skipped ({len(self.skipped)} of at most "
                  f"{self.max_skipped_steps})", file=sys.stderr, flush=True)

    def on_step_end(self, args, state, control, **kwargs):
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


# -- before the run --------------------------------------------------------------------------------------
def checkpoint_bytes(model: torch.nn.Module, optim: str) -> int:
    """About what one checkpoint takes on disk: the weights plus the optimizer's state (Adam: two moments)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    moments = 2 if "adam" in optim.lower() else 1
    return weights + moments * sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)


def _write_probe(folder: Path) -> None:
    probe = folder / ".satlm-write-test"
    with open(probe, "wb") as f:
        f.write(b"satlm")
        f.flush()
        os.fsync(f.fileno())
    probe.unlink()


def check_output_dir(out: Path, need_bytes: int = 0) -> None:
    """The run directory takes files, and its disk has room for one checkpoint (`need_bytes`)."""
    try:
        _write_probe(out)
    except OSError as e:
        raise RunConfigError(f"output_dir {out} is not writable: {e.strerror or e}") from None
    free = disk_usage(out).free
    if need_bytes and free < need_bytes:
        raise RunConfigError(f"output_dir {out}: {_size(free)} free on its disk, less than one checkpoint takes "
                             f"(about {_size(need_bytes)}: weights and optimizer state); free some space or "
                             "choose another output_dir")


__all__ = ["AtomicCheckpoints", "FaultGuard", "NothingLeftToTrain", "STAGING_DIR", "catch_stop_signals",
           "check_output_dir", "checkpoint_bytes", "checkpoints"]
