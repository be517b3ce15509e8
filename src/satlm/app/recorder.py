"""RunRecorder: the run directory's metrics, periodic dense evaluation, TensorBoard and the progress bar;
LossWindow: the training loss each metrics record logs.

Times: `elapsed_seconds` is wall-clock since training began (continued across resumes); `train_seconds`
leaves out evaluation and checkpoint writing, and tokens/s is measured over it.

The logged loss is satlm's own (LossWindow), not the Trainer's: the mean over the steps since the previous
record of each step's loss as Trainer.training_step returns it (summed over its micro-batches, averaged over
ranks), which is what the Trainer logs, with two differences. The window still open at a checkpoint is saved
in it (`satlm_log_window.json`) and continued on resume, so a resumed run logs what an uninterrupted one logs
(the Trainer starts an empty window, and the record after the resume averages fewer steps). A step whose update
was skipped (max_skipped_steps) counts in no loss: its record lists it in `skipped_steps` (a record whose every
step was skipped is not written; its steps are listed in the next one), where the Trainer would log its
NaN as the window's running mean, or as 0.0. The last step is always logged, so a run shorter than
logging_steps still has a loss.
"""

from __future__ import annotations

import json
import math
import os
import time
from array import array
from pathlib import Path
from typing import Callable

import torch
from transformers import Trainer, TrainerCallback

METRICS_NAME = "metrics.jsonl"
EVAL_NAME = "eval.jsonl"
WINDOW_NAME = "satlm_log_window.json"  # in each checkpoint: the logging window open at it


def read_jsonl_records(path: Path) -> list[dict]:
    """The records of a metrics / eval file; a last line cut short (the process was killed while appending
    it) is left out."""
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines[:-1]]
    if lines:
        try:
            records.append(json.loads(lines[-1]))
        except json.JSONDecodeError:
            pass
    return records


def _rewrite(path: Path, records: list[dict]) -> None:
    # Whole or not at all: under torchrun the other ranks read this file while rank 0 rewrites it.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)


def _mean_over_ranks(value: torch.Tensor) -> float:
    """The mean of a scalar over data-parallel ranks (the value itself in one process), as the Trainer
    averages its logged loss."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value.item()
    value = value.detach().clone().float()
    if "nccl" in str(dist.get_backend()):
        value = value.cuda()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value.item() / dist.get_world_size()


class LossWindow(TrainerCallback):
    """The training loss since the last record (module doc). Must be the first callback, so that every other
    on_log (SATCallback, the trackers of report_to, RunRecorder) sees satlm's loss.

    Args:
        skipped: the steps whose update was dropped; FaultGuard appends to this list.
        resume_from: the checkpoint the run resumes from, whose saved window is continued.
    """

    def __init__(self, skipped: list[int], resume_from: str | None = None):
        self.skipped = skipped
        self.resume_from = resume_from
        self.total: torch.Tensor | None = None  # the summed step losses of the window, this rank
        self.steps = 0  # steps in the window that count (not skipped)
        self.skipped_in_window: list[int] = []  # skipped steps not yet listed in a record
        self._step_start: torch.Tensor | None = None

    def add(self, loss: torch.Tensor) -> None:
        """One micro-batch's loss, as Trainer.training_step returns it (LoggedLossTrainer calls this)."""
        if self.total is None:  # float32, as the Trainer's own sum: bf16 losses are not summed in bf16
            self.total = torch.zeros((), dtype=torch.float32, device=loss.device)
        self.total = self.total + loss.detach()

    def on_train_begin(self, args, state, control, **kwargs):
        self.total, self.steps, self.skipped_in_window = None, 0, []
        saved = Path(self.resume_from) / WINDOW_NAME if self.resume_from and state.global_step else None
        if saved is not None and saved.is_file():
            window = json.loads(saved.read_text())
            self.total = torch.tensor(window["loss_sum"], dtype=torch.float32, device=args.device)
            self.steps, self.skipped_in_window = window["steps"], list(window["skipped_steps"])

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_start = self.total

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.skipped:  # its loss counts in no record
            self.total = self._step_start
            self.skipped_in_window.append(state.global_step)
        else:
            self.steps += 1
        if state.global_step >= state.max_steps:
            control.should_log = True  # the end of a run shorter than, or not a multiple of, logging_steps

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return
        loss = self._mean()
        self.total, self.steps = None, 0
        if loss is None:
            del logs["loss"]  # every step of the window was skipped: nothing to log (the next record lists them)
        else:
            logs["loss"] = loss

    def _mean(self) -> float | None:
        if not self.steps:
            return None
        total = self.total if self.total is not None else torch.zeros(())
        return _mean_over_ranks(total) / self.steps

    def take_skipped(self) -> list[int]:
        """The skipped steps since the last record, for the record being written (then forgotten)."""
        taken, self.skipped_in_window = self.skipped_in_window, []
        return taken

    def on_save(self, args, state, control, **kwargs):
        total = self.total if self.total is not None else torch.zeros(())
        window = {"step": state.global_step, "loss_sum": _mean_over_ranks(total), "steps": self.steps,
                  "skipped_steps": self.skipped_in_window}  # the mean over ranks: every rank resumes from it
        if args.should_save:  # into the staging folder, before AtomicCheckpoints renames it
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            tmp = folder / f".{WINDOW_NAME}.tmp"
            tmp.write_text(json.dumps(window) + "\n")
            os.replace(tmp, folder / WINDOW_NAME)


class LoggedLossTrainer(Trainer):
    """transformers.Trainer whose training_step hands each micro-batch's loss to a LossWindow (`loss_window`)
    as well; everything else is the Trainer's."""

    loss_window: LossWindow | None = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.loss_window is not None:
            self.loss_window.add(loss)
        return loss


class RunRecorder(TrainerCallback):
    """Writes metrics.jsonl (one record per logged step) and eval.jsonl; evaluates every eval_steps."""

    def __init__(self, out_dir: Path, evaluate: Callable[[], dict], eval_steps: int = 0,
                 tensorboard: bool = True, progress: bool = True, window: LossWindow | None = None):
        self.out_dir = Path(out_dir)
        self.window = window  # the skipped steps a record lists come from it
        self.evaluate = evaluate  # () -> {'loss', 'perplexity', 'tokens'}, dense
        self.eval_steps = eval_steps
        self.tensorboard = tensorboard
        self.progress = progress
        self.writer = None
        self.bar = None
        self.main = True
        self.elapsed_offset = self.train_offset = 0.0
        self.excluded = 0.0  # seconds of evaluation and checkpoint writing in this session
        self.t0 = self.mark = 0.0
        self.last = None  # (tokens, train_seconds) at the previous record
        # Only what the summary needs is kept in memory (16 bytes per logged step); the records are on disk.
        self.last_record: dict | None = None
        self._losses = array("d")  # finite logged training losses
        self._rates = array("d")  # logged tokens/s
        self.evals: list[dict] = []
        self.report = None  # trainer.log, when the run reports to trackers (report_to)

    # -- clocks ----------------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return self.elapsed_offset + time.perf_counter() - self.t0

    def train_seconds(self) -> float:
        return self.train_offset + time.perf_counter() - self.t0 - self.excluded

    # -- events ----------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        self.main = state.is_world_process_zero
        step = state.global_step
        # On resume, drop what an interrupted session logged after its last checkpoint.
        records = [r for r in read_jsonl_records(self.out_dir / METRICS_NAME) if r["step"] <= step]
        self.evals = [r for r in read_jsonl_records(self.out_dir / EVAL_NAME) if r["step"] <= step]
        self.last_record, self._losses, self._rates = None, array("d"), array("d")
        for r in records:
            self._keep(r)
        if self.last_record:
            self.elapsed_offset = self.last_record["elapsed_seconds"]
            self.train_offset = self.last_record["train_seconds"]
        if self.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            _rewrite(self.out_dir / METRICS_NAME, records)
            _rewrite(self.out_dir / EVAL_NAME, self.evals)
            if self.tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:  # tensorboard is an optional extra
                    self.writer = None
                else:
                    self.writer = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=step + 1)
            if self.progress:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=state.max_steps, initial=step, desc=self.out_dir.name, unit="step",
                                dynamic_ncols=True)
        self.t0 = self.mark = time.perf_counter()
        self.last = (state.num_input_tokens_seen, self.train_offset)
        if self.eval_steps and step == 0 and not self.evals:
            # Where the curve starts (the base model), so that time- and tokens-to-quality can be read off
            # between evaluations from the first one on; not training time.
            self.run_eval(state)
            self.mark = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(1)
        step = state.global_step
        if self.eval_steps and step % self.eval_steps == 0 and step < state.max_steps:
            self.run_eval(state)
        self.mark = time.perf_counter()

    def on_save(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.excluded += now - self.mark
        self.mark = now

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        tokens, seconds = state.num_input_tokens_seen, self.train_seconds()
        d_tokens, d_seconds = tokens - self.last[0], seconds - self.last[1]
        self.last = (tokens, seconds)
        record = {
            "step": state.global_step,
            "loss": logs["loss"],
            "lr": logs.get("learning_rate"),
            "attn_omission_rate": logs.get("attn_omission_rate", 0.0),
            "mlp_omission_rate": logs.get("mlp_omission_rate", 0.0),
            "tokens_per_second": d_tokens / d_seconds if d_seconds > 0 else None,
            "elapsed_seconds": self.elapsed(),
            "train_seconds": seconds,
            "tokens": tokens,
            "grad_norm": logs.get("grad_norm"),
        }
        skipped = self.window.take_skipped() if self.window is not None else []
        if skipped:
            record["skipped_steps"] = skipped
        self._keep(record)
        if not self.main:
            return
        with open(self.out_dir / METRICS_NAME, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key in ("loss", "lr", "attn_omission_rate", "mlp_omission_rate", "tokens_per_second", "grad_norm"):
                if record[key] is not None:
                    self.writer.add_scalar(f"train/{key}", record[key], record["step"])
        if self.bar is not None:
            postfix = {"loss": f"{record['loss']:.3f}"}
            if record["tokens_per_second"]:
                postfix["tok/s"] = f"{record['tokens_per_second']:,.0f}"
            if record["attn_omission_rate"] or record["mlp_omission_rate"]:
                postfix["omit"] = f"{record['attn_omission_rate']:.2f}/{record['mlp_omission_rate']:.2f}"
            self.bar.set_postfix(postfix, refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    # -- evaluation ------------------------------------------------------------------------------------
    def run_eval(self, state) -> dict:
        """Evaluate now (dense), record it in eval.jsonl and TensorBoard; the time is not training time."""
        start = time.perf_counter()
        result = self.evaluate()
        self.excluded += time.perf_counter() - start
        record = {"step": state.global_step, "eval_loss": result["loss"],
                  "eval_perplexity": result["perplexity"], "eval_tokens": result["tokens"],
                  "tokens": state.num_input_tokens_seen, "elapsed_seconds": self.elapsed(),
                  "train_seconds": self.train_seconds()}
        self.evals.append(record)
        if self.report is not None:
            self.report({"eval_loss": record["eval_loss"], "eval_perplexity": record["eval_perplexity"]})
        if self.main:
            with open(self.out_dir / EVAL_NAME, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.writer is not None:
                self.writer.add_scalar("eval/loss", record["eval_loss"], record["step"])
                self.writer.add_scalar("eval/perplexity", record["eval_perplexity"], record["step"])
            if self.bar is not None:
                self.bar.write(f"step {record['step']}: eval loss {record['eval_loss']:.4f}")
        return record

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    # -- summary ---------------------------------------------------------------------------------------
    def _keep(self, record: dict) -> None:
        self.last_record = record
        if record.get("loss") is not None and math.isfinite(record["loss"]):
            self._losses.append(record["loss"])
        if record.get("tokens_per_second"):
            self._rates.append(record["tokens_per_second"])

    def median_tokens_per_second(self) -> float | None:
        """Median over the logged intervals: robust to a stretch slowed by another process on the machine."""
        rates = sorted(self._rates)
        if not rates:
            return None
        mid = len(rates) // 2
        return rates[mid] if len(rates) % 2 else (rates[mid - 1] + rates[mid]) / 2

    def train_loss(self) -> float | None:
        """Mean logged training loss over the last 10% of the logged steps (a less noisy "final" loss)."""
        losses = self._losses
        if not losses:
            return None
        tail = losses[-max(1, len(losses) // 10):]
        return sum(tail) / len(tail)
