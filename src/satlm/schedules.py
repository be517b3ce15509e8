"""Omission-rate schedules: optimizer step -> (attention rate, MLP rate). Pure functions of the config.

Every schedule may start dense (`dense_start`, a fraction of the steps) and the ladder ends dense (`dense_tail`);
in between:
- constant: the maximum rate.
- linear: from the maximum rate down to 0 at the end of training.
- ladder (LORS): `rungs` stages at r, r (m-1)/m, ..., r/m. `rung_placement: steps` cuts the sparse span into
  equal numbers of steps; `rung_placement: lr` cuts it so that every rung carries an equal share of the summed
  learning rate over the span (under cosine decay, equal steps put most of the LR into the first rungs: with 4
  rungs over 90% of 120 steps they carry 38 / 36 / 20 / 6%). Step t belongs to rung floor(m c_t) with c_t the
  span's LR share before the middle of step t; the LR of each step comes from the LR schedule (lr_profile).
- steps: explicit [until_fraction, rate] stairs over the whole run.
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

from .config import SATConfig


def _progress(step: int, total_steps: int | None) -> float:
    if not total_steps or total_steps <= 0:
        return 0.0
    return min(max(step, 0) / total_steps, 1.0)


def _lr_share(step: int, start: int, end: int, lr_profile: Sequence[float]) -> float:
    """The share of sum(lr[start:end]) that comes before the middle of `step` (start <= step < end)."""
    window = [max(0.0, float(v)) for v in lr_profile[start:end]]
    total = sum(window)
    if total <= 0:
        return (step - start + 0.5) / max(1, end - start)
    return (sum(window[:step - start]) + 0.5 * window[step - start]) / total


def _ladder_stage(config: SATConfig, step: int, total_steps: int | None, lr_profile) -> int | None:
    """The ladder rung in force at step (0 = the first), None in its dense start or tail."""
    progress = _progress(step, total_steps)
    start, end = config.dense_start, 1.0 - config.dense_tail
    if progress < start or progress >= end:
        return None
    if config.rung_placement == "lr" and total_steps and lr_profile is not None:
        first = math.ceil(start * total_steps - 1e-9)
        last = math.ceil(end * total_steps - 1e-9)  # the first dense-tail step
        share = _lr_share(step, first, min(last, len(lr_profile)), lr_profile)
    else:
        share = (progress - start) / (end - start)
    return min(int(share * config.rungs), config.rungs - 1)


def schedule_fraction(config: SATConfig, step: int, total_steps: int | None,
                      lr_profile: Sequence[float] | None = None) -> float:
    """The rate at `step` of `total_steps` as a fraction of the maximum rate (1 = omission_rate).

    Without total_steps (the schedule was never told how long training is) the schedule stays at its
    first value. lr_profile: the learning rate of every step (rung_placement: lr).
    """
    progress = _progress(step, total_steps)
    if total_steps and progress < config.dense_start:
        return 0.0
    if config.schedule == "constant":
        return 1.0
    if config.schedule == "linear":
        start = config.dense_start if total_steps else 0.0
        return 1.0 - (progress - start) / (1.0 - start)
    if config.schedule == "ladder":
        stage = _ladder_stage(config, step, total_steps, lr_profile)
        return 0.0 if stage is None else (config.rungs - stage) / config.rungs
    if config.schedule == "steps":
        if config.omission_rate == 0:
            return 0.0
        for until, rate in config.steps:
            if progress < until:
                return rate / config.omission_rate
        return 0.0
    raise ValueError(f"unknown schedule {config.schedule!r}")


def needs_lr_profile(config: SATConfig) -> bool:
    """Does the schedule need the learning rate of every step (set_sat_lr_profile)?"""
    return config.schedule == "ladder" and config.rung_placement == "lr"


def stair_index(config: SATConfig, step: int, total_steps: int, lr_profile=None) -> int | None:
    """Which ladder rung or `steps` stair is in force at `step` (0 = the first); None in a dense stretch
    (the dense start, the ladder's tail, after the last stair) or for schedules without stairs."""
    if config.schedule == "ladder":
        return _ladder_stage(config, step, total_steps, lr_profile)
    progress = _progress(step, total_steps)
    if config.schedule == "steps" and progress >= config.dense_start:
        return next((i for i, (until, _) in enumerate(config.steps) if progress < until), None)
    return None


def unreached_stairs(config: SATConfig, total_steps: int, limit: int | None = None, lr_profile=None) -> list[int]:
    """Ladder rungs or `steps` stairs (0-based) that no step of 0..total_steps-1 runs: stairs shorter than one
    step; the first `limit` of them when given (rungs may be any integer, so the list may be huge). Empty for
    constant and linear schedules."""
    if config.schedule not in ("ladder", "steps") or total_steps <= 0:
        return []
    n_stairs = config.rungs if config.schedule == "ladder" else len(config.steps)
    span = 1.0 - config.dense_tail - config.dense_start
    if config.schedule == "ladder" and not needs_lr_profile(config) and total_steps * span >= 2 * n_stairs:
        return []  # consecutive steps advance at most half a rung: every rung is reached
    if total_steps > 100_000:  # stairs narrower than 1e-5 of training; not worth the loop
        return []
    reached = {stair_index(config, t, total_steps, lr_profile) for t in range(total_steps)}
    return list(itertools.islice((i for i in range(n_stairs) if i not in reached), limit))


def scheduled_rates(config: SATConfig, step: int, total_steps: int | None,
                    lr_profile: Sequence[float] | None = None) -> tuple[float, float]:
    """(attention omission rate, MLP omission rate) at this step."""
    f = schedule_fraction(config, step, total_steps, lr_profile)
    return config.max_attn_rate * f, config.max_mlp_rate * f


def mean_rate(config: SATConfig, total_steps: int, lr_profile=None) -> tuple[float, float]:
    """The schedule's mean (attention, MLP) rate over total_steps: what sets its FLOPs (a ladder and a constant
    rate compare fairly only at the same mean)."""
    rates = [scheduled_rates(config, t, total_steps, lr_profile) for t in range(total_steps)]
    return sum(a for a, _ in rates) / total_steps, sum(m for _, m in rates) / total_steps


def kept_count(n: int, rate: float) -> int:
    """k = max(1, round((1 - r) n)) units kept of n."""
    return max(1, min(n, math.floor((1.0 - rate) * n + 0.5)))
