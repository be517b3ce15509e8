"""`satlm train`: continual pre-training or SFT on transformers.Trainer, with SAT on or off.

A flat recipe: setup (output dir, model, data, Trainer) -> train -> save -> cleanup. The run directory:

    config.yaml      the resolved config
    metrics.jsonl    one record per logged step: step, loss, lr, attn_omission_rate, mlp_omission_rate,
                     tokens_per_second, elapsed_seconds (+ train_seconds, tokens, grad_norm)
    eval.jsonl       one record per (dense) evaluation: step, eval_loss, eval_perplexity, ...
    summary.json     steps, tokens, wall_seconds, tokens_per_second, train_loss, eval_loss, eval_perplexity
    checkpoint-N/    for resume (the Trainer's files plus sat_state.pt); written in .tmp-checkpoints/ and
                     renamed here when whole, so a run killed at any moment resumes from a whole one
    final/           a plain HF model and tokenizer (with lora: the adapter merged in; final/adapter/ the adapter)
    plots/           training.png
    tensorboard/     when tensorboard is installed
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import shutil
from pathlib import Path
from typing import Sequence

import torch

from ..distributed import barrier, is_main_process, on_main_process
from ..errors import DataError, NumericalError, RunConfigError
from ..run_config import RunConfig
from .data import build_datasets
from .evaluate import evaluate_loss
from .guard import (STAGING_DIR, AtomicCheckpoints, FaultGuard, NothingLeftToTrain, catch_stop_signals,
                    check_output_dir, checkpoint_bytes, checkpoint_step, checkpoints)
from .model_io import check_run_fits_model, check_supported, load_model, load_tokenizer, resolve_model_path
from .plots import plot_run
from .recorder import EVAL_NAME, METRICS_NAME, RunRecorder

CONFIG_NAME, SUMMARY_NAME, FINAL_DIR = "config.yaml", "summary.json", "final"
RUN_FILES = (CONFIG_NAME, METRICS_NAME, EVAL_NAME, SUMMARY_NAME, FINAL_DIR, "plots", "tensorboard", STAGING_DIR)


# -- output directory ------------------------------------------------------------------------------------
def plan_output_dir(cfg: RunConfig) -> tuple[str | None, list[Path]]:
    """(checkpoint to resume from or None, files of a previous run to remove); raises before anything changes."""
    out = Path(cfg.output_dir)
    if cfg.resume is not False:
        if isinstance(cfg.resume, str):
            if not (Path(cfg.resume) / "trainer_state.json").is_file():
                raise RunConfigError(f"resume={cfg.resume!r} is not a checkpoint folder (no trainer_state.json)")
            if Path(cfg.resume).resolve().parent == (out / STAGING_DIR).resolve():
                raise RunConfigError(f"resume={cfg.resume!r} is a checkpoint that was never finished; resume "
                                     f"from a checkpoint-N/ folder of {out}")
            return cfg.resume, []
        found = checkpoints(out, sat=cfg.sat.enabled)
        if not found:
            raise RunConfigError(f"resume=true, but {out} holds no checkpoint-N/ to resume from")
        return str(found[-1]), []
    if out.exists() and not out.is_dir():
        raise RunConfigError(f"output_dir {out} is a file")
    previous = [out / name for name in RUN_FILES if (out / name).exists()]
    previous += [p for p in (out.iterdir() if out.is_dir() else []) if checkpoint_step(p.name) is not None]
    if previous and not cfg.overwrite:
        raise RunConfigError(f"output_dir {out} already holds a run; set resume=true to continue it "
                             "or overwrite=true to replace it")
    return None, previous


def prepare_output_dir(cfg: RunConfig, stale: list[Path], need_bytes: int = 0) -> Path:
    """Remove a previous run's files (only what a run writes, never the rest of the folder), create the dir
    and check that it takes files and has room for a checkpoint of `need_bytes`."""
    out = Path(cfg.output_dir)
    for p in stale:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunConfigError(f"cannot create output_dir {out}: {e.strerror or e}") from None
    check_output_dir(out, need_bytes)
    return out


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
    else:
        mode = "dense"
    if cfg.lora.enabled:
        mode += f", LoRA r={cfg.lora.r}"
    return (f"{cfg.task} {mode}: {cfg.max_steps} steps x {cfg.batch_size * cfg.grad_accum} x {cfg.seq_len} "
            f"tokens, model {cfg.model} -> {cfg.output_dir}")


# -- the recipe ------------------------------------------------------------------------------------------
def run_train(cfg: RunConfig, callbacks: Sequence = (), quiet: bool = False) -> dict:
    """Train as `cfg` says and write the run directory; return the summary (also in summary.json)."""
    from transformers import PrinterCallback, ProgressCallback, Trainer, set_seed

    from ..integrations.hf_trainer import SATCallback
    from ..modeling.patch import apply_sat, remove_sat

    # setup: everything that can be wrong with the config, the model or the data fails before the run starts
    precision = _precision(cfg)
    args = training_arguments(cfg, precision)  # under torchrun / accelerate this joins the process group
    # Rank 0 alone reads and changes the output dir; every rank gets its answer (or its error), so a rank
    # that starts late never sees rank 0's new files as "a previous run", nor deletes them twice.
    resume_from, stale = on_main_process(plan_output_dir, cfg)
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
    out = on_main_process(prepare_output_dir, cfg, stale, checkpoint_bytes(model, cfg.optim))
    if is_main_process():
        (out / CONFIG_NAME).write_text(cfg.to_yaml(header="satlm train " + str(out / CONFIG_NAME)))

    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    eval_bs = cfg.eval_batch_size or cfg.batch_size

    def evaluate():
        return evaluate_loss(model, data.eval, data.eval_collator, eval_bs, autocast_dtype=amp)

    recorder = RunRecorder(out, evaluate, cfg.eval_steps, tensorboard=cfg.tensorboard, progress=cfg.progress)
    sat_callbacks = [SATCallback(resume_from_checkpoint=resume_from)] if cfg.sat.enabled else []
    guard = FaultGuard(out, cfg.max_skipped_steps)
    # Last, so that every other on_save (sat_state.pt) is in the folder before it is renamed; it rotates
    # checkpoints after the rename, so the Trainer must not rotate them before.
    saver = AtomicCheckpoints(out, keep=args.save_total_limit)
    args.save_total_limit = None
    trainer = Trainer(model=model, args=args, train_dataset=data.train, data_collator=data.collator,
                      processing_class=tokenizer, callbacks=[*sat_callbacks, recorder, *callbacks, guard, saver])
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
        last = recorder.last_record
        summary = {
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
        if completed:
            model.config.use_cache = use_cache
            if cfg.lora.enabled:
                save_lora_final(trainer, model, tokenizer, out / FINAL_DIR)
            else:
                trainer.save_model(str(out / FINAL_DIR))  # SAT layers save under the plain architecture's names
        if trainer.is_world_process_zero():
            (out / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
            plot_run(out)
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


def _train(trainer, resume_from: str | None, guard: FaultGuard, saver: AtomicCheckpoints) -> None:
    """trainer.train() under the guards: SIGINT / SIGTERM stop it with a checkpoint (the same signal again at
    once), and a save that fails (disk full, ...) is a CheckpointError that names what is left."""
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
    print(f"done: {s['steps']} steps, {s['tokens']:,} tokens in {s['wall_seconds']:.1f}s ({tps}), "
          f"train loss {s['train_loss']:.4f}{ev} -> {out}")


def main(argv: list[str] | None = None) -> dict:
    """`satlm train CONFIG.yaml [key=value ...] [--resume]`."""
    from ..run_config import parse_run_args

    cfg = parse_run_args("train", argv, config_required=True)
    if cfg is None:
        return {}
    if cfg.budget == "time" and is_main_process():
        print("satlm train: budget=time applies to `satlm compare` only (its SAT side gets the dense side's "
              f"training time); this run trains max_steps={cfg.max_steps} steps")
    return run_train(cfg)
