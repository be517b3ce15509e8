"""`satlm train`: continual pre-training or SFT on transformers.Trainer, with SAT on or off.

A flat recipe: setup (output dir, model, data, Trainer) -> train -> save -> cleanup. The run directory:

    .satlm-run.json  the marker: the run's id and kind, and every name the run writes (rundir.RunDir); written
                     first, so that overwrite removes only what this run wrote
    .satlm-run.lock  flock-ed by the process that runs here (one at a time); holds its PID
    config.yaml      the resolved config
    metrics.jsonl    one record per logged step: step, loss, lr, attn_omission_rate, mlp_omission_rate,
                     tokens_per_second, elapsed_seconds (+ train_seconds, tokens, grad_norm; skipped_steps
                     when steps of its window were skipped); the loss is recorder.LossWindow's
    eval.jsonl       one record per (dense) evaluation: step, eval_loss, eval_perplexity, ...
    summary.json     steps, tokens, wall_seconds, tokens_per_second, train_loss, eval_loss, eval_perplexity
    checkpoint-N/    for resume (the Trainer's files plus sat_state.pt, the open logging window, the guard's
                     recent losses, satlm_good.json once the step after it trained well); written in
                     .tmp-checkpoints/ and renamed here when whole, so a run killed at any moment resumes
                     from a whole one
    final/           a plain HF model and tokenizer (with lora: the adapter merged in; final/adapter/ the
                     adapter); written in .tmp-final/ and renamed here when whole
    plots/           training.png
    tensorboard/     when tensorboard is installed
    .previous/       with overwrite: the run this one replaces, until this one saved a checkpoint or finished
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
from pathlib import Path
from typing import Sequence

import torch

from ..distributed import barrier, is_main_process, on_main_process
from ..errors import CheckpointError, DataError, NumericalError, RunConfigError
from .run_config import RunConfig
from ..data import build_datasets
from .evaluate import evaluate_loss
from .guard import (STAGING_DIR, AtomicCheckpoints, FaultGuard, NothingLeftToTrain, catch_stop_signals,
                    check_checkpoint_loads, checkpoints, disk_full, no_space, remove_path, replace_dir, resume_hint)
from .guard import checkpoint_step  # noqa: F401  (for callers)
from .rundir import RunDir, checkpoint_bytes, model_bytes
from .rundir import check_output_dir, claim_output_dir  # noqa: F401  (for compare and callers)
from .model_io import check_run_fits_model, check_supported, load_model, load_tokenizer, resolve_model_path
from .plots import plot_run
from .recorder import EVAL_NAME, METRICS_NAME, LoggedLossTrainer, LossWindow, RunRecorder

CONFIG_NAME, SUMMARY_NAME, FINAL_DIR = "config.yaml", "summary.json", "final"
FINAL_STAGING, OLD_FINAL = ".tmp-final", ".old-final"  # final/ is written in the first; an old one leaves via the 2nd
RUN_FILES = (CONFIG_NAME, METRICS_NAME, EVAL_NAME, SUMMARY_NAME, FINAL_DIR, "plots", "tensorboard", STAGING_DIR)
# Every name a run writes in its folder besides checkpoint-N/ (listed in the marker; what overwrite may move)
RUN_WRITES = RUN_FILES + (FINAL_STAGING, OLD_FINAL, f".{METRICS_NAME}.tmp", f".{EVAL_NAME}.tmp")


# -- output directory ------------------------------------------------------------------------------------
def _resume_checkpoint(cfg: RunConfig, out: Path) -> Path | None:
    """The checkpoint `resume` names (None: resume=false), or a RunConfigError saying why there is none."""
    if cfg.resume is False:
        return None
    if isinstance(cfg.resume, str):
        path = Path(cfg.resume).expanduser()
        if not (path / "trainer_state.json").is_file():
            raise RunConfigError(f"resume={cfg.resume!r} is not a checkpoint folder (no trainer_state.json)")
        if path.resolve().parent == (out / STAGING_DIR).resolve():
            raise RunConfigError(f"resume={cfg.resume!r} is a checkpoint that was never finished; resume "
                                 f"from a checkpoint-N/ folder of {out}")
        return path
    found = checkpoints(out, sat=cfg.sat.enabled)
    if not found:
        raise RunConfigError(f"resume=true, but {out} holds no checkpoint-N/ to resume from")
    return found[-1]


def _refuse_linked_final(out: Path) -> None:
    final = out / FINAL_DIR
    if final.is_symlink():
        raise RunConfigError(f"{final} is a symbolic link (to {os.readlink(final)}); a run writes final/ as a "
                             "folder of its own: remove the link (or move it out of the run), or choose another "
                             "output_dir")


def plan_output_dir(cfg: RunConfig, run_dir: RunDir) -> str | None:
    """The checkpoint to resume from, or None; raises before anything changes: the folder must be satlm's
    (rundir.RunDir.plan), the checkpoint whole and loadable."""
    checkpoint = _resume_checkpoint(cfg, run_dir.path)
    run_dir.plan(overwrite=cfg.overwrite, resume=checkpoint is not None)
    if checkpoint is None:
        return None
    _refuse_linked_final(run_dir.path)
    check_checkpoint_loads(checkpoint)
    return str(checkpoint)


def _space_needed(cfg: RunConfig, model) -> dict:
    """What the disk must have room for before the run starts: one checkpoint, or with save_steps=0 (no
    checkpoints) the final model alone."""
    if cfg.save_steps:
        return {"need_bytes": checkpoint_bytes(model, cfg.optim), "what": "one checkpoint",
                "contents": "weights and optimizer state"}
    return {"need_bytes": model_bytes(model), "what": "the final model",
            "contents": "its weights; save_steps=0 writes no checkpoint"}


# -- setup -----------------------------------------------------------------------------------------------
def _precision(cfg: RunConfig) -> str:
    if cfg.precision != "auto":
        return cfg.precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def check_trainer_args(cfg: RunConfig) -> None:
    """Every trainer_args key must be a transformers.TrainingArguments field."""
    from transformers import TrainingArguments

    from ..config import closest_key

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    for key in cfg.trainer_args:
        if key not in names:
            raise RunConfigError(f"trainer_args.{key} is not a transformers.TrainingArguments field"
                                 f"{closest_key(key, names)}")


def training_arguments(cfg: RunConfig, precision: str):
    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    warmup = cfg.warmup if cfg.warmup >= 1 else round(cfg.warmup * cfg.max_steps)
    kwargs = dict(
        output_dir=str(Path(cfg.output_dir) / STAGING_DIR),  # checkpoints are staged; see guard.AtomicCheckpoints
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size or cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=int(warmup),
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim=cfg.optim,
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_strategy="steps",
        logging_steps=cfg.logging_steps,
        eval_strategy="no",  # the RunRecorder evaluates (token-weighted, dense)
        save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500,
        save_total_limit=cfg.save_total_limit,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        dataloader_drop_last=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        include_num_input_tokens_seen="all" if cfg.task == "cpt" else "non_padding",
        report_to=cfg.report_to,  # besides, the RunRecorder writes TensorBoard itself, with the SAT rates
        disable_tqdm=False,
    )
    if cfg.task == "sft" and cfg.data.group_by_length and not cfg.data.packing:
        if "train_sampling_strategy" in names:
            kwargs["train_sampling_strategy"] = "group_by_length"
        else:  # transformers < 5
            kwargs["group_by_length"] = True
    ckpt_key = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    kwargs[ckpt_key] = cfg.gradient_checkpointing
    check_trainer_args(cfg)
    if "output_dir" in cfg.trainer_args:
        raise RunConfigError("trainer_args.output_dir: set the run directory with output_dir")
    kwargs.update(cfg.trainer_args)
    try:
        return TrainingArguments(**kwargs)
    except (ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunConfigError(f"invalid training arguments: {first}") from None


def describe(cfg: RunConfig) -> str:
    sat = cfg.sat
    if sat.enabled:
        mode = (f"SAT {sat.source}/{sat.schedule}, omission attn {sat.max_attn_rate:g} mlp {sat.max_mlp_rate:g}")
        if sat.vocab_omission_rate:
            mode += f" vocab rows {sat.vocab_omission_rate:g}" + (" (input gradient too)" if
                                                                 sat.vocab_omission_input_grad else "")
    else:
        mode = "dense"
    if cfg.lora.enabled:
        mode += f", LoRA r={cfg.lora.r}"
    return (f"{cfg.task} {mode}: {cfg.max_steps} steps x {cfg.batch_size * cfg.grad_accum} x {cfg.seq_len} "
            f"tokens, model {cfg.model} -> {cfg.output_dir}")


# -- the recipe ------------------------------------------------------------------------------------------
def run_train(cfg: RunConfig, callbacks: Sequence = (), quiet: bool = False) -> dict:
    """Train as `cfg` says and write the run directory; return the summary (also in summary.json).

    The output folder is checked first (its owner, a lock, the checkpoint to resume from) and changed last,
    after every other pre-flight check passed (see rundir.RunDir); it stays locked until this returns."""
    if cfg.output_dir.startswith("~"):
        cfg.output_dir = os.path.expanduser(cfg.output_dir)  # as TrainingArguments does for the checkpoints
    run_dir = RunDir(cfg.output_dir, "train", RUN_WRITES)
    try:
        return _run(cfg, run_dir, callbacks, quiet)
    finally:
        run_dir.release()


def _run(cfg: RunConfig, run_dir: RunDir, callbacks: Sequence, quiet: bool) -> dict:
    from transformers import PrinterCallback, ProgressCallback, set_seed

    from ..integrations.hf_trainer import SATCallback
    from ..modeling.patch import apply_sat, remove_sat

    # setup: everything that can be wrong with the config, the model or the data fails before the run starts
    precision = _precision(cfg)
    args = training_arguments(cfg, precision)  # under torchrun / accelerate this joins the process group
    # Rank 0 alone reads and changes the output dir; every rank gets its answer (or its error), so a rank
    # that starts late never sees rank 0's new files as "a previous run", nor deletes them twice.
    resume_from = on_main_process(plan_output_dir, cfg, run_dir)
    if not quiet and is_main_process():
        print(f"satlm train: {describe(cfg)}" + (f" (resuming from {resume_from})" if resume_from else ""))
    set_seed(cfg.seed)
    model_path = resolve_model_path(cfg.model)
    check_run_fits_model(cfg, model_path)  # seq_len within the context, sat.layers among the model's layers
    if cfg.sat.enabled:
        check_supported(model_path)
    tokenizer = load_tokenizer(model_path)
    data = build_datasets(cfg, tokenizer)
    if not quiet and is_main_process() and "tokenized_cache" in data.info:
        print(f"satlm train: tokenized data {data.info['tokenized_cache']} ({data.info['tokenized_cache_dir']})")
    world = max(1, args.world_size)
    if len(data.train) < cfg.batch_size * world:
        raise DataError(f"{data.info['train_path']}: {len(data.train)} training sequences, fewer than one batch "
                        f"({cfg.batch_size} x {world} device(s)); add data or lower batch_size / seq_len")
    if cfg.epochs is not None:  # the steps of that many passes over the data (drop_last batches)
        batches = len(data.train) // (cfg.batch_size * world)
        cfg.max_steps = args.max_steps = max(1, math.ceil(cfg.epochs * batches / cfg.grad_accum))
        args.warmup_steps = int(cfg.warmup if cfg.warmup >= 1 else round(cfg.warmup * cfg.max_steps))
    model = load_model(model_path, torch.float32, cfg.attn_implementation)
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False  # no KV cache in training
    if cfg.lora.enabled:
        from peft import get_peft_model

        model = get_peft_model(model, cfg.lora.peft_config())  # the base weights frozen, the adapter trained
    if cfg.sat.enabled:
        apply_sat(model, cfg.sat.to_sat_config())
    # Only now, every check passed: the folder made, checked for room, the previous run moved aside, marked.
    out = on_main_process(run_dir.prepare, **_space_needed(cfg, model))
    if is_main_process():
        (out / CONFIG_NAME).write_text(cfg.to_yaml(header="satlm train " + str(out / CONFIG_NAME)))

    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    eval_bs = cfg.eval_batch_size or cfg.batch_size

    def evaluate():
        return evaluate_loss(model, data.eval, data.eval_collator, eval_bs, autocast_dtype=amp)

    sat_callbacks = [SATCallback(resume_from_checkpoint=resume_from)] if cfg.sat.enabled else []
    guard = FaultGuard(out, cfg.max_skipped_steps, resume_from=resume_from)
    window = LossWindow(guard.skipped, resume_from=resume_from)
    recorder = RunRecorder(out, evaluate, cfg.eval_steps, tensorboard=cfg.tensorboard, progress=cfg.progress,
                           window=window)
    # Last, so that every other on_save (sat_state.pt) is in the folder before it is renamed; it rotates
    # checkpoints after the rename, so the Trainer must not rotate them before.
    saver = AtomicCheckpoints(out, keep=args.save_total_limit, run_dir=run_dir)
    args.save_total_limit = None
    trainer = LoggedLossTrainer(model=model, args=args, train_dataset=data.train, data_collator=data.collator,
                                processing_class=tokenizer,
                                callbacks=[*sat_callbacks, recorder, *callbacks, guard, saver])
    trainer.loss_window = window
    trainer.callback_handler.callbacks.insert(0, window)  # first: every other on_log sees its loss
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    if cfg.report_to not in ("none", [], ["none"], None):
        recorder.report = trainer.log  # evaluations reach the trackers the Trainer reports to

    # train
    try:
        _train(trainer, resume_from, guard, saver)
        state = trainer.state
        completed = state.global_step >= state.max_steps and not guard.stop_signal
        final = recorder.run_eval(state) if completed else (recorder.evals[-1] if recorder.evals else {})

        # save
        summary = _summary(cfg, state, recorder, guard, final, completed, model_path, precision, data)
        if completed:
            model.config.use_cache = use_cache
            try:
                save_final(trainer, model, tokenizer, cfg, out)
            except CheckpointError:
                summary["completed"] = False  # no final/: a resume evaluates and saves it again
                _write_summary(trainer, out, summary)
                raise
        _write_summary(trainer, out, summary)
        if completed and trainer.is_world_process_zero():
            run_dir.finished()
    finally:
        # cleanup
        guard.close()
        recorder.close()
        if cfg.sat.enabled and getattr(model, "sat_runtime", None) is not None:
            remove_sat(model)
        del trainer
        gc.collect()
    if guard.stop_signal:
        raise guard.interrupted(summary["steps"])
    if not quiet and is_main_process():
        _print_summary(summary, out)
    return summary


def _summary(cfg, state, recorder, guard, final: dict, completed: bool, model_path: str, precision: str,
             data) -> dict:
    """summary.json. train_loss and the tokens/s are None when nothing was logged (a run stopped before its
    first record)."""
    last = recorder.last_record
    return {
        "steps": state.global_step,
        "tokens": state.num_input_tokens_seen,
        "wall_seconds": last["elapsed_seconds"] if last else 0.0,
        "tokens_per_second": (state.num_input_tokens_seen / last["train_seconds"]
                              if last and last["train_seconds"] > 0 else None),
        "tokens_per_second_median": recorder.median_tokens_per_second(),
        "train_loss": recorder.train_loss(),
        "eval_loss": final.get("eval_loss"),
        "eval_perplexity": final.get("eval_perplexity"),
        "train_seconds": last["train_seconds"] if last else 0.0,
        "eval_tokens": final.get("eval_tokens"),
        "completed": completed,
        "skipped_steps": guard.skipped,
        "task": cfg.task,
        "model": model_path,
        "sat_enabled": cfg.sat.enabled,
        "precision": precision,
        # where the tokens came from (built / read from the cache) differs between a run and its resume
        "data": {k: v for k, v in data.info.items() if not k.startswith("tokenized_cache")},
    }


def _write_summary(trainer, out: Path, summary: dict) -> None:
    if trainer.is_world_process_zero():
        (out / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
        plot_run(out)


def _clear_final_staging(out: Path) -> None:
    """Before final/ is written: a linked final/ is refused (the rename would not replace it, writing through
    it would write elsewhere); what a killed write left in .tmp-final/ is removed."""
    _refuse_linked_final(out)
    staging = out / FINAL_STAGING
    if staging.exists() or staging.is_symlink():
        remove_path(staging)


def save_final(trainer, model, tokenizer, cfg: RunConfig, out: Path) -> None:
    """final/, whole or not at all: written into .tmp-final/, synced, then renamed to final/ (an older final/
    replaced). A full disk is a CheckpointError that says how much room it needs; nothing of it is kept."""
    final, staging = out / FINAL_DIR, out / FINAL_STAGING
    on_main_process(_clear_final_staging, out)
    try:
        if cfg.lora.enabled:
            save_lora_final(trainer, model, tokenizer, staging)
        else:
            trainer.save_model(str(staging))  # SAT layers save under the plain architecture's names
        barrier()
    except Exception as e:
        if trainer.is_world_process_zero() and (staging.exists() or staging.is_symlink()):
            remove_path(staging)  # it may be what filled the disk
        if not disk_full(e):
            raise
        newest = checkpoints(out)
        then = (f"free some space, then {resume_hint(out)} (it evaluates and saves final/ again)" if newest
                else "free some space and train again (no checkpoint to resume from: save_steps=0)")
        raise CheckpointError(f"writing {final} failed: {no_space(out, model_bytes(model))}; nothing of it was "
                              f"kept; {then}") from e
    if trainer.is_world_process_zero():
        replace_dir(staging, final, out / OLD_FINAL)


def save_lora_final(trainer, model, tokenizer, final: Path) -> None:
    """final/adapter/: the adapter in peft's format; final/: the base model with the adapter merged in, a plain
    model of its architecture that plain transformers loads (and `satlm eval` evaluates)."""
    from ..modeling.patch import remove_sat

    trainer.save_model(str(final / "adapter"))  # a PeftModel saves its adapter
    if getattr(model, "sat_runtime", None) is not None:
        remove_sat(model)  # training is over; peft's merge walks the plain module tree
    if trainer.is_world_process_zero():
        merged = model.merge_and_unload()
        merged.save_pretrained(str(final))
        tokenizer.save_pretrained(str(final))


def _load_error(error: BaseException) -> bool:
    """An exception of the kind a checkpoint that does not load raises (a refused or torn pickle, a torn
    safetensors or JSON file, weights that do not fit the model)."""
    import pickle
    import zipfile

    kinds = (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, json.JSONDecodeError)
    return isinstance(error, kinds) or type(error).__name__ == "SafetensorError" or (
        isinstance(error, RuntimeError) and "load" in str(error).lower())


def _train(trainer, resume_from: str | None, guard: FaultGuard, saver: AtomicCheckpoints) -> None:
    """trainer.train() under the guards: SIGINT / SIGTERM stop it with a checkpoint (the same signal again at
    once), a save that fails (disk full, ...) is a CheckpointError that names what is left, and so is a
    checkpoint that fails to load before the first step (check_checkpoint_loads catches most of those
    before anything starts)."""
    try:
        with catch_stop_signals(guard):
            trainer.train(resume_from_checkpoint=resume_from)
    except NothingLeftToTrain:  # resumed from checkpoint-<max_steps>: the caller evaluates and saves final/
        pass
    except KeyboardInterrupt:
        if not guard.received:
            raise
        raise guard.stopped_at_once(trainer.state.global_step) from None
    except NumericalError:
        raise
    except Exception as e:
        if resume_from and not guard.trained and _load_error(e):
            first = " ".join(str(e).split())[:300] or type(e).__name__
            raise CheckpointError(f"cannot resume from {resume_from}: {type(e).__name__}: {first}") from None
        partial = saver.partial() if trainer.args.should_save else None
        if partial is None:
            raise
        raise saver.failed(partial, e) from e
    barrier()  # every rank is done with the staging folder
    if trainer.args.should_save:
        saver.tidy()


def _print_summary(s: dict, out: Path) -> None:
    tps = f"{s['tokens_per_second']:,.0f} tokens/s" if s["tokens_per_second"] else "n/a tokens/s"
    ev = f", eval loss {s['eval_loss']:.4f} (ppl {s['eval_perplexity']:.2f})" if s["eval_loss"] is not None else ""
    train = f"{s['train_loss']:.4f}" if s["train_loss"] is not None else "n/a (no step logged)"
    print(f"done: {s['steps']} steps, {s['tokens']:,} tokens in {s['wall_seconds']:.1f}s ({tps}), "
          f"train loss {train}{ev} -> {out}")


def main(argv: list[str] | None = None) -> dict:
    """`satlm train CONFIG.yaml [key=value ...] [--resume]`."""
    from .run_config import parse_run_args

    cfg = parse_run_args("train", argv, config_required=True)
    if cfg is None:
        return {}
    if cfg.budget == "time" and is_main_process():
        print("satlm train: budget=time applies to `satlm compare` only (its SAT side gets the dense side's "
              f"training time); this run trains max_steps={cfg.max_steps} steps")
    return run_train(cfg)
