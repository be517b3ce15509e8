"""Omission-rate schedules: optimizer step -> (attention rate, MLP rate). Pure functions of the config."""

from __future__ import annotations

import itertools

import math

from .config import SATConfig


def schedule_fraction(config: SATConfig, step: int, total_steps: int | None) -> float:
    """The rate at `step` of `total_steps` as a fraction of the maximum rate (1 = omission_rate).

    Without total_steps (the schedule was never told how long training is) the schedule stays at its
    first value.
    """
    if config.schedule == "constant":
        return 1.0
    if not total_steps or total_steps <= 0:
        progress = 0.0
    else:
        progress = min(max(step, 0) / total_steps, 1.0)
    if config.schedule == "linear":
        return 1.0 - progress
    if config.schedule == "ladder":
        sparse_part = 1.0 - config.dense_tail
        if progress >= sparse_part:
            return 0.0
        stage = min(int(progress / sparse_part * config.rungs), config.rungs - 1)
        return (config.rungs - stage) / config.rungs
    if config.schedule == "steps":
        if config.omission_rate == 0:
            return 0.0
        for until, rate in config.steps:
            if progress < until:
                return rate / config.omission_rate
        return 0.0
    raise ValueError(f"unknown schedule {config.schedule!r}")


def stair_index(config: SATConfig, step: int, total_steps: int) -> int | None:
    """Which ladder rung or `steps` stair is in force at `step` (0 = the first); None in a dense stretch
    (the ladder's tail, after the last stair) or for schedules without stairs (constant, linear)."""
    progress = min(max(step, 0) / total_steps, 1.0)
    if config.schedule == "ladder":
        sparse_part = 1.0 - config.dense_tail
        return None if progress >= sparse_part else min(int(progress / sparse_part * config.rungs), config.rungs - 1)
    if config.schedule == "steps":
        return next((i for i, (until, _) in enumerate(config.steps) if progress < until), None)
    return None


def unreached_stairs(config: SATConfig, total_steps: int, limit: int | None = None) -> list[int]:
    """Ladder rungs or `steps` stairs (0-based) that no step of 0..total_steps-1 runs: stairs shorter than one
    step; the first `limit` of them when given (rungs may be any integer, so the list may be huge). Empty for
    constant and linear schedules."""
    if config.schedule not in ("ladder", "steps") or total_steps <= 0:
        return []
    n_stairs = config.rungs if config.schedule == "ladder" else len(config.steps)
    if config.schedule == "ladder" and total_steps * (1.0 - config.dense_tail) >= 2 * n_stairs:
        return []  # consecutive steps advance at most half a rung: every rung is reached
    if total_steps > 100_000:  # stairs narrower than 1e-5 of training; not worth the loop
        return []
    reached = {stair_index(config, t, total_steps) for t in range(total_steps)}
    return list(itertools.islice((i for i in range(n_stairs) if i not in reached), limit))


def scheduled_rates(config: SATConfig, step: int, total_steps: int | None) -> tuple[float, float]:
    """(attention omission rate, MLP omission rate) at this step."""
    f = schedule_fraction(config, step, total_steps)
    return config.max_attn_rate * f, config.max_mlp_rate * f


def kept_count(n: int, rate: float) -> int:
    """k = max(1, round((1 - r) n)) units kept of n."""
    return max(1, min(n, math.floor((1.0 - rate) * n + 0.5)))
