"""RunRecorder: the run directory's metrics, periodic dense evaluation, TensorBoard and the progress bar.

Times: `elapsed_seconds` is wall-clock since training began (continued across resumes); `train_seconds`
leaves out evaluation and checkpoint writing, and tokens/s is measured over it.
"""

from __future__ import annotations

import json
import math
import os
import time
from array import array
from pathlib import Path
from typing import Callable

from transformers import TrainerCallback

METRICS_NAME = "metrics.jsonl"
EVAL_NAME = "eval.jsonl"


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


class RunRecorder(TrainerCallback):
    """Writes metrics.jsonl (one record per logged step) and eval.jsonl; evaluates every eval_steps."""

    def __init__(self, out_dir: Path, evaluate: Callable[[], dict], eval_steps: int = 0,
                 tensorboard: bool = True, progress: bool = True):
        self.out_dir = Path(out_dir)
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
