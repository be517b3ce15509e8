"""`satlm compare`'s speed measurement: dense and SAT training steps interleaved in one process.

Two runs in separate processes cannot be timed against each other on a shared machine: their tokens/s scatter by
15% or more with whatever else runs. Here a dense copy and a SAT copy of the model take alternating training steps
(the Trainer's own training_step, gradient clipping and optimizer step) on the same batches of the run (its first
batches, in the run's order), so that both sides see the same machine at the same time. The order alternates
within pairs (dense first, then SAT first), cancelling a drift across a pair.

The run *as scheduled*: every distinct omission level of the SAT schedule (each ladder rung; a few evenly spaced
levels of a linear schedule, interpolated between) is timed with at least `pairs` pairs after two warm-up pairs,
with the SAT copy set to a step of the schedule at that level (so per-layer rates and every other setting apply
as in the run). Dense stretches of the schedule (its dense start and tail) count as 1.0x. With ratio(f) the
median of the pairs' dense / SAT step-time ratios at level f, the schedule's T steps take

    dense_equivalent(T) = sum over steps t < T of 1 / ratio(f_t)

dense steps' time, and `speedup_interleaved` = T / dense_equivalent(T). Its spread, `speedup_interleaved_iqr`,
comes from the pairs: the i-th pair of every level gives one estimate of the whole schedule's speedup, and the
quartiles of those estimates are reported. The same ratios give the SAT run's time axis (curves,
time_to_quality) and `budget: time`'s step count, so neither depends on what else the machine ran.

On the CPU the phase runs in a child process started with glibc's allocator settings of `satlm bench`
(ALLOCATOR_ENV), which glibc reads only at process start. With the default settings the two resident models'
steps return and fault in each other's large blocks: on SmolLM2-135M (2-core EPYC without AVX-512, 2026-12-06)
the dense copy took 9.0-9.7 s a step in the phase against 7.6 s in a dense training run, and the phase's ratio
came out at or above the FLOP ceiling (1.235x against 1.227x); in the child the dense copy took 7.0-7.4 s and the
ratio (1.16x) agreed with whole training processes alternated (benchmarks/process_ab.py: 1.16x, range
1.01-1.21). BENCHMARKS.md, "The interleaved ratio and the allocator". SATLM_INTERLEAVED_INPROCESS=1 measures in
the compare process as before.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .run_config import RunConfig

INTERLEAVED_JSON = "interleaved.json"
WARMUP_PAIRS = 2  # untimed pairs (dense first, then SAT first) before the first level's timed pairs
MOST_LEVELS = 6  # a schedule with more distinct levels (linear) is timed at this many, interpolated between
# glibc's allocator returns big blocks to the OS and faults them in again, which inflates the dense step when two
# models step in turn (module doc); glibc reads these only at process start. 32 MiB is glibc's largest mmap
# threshold, and blocks of that size or more (the logits of B=4 x T=256 x vocab 8192 in fp32 are exactly 32 MiB)
# were still mapped afresh on every dense step: MALLOC_MMAP_MAX_=0 serves every block from the heap.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "17179869184",
                 "MALLOC_MMAP_MAX_": "0"}
INPROCESS_ENV = "SATLM_INTERLEAVED_INPROCESS"


# -- the schedule's levels and the time model ---------------------------------------------------------------
def lr_profile(cfg: RunConfig, steps: int) -> list[float]:
    """The learning rate of each step of a `steps`-step run of cfg, from the LR schedule the Trainer builds."""
    from transformers import get_scheduler

    from ..integrations.hf_trainer import lr_profile_of

    param = torch.nn.Parameter(torch.zeros(1))
    warmup = cfg.warmup if cfg.warmup >= 1 else round(cfg.warmup * steps)
    scheduler = get_scheduler(cfg.lr_scheduler, torch.optim.SGD([param], lr=cfg.lr), num_warmup_steps=int(warmup),
                              num_training_steps=steps)
    return lr_profile_of(scheduler, steps) or [cfg.lr] * steps


def schedule_fractions(cfg: RunConfig, steps: int) -> list[float]:
    """The SAT schedule's level at each step 0..steps-1, as a fraction of the maximum rates (0: dense)."""
    from ..schedules import needs_lr_profile, schedule_fraction

    sat = cfg.sat.to_sat_config()
    lrs = lr_profile(cfg, steps) if needs_lr_profile(sat) else None
    return [schedule_fraction(sat, t, steps, lrs) for t in range(steps)]


def probe_steps(fractions: list[float], most: int = MOST_LEVELS) -> dict[float, int]:
    """{level: a step at that level} for the levels to time: every distinct non-zero level (a ladder has a few),
    or `most` of them spread evenly over the range of a schedule with many (linear)."""
    first: dict[float, int] = {}
    for t, f in enumerate(fractions):
        if f > 0:
            first.setdefault(round(f, 9), t)
    if len(first) <= most:
        return {f: first[f] for f in sorted(first, reverse=True)}
    levels = sorted(first, reverse=True)
    picks = [levels[round(i * (len(levels) - 1) / (most - 1))] for i in range(most)]
    return {f: first[f] for f in picks}


def interpolate(ratios: dict[float, float], f: float) -> float:
    """The dense / SAT step-time ratio at level f: linear between the timed levels, 1 at f = 0, the nearest timed
    level's beyond them."""
    if f <= 0:
        return 1.0
    points = sorted({0.0: 1.0, **ratios}.items())
    for (f0, r0), (f1, r1) in zip(points, points[1:]):
        if f0 <= f <= f1:
            return r0 + (r1 - r0) * (f - f0) / (f1 - f0) if f1 > f0 else r1
    return points[-1][1]


def dense_equivalents(fractions: list[float], ratios: dict[float, float]) -> list[float]:
    """Cumulative time after each step of a schedule, in dense steps: element t is the time of steps 0..t."""
    out, total = [], 0.0
    for f in fractions:
        total += 1.0 / interpolate(ratios, f)
        out.append(total)
    return out


def schedule_speedup(fractions: list[float], ratios: dict[float, float]) -> float:
    """Dense step time over the schedule's mean SAT step time."""
    if not fractions:
        return 1.0
    return len(fractions) / dense_equivalents(fractions, ratios)[-1]


def steps_for_time(dense_steps: int, fractions_at, ratios: dict[float, float]) -> int:
    """`budget: time`: the number of SAT steps whose time (its schedule laid over them) is dense_steps dense steps.
    fractions_at(n) lists the levels of an n-step schedule; a fixed-point iteration (a ladder's mix of levels does
    not depend on n, so it settles in a round or two)."""
    steps = dense_steps
    for _ in range(30):
        new = max(1, round(dense_steps * schedule_speedup(fractions_at(steps), ratios)))
        if new == steps:
            break
        steps = new
    return steps


# -- the A/B phase -----------------------------------------------------------------------------------------
CPU_LOCK_ENV = "SATLM_CPU_LOCK"


@contextlib.contextmanager
def quiet_machine():
    """While the steps are timed, an exclusive flock on the file $SATLM_CPU_LOCK names (when set): other heavy jobs
    wrapped in `flock $SATLM_CPU_LOCK ...` wait, so that nothing else runs during the timing (a sweep's training
    runs and a test suite may share the machine; only the timing needs it alone)."""
    path = os.environ.get(CPU_LOCK_ENV)
    if not path:
        yield
        return
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
def _fingerprint(cfg: RunConfig, steps: int, pairs: int) -> str:
    """What the measurement depends on: the model, the data and batch shape, the SAT settings and the schedule."""
    keys = {"model": cfg.model, "task": cfg.task, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
            "seq_len": cfg.seq_len, "data": cfg.to_dict()["data"], "sat": cfg.sat.to_dict(),
            "lora": cfg.to_dict()["lora"], "precision": cfg.precision, "optim": cfg.optim,
            "attn_implementation": cfg.attn_implementation, "gradient_checkpointing": cfg.gradient_checkpointing,
            "steps": steps, "pairs": pairs, "seed": cfg.seed}
    return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _trainer(cfg: RunConfig, sat: bool, data, tokenizer, model_path: str, scratch: Path):
    """A Trainer over a fresh copy of the model as `satlm train` builds it, with its optimizer created."""
    from transformers import Trainer

    from ..modeling.patch import apply_sat
    from .model_io import load_model
    from .train import _precision, training_arguments

    sub = copy.deepcopy(cfg)
    sub.output_dir, sub.report_to, sub.save_steps = str(scratch), "none", 0
    args = training_arguments(sub, _precision(sub))
    model = load_model(model_path, torch.float32, cfg.attn_implementation)
    model.config.use_cache = False
    if cfg.lora.enabled:
        from peft import get_peft_model

        model = get_peft_model(model, cfg.lora.peft_config())
    if sat:
        apply_sat(model, cfg.sat.to_sat_config())
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    trainer = Trainer(model=model, args=args, train_dataset=data.train, data_collator=data.collator,
                      processing_class=tokenizer)
    trainer.create_optimizer_and_scheduler(num_training_steps=cfg.max_steps)
    trainer.current_gradient_accumulation_steps = cfg.grad_accum
    if sat:  # as SATCallback does before the first step (the LR of every step; layer_rates: auto measured)
        from ..integrations.hf_trainer import prepare_sat_training
        from ..modeling.patch import _unwrap

        prepare_sat_training(_unwrap(model), cfg.max_steps, trainer.lr_scheduler, trainer.get_train_dataloader())
    model.train()
    return trainer


def _step(trainer, micro_batches, max_grad_norm: float) -> float:
    """One optimizer step as the Trainer takes it (with SATCallback's work around it: omitted_update: skip);
    its wall time in seconds."""
    from ..modeling.omitted import OmittedUpdate
    from ..modeling.patch import _unwrap

    model, opt = trainer.model, trainer.optimizer
    runtime = getattr(_unwrap(model), "sat_runtime", None)
    skip = OmittedUpdate() if runtime is not None and runtime.config.omitted_update == "skip" else None
    t0 = time.perf_counter()
    if skip is not None:
        skip.begin_step(runtime.modules)
    for b in micro_batches:
        trainer.training_step(model, b)
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    if skip is not None:
        skip.save(runtime.modules, opt)
    opt.step()
    if skip is not None:
        skip.restore()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def _time_levels(dense, sat, levels: dict[float, int], steps: int, pairs: int, batches, max_grad_norm: float,
                 times: dict) -> None:
    """Pairs of steps at each level, the order alternating, after WARMUP_PAIRS warm-up pairs: times[level] =
    [(dense s, SAT s), ...]. (With one warm-up pair, the first timed step on SmolLM2-135M once took 2.4x its
    neighbours' time, in a dense-against-dense check; BENCHMARKS.md, "How steady the interleaved ratio is".)"""
    from ..modeling.patch import set_sat_step

    for n, (level, step) in enumerate(levels.items()):
        set_sat_step(sat.model, step, steps)
        rounds = (list(range(-WARMUP_PAIRS, 0)) if n == 0 else []) + list(range(pairs))
        for i in rounds:
            group = batches[i % len(batches)]
            order = (dense, sat) if i % 2 == 0 else (sat, dense)
            t = {id(tr): _step(tr, group, max_grad_norm) for tr in order}
            if i >= 0:  # warm-up pairs (i < 0) are not timed
                times.setdefault(level, []).append((t[id(dense)], t[id(sat)]))


def measure(cfg: RunConfig, steps: int, pairs: int = 4, quiet: bool = False) -> dict:
    """Time dense and SAT steps interleaved at every level of the schedule of a `steps`-step run (module doc)."""
    from ..data import build_datasets
    from .model_io import load_tokenizer, resolve_model_path

    sat_cfg = copy.deepcopy(cfg)
    sat_cfg.sat.enabled = True
    fractions = schedule_fractions(sat_cfg, steps)
    levels = probe_steps(fractions)
    start = time.perf_counter()
    result = {"pairs": pairs, "steps": steps, "levels": [], "speedup_interleaved": 1.0,
              "speedup_interleaved_iqr": [1.0, 1.0], "seconds": 0.0}
    if not levels:
        return result
    if not quiet:
        print(f"satlm compare: timing dense and SAT steps interleaved ({pairs} pairs at each of {len(levels)} "
              f"omission level(s) of the schedule)", flush=True)
    path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(path)
    data = build_datasets(cfg, tokenizer)
    scratch = Path(tempfile.mkdtemp(prefix="satlm-interleaved-"))
    lock = quiet_machine()  # from the models' set-up (layer_rates: auto is timed there) to the last pair
    lock.__enter__()
    try:
        dense, sat = (_trainer(sat_cfg, s, data, tokenizer, path, scratch) for s in (False, True))
        sat_model = sat.model
        loader = iter(dense.get_train_dataloader())
        batches = []
        for _ in range(pairs):
            group = []
            for _ in range(cfg.grad_accum):
                try:
                    group.append(next(loader))
                except StopIteration:
                    break
            if len(group) < cfg.grad_accum:
                break
            batches.append(group)
        if not batches:
            return result
        times: dict[float, list[tuple[float, float]]] = {}
        _time_levels(dense, sat, levels, steps, pairs, batches, cfg.max_grad_norm, times)
        from ..modeling.patch import _unwrap

        runtime = _unwrap(sat_model).sat_runtime
        sensitivity = runtime.sensitivity or {}
        factors = {str(k): v for k, v in runtime.layer_factors.items()}
    finally:
        lock.__exit__(None, None, None)
        dense = sat = sat_model = None
        gc.collect()
        shutil.rmtree(scratch, ignore_errors=True)  # satlm's own scratch folder
    ratios = {f: statistics.median(d / s for d, s in ts) for f, ts in times.items()}
    dense_step = statistics.median(d for ts in times.values() for d, _ in ts)
    # layer_rates: auto measures the layers before the first step: SAT's time too, counted in dense steps.
    setup = sensitivity.get("seconds", 0.0) / dense_step

    def speedup(r: dict[float, float]) -> float:
        return len(fractions) / (setup + dense_equivalents(fractions, r)[-1])

    replicas = [speedup({f: ts[j][0] / ts[j][1] for f, ts in times.items()})
                for j in range(min(len(ts) for ts in times.values()))]
    q1, _, q3 = statistics.quantiles(replicas, n=4, method="inclusive") if len(replicas) > 1 else replicas * 3
    sat_rates = sat_cfg.sat
    result.update({
        "speedup_interleaved": speedup(ratios),
        "speedup_interleaved_iqr": [q1, q3],
        "levels": [{"schedule_fraction": f, "step": levels[f], "attn_omission_rate": sat_rates.max_attn_rate * f,
                    "mlp_omission_rate": sat_rates.max_mlp_rate * f, "ratio": ratios[f],
                    "steps_at_level": sum(1 for x in fractions if round(x, 9) == f),
                    "dense_seconds": [d for d, _ in times[f]], "sat_seconds": [s for _, s in times[f]]}
                   for f in times],
        "dense_step_seconds": dense_step,
        "setup_dense_steps": setup,
        "layer_factors": factors,
        "seconds": time.perf_counter() - start,
    })
    return result


def allocator_settings() -> dict[str, str]:
    """This process's glibc allocator settings (ALLOCATOR_ENV's keys that are set)."""
    return {k: os.environ[k] for k in ALLOCATOR_ENV if k in os.environ}


def measure_isolated(cfg: RunConfig, steps: int, pairs: int = 4, quiet: bool = False) -> dict:
    """measure(), on the CPU in a child process with ALLOCATOR_ENV (module doc); in this process on a GPU, when
    this process has those settings already, or with SATLM_INTERLEAVED_INPROCESS=1. The result says which
    (`isolated`, `allocator`)."""
    if torch.cuda.is_available() or allocator_settings() == ALLOCATOR_ENV or os.environ.get(INPROCESS_ENV) == "1":
        return {**measure(cfg, steps, pairs, quiet), "isolated": False, "allocator": allocator_settings()}
    with tempfile.TemporaryDirectory(prefix="satlm-interleaved-") as tmp:
        spec, out = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec.write_text(json.dumps({"config": cfg.to_dict(), "steps": steps, "pairs": pairs, "quiet": quiet}))
        done = subprocess.run([sys.executable, "-m", "satlm.app.interleaved", str(spec), str(out)],
                              env={**os.environ, **ALLOCATOR_ENV})
        if done.returncode != 0 or not out.is_file():
            raise RuntimeError(f"the interleaved speed measurement failed in its child process (exit "
                               f"{done.returncode}); its messages are above; {INPROCESS_ENV}=1 measures in this "
                               "process instead")
        return {**json.loads(out.read_text()), "isolated": True}


def ratios_of(measured: dict) -> dict[float, float]:
    """{level: dense / SAT step-time ratio} of a measurement (measure's result or interleaved.json)."""
    return {float(lv["schedule_fraction"]): float(lv["ratio"]) for lv in measured.get("levels", [])}


def measured_or_cached(cfg: RunConfig, steps: int, out: Path, pairs: int, quiet: bool = False) -> dict:
    """The measurement saved in out/interleaved.json when it was made for these settings, else a new one."""
    path = Path(out) / INTERLEAVED_JSON
    key = _fingerprint(cfg, steps, pairs)
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            saved = {}
        if saved.get("fingerprint") == key:
            return saved
    result = {**measure_isolated(cfg, steps, pairs, quiet), "fingerprint": key}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _child(spec_path: str, out_path: str) -> int:
    """The child of measure_isolated: the measurement of spec.json's config, written to out_path."""
    spec = json.loads(Path(spec_path).read_text())
    cfg = RunConfig.from_dict(spec["config"])
    result = measure(cfg, spec["steps"], spec["pairs"], spec["quiet"])
    Path(out_path).write_text(json.dumps({**result, "allocator": allocator_settings()}))
    return 0


if __name__ == "__main__":  # python -m satlm.app.interleaved SPEC.json OUT.json (measure_isolated's child)
    sys.exit(_child(*sys.argv[1:3]))
