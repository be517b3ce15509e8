"""What `satlm bench` does with each SATConfig field: the three it sweeps, those it holds, and the rest, which every
SAT variant takes from the bench's SATConfig (the library's defaults unless a flag says otherwise)."""

from __future__ import annotations

import dataclasses

from ..config import SATConfig, forward_conflict, resolve_forward

# Each variant runs at its own rate throughout: a constant schedule (so rungs, dense_tail, dense_start,
# rung_placement and steps do not apply) and no SATCallback after the optimizer step (which carries out
# omitted_update=skip).
HELD = {"schedule": "constant", "dense_start": 0.0, "rung_placement": "steps", "steps": None, "omitted_update": "zero"}
UNUSED = ("rungs", "dense_tail")  # the ladder's: nothing under a constant schedule
SWEPT = ("omission_rate", "source", "forward")  # one variant per (source, forward, rate)


def held(config: SATConfig) -> SATConfig:
    """config with the fields the bench holds set to what it runs (HELD)."""
    return dataclasses.replace(config, **HELD)


def sat_variants(sources, rates, forwards=("auto",)) -> list[tuple[str, str, float, str]]:
    """(name, source, rate, forward) of a SAT variant per source, forward and rate, in that order. Each forward is
    resolved per source (auto: the library's choice); a pair SATConfig refuses (forward_conflict) or that repeats
    another is left out."""
    out, seen = [], set()
    for s in sources:
        for fw in forwards:
            resolved = resolve_forward(fw, s)
            if forward_conflict(fw, s) or (s, resolved) in seen:
                continue
            seen.add((s, resolved))
            out += [(f"{s}@{r:g}" if resolved == "sparse" else f"{s}/dense@{r:g}", s, r, resolved) for r in rates]
    return out
