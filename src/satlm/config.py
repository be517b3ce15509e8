"""SATConfig: what to omit, how to rank it and when. Typed; YAML is only how it is stored."""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from dataclasses import dataclass
from typing import Any

from .errors import SATLMError

METRICS = ("l2", "l1", "output", "random")
SELECTIONS = ("sample", "topk", "random")
SOURCES = ("current", "history")
SCHEDULES = ("ladder", "constant", "linear", "steps")
ATTN_UNITS = ("head", "kv_group")
FUSED_SCORING = ("auto", "on", "off")
FORWARDS = ("auto", "dense", "sparse")
RUNG_PLACEMENTS = ("steps", "lr")
OMITTED_UPDATES = ("zero", "skip")


def resolve_forward(forward: str, source: str) -> str:
    """SATConfig.forward with `auto` resolved: dense for source=current, sparse for history."""
    if forward == "auto":
        return "dense" if source == "current" else "sparse"
    return forward


class SATConfigError(SATLMError, ValueError):
    """A bad SATConfig value; the message names the field and what is allowed."""


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise SATConfigError(f"SATConfig.{name}={value!r} is not allowed; choose one of {', '.join(allowed)}")


def _is_number(value: Any) -> bool:
    """A real number, finite (numpy scalars count; bools and strings do not)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _rate(name: str, value: Any) -> None:
    if not _is_number(value) or not (0.0 <= float(value) < 1.0):
        raise SATConfigError(f"SATConfig.{name}={value!r} must be a number in [0, 1)")


def closest_key(key: str, allowed) -> str:
    """' (did you mean X?)' for an unknown key, or '' when nothing is close."""
    match = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


@dataclass
class SATConfig:
    """Sparsity-Accelerated Training settings (see docs/method.md)."""

    omission_rate: float = 0.5
    """Maximum fraction of units omitted per step; the schedule scales it down over training."""
    attn_omission_rate: float | None = 0.0
    """Maximum rate for attention units (query heads or KV groups); None: omission_rate. Default 0: heads are kept
    (measured on a real model, BENCHMARKS.md: omitting heads cost far more eval loss than it saved time)."""
    mlp_omission_rate: float | None = None
    """Maximum rate for MLP channels; defaults to omission_rate."""
    metric: str = "l2"
    """Unit importance: l2 (norm of activations), l1 (mean |activation|), output (norm of the unit's
    contribution to the layer output), random (uniform scores, a control)."""
    selection: str = "topk"
    """How kept units are chosen from scores: topk (default; measured best on a real model), sample (Gumbel-top-k,
    proportional to score), random."""
    source: str = "current"
    """current: importance from this batch's forward (paper mode); history: from earlier steps, so the
    selection is made before the forward and every projection shrinks."""
    forward: str = "auto"
    """Where the omission acts (docs/method.md). dense: the forward computes and uses every unit (the step's loss
    is the dense model's) and only the backward runs over the kept units: no gradient flows through an omitted
    unit and its weights get none. sparse: omitted units contribute nothing to the step's output (the step's loss
    is that of a thinned model). auto (default): dense with source=current, sparse with source=history (dense
    needs source=current: history's gain is a smaller forward). Chosen by measurement on a real model
    (BENCHMARKS.md): at equal rates the dense forward lost far less eval loss."""
    schedule: str = "ladder"
    """Omission-rate schedule over training: ladder (LORS), constant, linear, steps."""
    rungs: int = 4
    """ladder: number of equal stages before the dense tail, at r, r(m-1)/m, ..., r/m."""
    dense_tail: float = 0.1
    """ladder: fraction of training at the end that runs dense."""
    dense_start: float = 0.0
    """Fraction of training at the start that runs dense, before the schedule's first rate (any schedule; SparseLoRA
    trains its first 5% dense)."""
    rung_placement: str = "steps"
    """ladder: where the rungs' boundaries fall. steps: equal numbers of steps; lr: equal shares of the summed
    learning rate (the LR of every step comes from the Trainer's LR scheduler through SATCallback, or from
    set_sat_lr_profile), so that under a decaying LR no rung carries most of the updates."""
    steps: list[list[float]] | None = None
    """steps: [[until_fraction, rate], ...] with increasing fractions; rates absolute (for omission_rate,
    per-component rates scale by the same ratio); after the last stair the rate is 0."""
    attn_unit: str = "head"
    """head: a query head is a unit; kv_group: a KV head and the query heads sharing it."""
    layers: list[int] | None = None
    """Decoder layer indices that take part (negative indices count from the end); None = all."""
    layer_rates: list[float] | str | None = None
    """Per-layer factors on the omission rates (and on layer_drop_rate): layer i omits rate x layer_rates[i]; one
    entry per decoder layer of the model; a mean of 1 over the layers SAT applies to keeps the FLOPs of the uniform
    setting. auto: measured at the start of training (SATCallback, or measure_layer_rates): each layer's loss
    increase with its lowest-importance units omitted on the first batches, turned into factors of mean 1 that
    omit less where the damage is larger (docs/method.md). None: 1 everywhere."""
    layer_drop_rate: float = 0.0
    """Whole-layer backward skipping (DropBP): the expected fraction of the applied layers whose backward is skipped
    in each training forward, drawn per forward (scaled per layer by layer_rates and by the schedule): a skipped
    layer's forward is unchanged, its parameters get no gradient and the input gradient passes through its residual
    connections only."""
    loss_tokens_dense: bool = False
    """MLP channels are omitted only in the rows of tokens that carry no loss (prompt, template, padding: label
    -100 at the next position); the rows of tokens that carry loss run over every channel in the backward, and with
    forward=sparse in the forward too (SparseLoRA's output-token split; for SFT). Heads are then kept
    (attn_omission_rate must be 0)."""
    omitted_update: str = "zero"
    """What the optimizer does with a unit that was omitted in every micro-batch of a step. zero: its gradient is
    zero and the optimizer applies its usual update (AdamW's moments decay, momentum still moves the weights, weight
    decay applies). skip: the unit's weights and optimizer state stay as they were for that step, as lazy Adam does
    (SATCallback restores them after the optimizer step)."""
    seed: int = 0
    """Seed of the selection generators (same seed, same selections)."""
    history_decay: float = 0.9
    """history: weight of the old score in the running average of observed importance."""
    history_exploration: float = 20.0
    """history: a unit unobserved for a steps has its score multiplied by 2 ** (a / history_exploration)
    (its score doubles every history_exploration steps), so every unit returns to the kept set; 0 disables
    the bonus."""
    fused_scoring: str = "auto"
    """Importance scoring compiled (torch.compile, inductor) into one read of the activations per layer: auto
    (default: on CUDA when Triton is installed), on (any device; the CPU needs a C++ compiler), off (eager). The
    same scores up to float rounding; a compile that fails warns and runs eager."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "SATConfig":
        _rate("omission_rate", self.omission_rate)
        for name in ("attn_omission_rate", "mlp_omission_rate"):
            if getattr(self, name) is not None:
                _rate(name, getattr(self, name))
        _choice("metric", self.metric, METRICS)
        _choice("selection", self.selection, SELECTIONS)
        _choice("source", self.source, SOURCES)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("attn_unit", self.attn_unit, ATTN_UNITS)
        _choice("forward", self.forward, FORWARDS)
        _choice("fused_scoring", self.fused_scoring, FUSED_SCORING)
        if self.effective_forward == "dense" and self.source == "history":
            raise SATConfigError("SATConfig.forward='dense' needs source='current': a dense forward computes every "
                                 "unit, so history's gain (selecting before the forward, so that every projection "
                                 "shrinks) is gone and only its staler selection would remain; use "
                                 "source='current' with forward='dense', or forward='sparse' with history")
        if isinstance(self.rungs, bool) or not isinstance(self.rungs, int) or self.rungs < 1:
            raise SATConfigError(f"SATConfig.rungs={self.rungs!r} must be an integer >= 1")
        _rate("dense_tail", self.dense_tail)
        _rate("dense_start", self.dense_start)
        if self.schedule == "ladder" and self.dense_start + self.dense_tail >= 1.0:
            raise SATConfigError(f"SATConfig.dense_start={self.dense_start!r} + dense_tail={self.dense_tail!r} leave "
                                 "the ladder no step; their sum must be below 1")
        _choice("rung_placement", self.rung_placement, RUNG_PLACEMENTS)
        self._validate_levers()
        if self.schedule == "steps":
            self._validate_steps()
        elif self.steps is not None:
            raise SATConfigError(f"SATConfig.steps is set but schedule={self.schedule!r} ignores it; set "
                                 "schedule='steps' to use the stairs, or remove steps")
        if self.layers is not None:
            self._validate_layers()
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise SATConfigError(f"SATConfig.seed={self.seed!r} must be an integer")
        _rate("history_decay", self.history_decay)
        if not _is_number(self.history_exploration) or self.history_exploration < 0:
            raise SATConfigError(f"SATConfig.history_exploration={self.history_exploration!r} must be a number >= 0")
        return self

    def _validate_levers(self) -> None:
        rates = self.layer_rates
        if isinstance(rates, str):
            if rates != "auto":
                raise SATConfigError(f"SATConfig.layer_rates={rates!r} must be a list of per-layer factors, 'auto' "
                                     "or null")
        elif rates is not None:
            if not isinstance(rates, (list, tuple)) or not rates or not all(_is_number(v) and v >= 0 for v in rates):
                raise SATConfigError(f"SATConfig.layer_rates={rates!r} must be a non-empty list of numbers >= 0 (one "
                                     "factor per decoder layer), 'auto' or null")
            self.layer_rates = [float(v) for v in rates]
        _rate("layer_drop_rate", self.layer_drop_rate)
        if not isinstance(self.loss_tokens_dense, bool):
            raise SATConfigError(f"SATConfig.loss_tokens_dense={self.loss_tokens_dense!r} must be true or false")
        if self.loss_tokens_dense and self.max_attn_rate > 0:
            raise SATConfigError(f"SATConfig.loss_tokens_dense=True omits MLP channels only, but the attention rate is "
                                 f"{self.max_attn_rate:g}: set attn_omission_rate=0 (attention mixes the rows, so a "
                                 "head cannot be kept for some rows and omitted for others exactly and cheaply)")
        _choice("omitted_update", self.omitted_update, OMITTED_UPDATES)

    def _validate_layers(self) -> None:
        """Types, emptiness and repeats here; whether each index exists is checked against the model in apply_sat."""
        layers = self.layers
        if not isinstance(layers, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in layers
        ):
            raise SATConfigError(f"SATConfig.layers={layers!r} must be a list of integer layer indices or null (all)")
        if not layers:
            raise SATConfigError("SATConfig.layers=[] names no layer; list layer indices, or null for all layers")
        repeated = sorted({i for i in layers if list(layers).count(i) > 1})
        if repeated:
            raise SATConfigError(f"SATConfig.layers={list(layers)!r} repeats {repeated[0]}; list each layer once")
        self.layers = list(layers)

    def _validate_steps(self) -> None:
        stairs = self.steps
        if not stairs or not isinstance(stairs, (list, tuple)):
            raise SATConfigError(
                "SATConfig.steps must be a non-empty list of [until_fraction, rate] pairs when schedule='steps'"
            )
        last = 0.0
        for i, stair in enumerate(stairs):
            if not isinstance(stair, (list, tuple)) or len(stair) != 2:
                raise SATConfigError(f"SATConfig.steps[{i}]={stair!r} must be a pair [until_fraction, rate]")
            until, rate = stair
            if not _is_number(until) or not (last < until <= 1.0):
                raise SATConfigError(
                    f"SATConfig.steps[{i}] until_fraction={until!r} must increase and lie in (0, 1]"
                )
            _rate(f"steps[{i}] rate", rate)
            if rate > self.omission_rate + 1e-12:
                raise SATConfigError(
                    f"SATConfig.steps[{i}] rate={rate!r} exceeds omission_rate={self.omission_rate!r}, the maximum"
                )
            last = until
        self.steps = [[float(u), float(r)] for u, r in stairs]

    @property
    def effective_forward(self) -> str:
        """forward with auto resolved: dense for source=current, sparse for history."""
        return resolve_forward(self.forward, self.source)

    # Rates per component, before the schedule scales them.
    @property
    def max_attn_rate(self) -> float:
        return float(self.omission_rate if self.attn_omission_rate is None else self.attn_omission_rate)

    @property
    def max_mlp_rate(self) -> float:
        return float(self.omission_rate if self.mlp_omission_rate is None else self.mlp_omission_rate)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "SATConfig":
        data = dict(data or {})
        names = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in names:
                raise SATConfigError(
                    f"SATConfig has no field {key!r}{closest_key(key, names)}; fields: {', '.join(sorted(names))}"
                )
        return cls(**data)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> "SATConfig":
        import yaml

        return cls.from_dict(yaml.safe_load(text))


__all__ = ["SATConfig", "SATConfigError", "closest_key", "METRICS", "SELECTIONS", "SOURCES", "SCHEDULES", "ATTN_UNITS",
           "FORWARDS", "RUNG_PLACEMENTS", "OMITTED_UPDATES"]
