"""Omission-rate schedules: optimizer step -> (attention rate, MLP rate). Pure functions of the config."""

from __future__ import annotations

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


def scheduled_rates(config: SATConfig, step: int, total_steps: int | None) -> tuple[float, float]:
    """(attention omission rate, MLP omission rate) at this step."""
    f = schedule_fraction(config, step, total_steps)
    return config.max_attn_rate * f, config.max_mlp_rate * f


def kept_count(n: int, rate: float) -> int:
    """k = max(1, round((1 - r) n)) units kept of n."""
    return max(1, min(n, math.floor((1.0 - rate) * n + 0.5)))
