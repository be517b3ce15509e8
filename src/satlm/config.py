"""SATConfig: what to omit, how to rank it and when. Typed; YAML is only how it is stored.

Each setting is declared once, as a dataclass field whose metadata carries its help and, where it has them, its
choices and its range (TRL's style: `field(default=..., metadata={"help": ..., "choices": [...]})`; the keys are
described in satlm/fields.py). One validator, `fields.check_fields`, reads those declarations (the run config's
sections use it too); the few rules between fields follow in `SATConfig._check_rules`, each stated once. The YAML
loader's keys, `satlm keys` and `satlm bench`'s flags are generated from the same fields.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import SATLMError
from .fields import Problem, check_fields, is_number

METRICS = ("l2", "l1", "output", "random")
SELECTIONS = ("sample", "topk", "random", "unbiased")
SOURCES = ("current", "history")
SCHEDULES = ("ladder", "constant", "linear", "steps")
ATTN_UNITS = ("head", "kv_group")
FUSED_SCORING = ("auto", "on", "off")
FORWARDS = ("auto", "dense", "sparse")
RUNG_PLACEMENTS = ("steps", "lr")
OMITTED_UPDATES = ("zero", "skip")


class SATConfigError(SATLMError, ValueError):
    """A bad SATConfig value; the message names the field and what is allowed."""


def closest_key(key: str, allowed) -> str:
    """' (did you mean X?)' for an unknown key, or '' when nothing is close."""
    match = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


# -- rules that span fields, each stated once --------------------------------------------------------------
def resolve_forward(forward: str, source: str) -> str:
    """SATConfig.forward with `auto` resolved: dense for source=current, sparse for history."""
    if forward == "auto":
        return "dense" if source == "current" else "sparse"
    return forward


def forward_conflict(forward: str, source: str) -> str | None:
    """Why `forward` cannot run with `source`, or None: a dense forward needs source=current."""
    if resolve_forward(forward, source) == "dense" and source == "history":
        return ("forward='dense' needs source='current': a dense forward computes every unit, so history's gain "
                "(selecting before the forward, so that every projection shrinks) is gone and only its staler "
                "selection would remain; use source='current' with forward='dense', or forward='sparse' with history")
    return None


def check_layers(layers: list[int] | None, n_layers: int | None = None, where: str = "SATConfig.layers"):
    """The one check of a `layers` setting (a list of integers, as its field declares). Every index is named once
    and, given the model's number of decoder layers, exists (negative indices count from the end) and is not the
    same layer as another (1 and -1 of a 2-layer model). Returns the resolved indices in order (every layer for
    None), or `layers` itself without n_layers."""
    if layers is None:
        return None if n_layers is None else list(range(n_layers))
    if not layers:
        raise SATConfigError(f"{where}=[] names no layer; list layer indices, or null for all layers")
    repeated = sorted({i for i in layers if list(layers).count(i) > 1})
    if repeated:
        raise SATConfigError(f"{where}={list(layers)!r} repeats {repeated[0]}; list each layer once")
    if n_layers is None:
        return list(layers)
    allowed = f"the model has {n_layers} decoder layers: 0..{n_layers - 1}, or -{n_layers}..-1 from the end"
    out: dict[int, int] = {}  # resolved index -> as given
    for i in layers:
        if not -n_layers <= i < n_layers:
            raise SATConfigError(f"{where}={list(layers)!r}: layer {i} does not exist ({allowed})")
        if i % n_layers in out:
            raise SATConfigError(f"{where}={list(layers)!r} names a layer twice: {out[i % n_layers]} and {i} are the "
                                 f"same layer ({allowed}); list each layer once")
        out[i % n_layers] = i
    return sorted(out)


@dataclass
class SATConfig:
    """Sparsity-Accelerated Training settings (see docs/method.md)."""

    _prefix: ClassVar[str] = "SATConfig."  # how errors name a field (the run config's sat: section says sat.)

    omission_rate: float = field(default=0.5, metadata={
        "range": "[0, 1)",
        "help": "Maximum fraction of units omitted per step; the schedule scales it down over training."})
    attn_omission_rate: float | None = field(default=0.0, metadata={
        "range": "[0, 1)", "null": "omission_rate",
        "help": "Maximum rate for attention units (query heads or KV groups); None: omission_rate. Default 0: heads "
                "are kept (measured on a real model, BENCHMARKS.md: omitting heads cost far more eval loss than it "
                "saved time)."})
    mlp_omission_rate: float | None = field(default=None, metadata={
        "range": "[0, 1)", "null": "omission_rate",
        "help": "Maximum rate for MLP channels; defaults to omission_rate."})
    metric: str = field(default="l2", metadata={
        "choices": METRICS,
        "help": "Unit importance: l2 (norm of activations), l1 (mean |activation|), output (norm of the unit's "
                "contribution to the layer output), random (uniform scores, a control)."})
    selection: str = field(default="topk", metadata={
        "choices": SELECTIONS,
        "help": "How kept units are chosen from scores: topk (default; measured best on a real model), sample "
                "(Gumbel-top-k, proportional to score), random, unbiased (MLP channels with forward dense: drawn with "
                "inclusion probability p proportional to score, the kept channels' gradients weighted by 1/p, an "
                "unbiased estimate of the dense gradient; docs/method.md)."})
    source: str = field(default="current", metadata={
        "choices": SOURCES,
        "help": "current: importance from this batch's forward (paper mode); history: from earlier steps, so the "
                "selection is made before the forward and every projection shrinks."})
    forward: str = field(default="auto", metadata={
        "choices": FORWARDS,
        "help": "Where the omission acts (docs/method.md). dense: the forward computes and uses every unit (the "
                "step's loss is the dense model's) and only the backward runs over the kept units: no gradient flows "
                "through an omitted unit and its weights get none. sparse: omitted units contribute nothing to the "
                "step's output (the step's loss is that of a thinned model). auto (default): dense with "
                "source=current, sparse with source=history (dense needs source=current: history's gain is a smaller "
                "forward). Chosen by measurement on a real model (BENCHMARKS.md): at equal rates the dense forward "
                "lost far less eval loss."})
    schedule: str = field(default="ladder", metadata={
        "choices": SCHEDULES,
        "help": "Omission-rate schedule over training: ladder (LORS), constant, linear, steps."})
    rungs: int = field(default=4, metadata={
        "range": "[1, inf)",
        "help": "ladder: number of equal stages before the dense tail, at r, r(m-1)/m, ..., r/m."})
    dense_tail: float = field(default=0.1, metadata={
        "range": "[0, 1)",
        "help": "ladder: fraction of training at the end that runs dense."})
    dense_start: float = field(default=0.0, metadata={
        "range": "[0, 1)",
        "help": "Fraction of training at the start that runs dense, before the schedule's first rate (any schedule; "
                "SparseLoRA trains its first 5% dense)."})
    rung_placement: str = field(default="steps", metadata={
        "choices": RUNG_PLACEMENTS,
        "help": "ladder: where the rungs' boundaries fall. steps: equal numbers of steps; lr: equal shares of the "
                "summed learning rate (the LR of every step comes from the Trainer's LR scheduler through "
                "SATCallback, or from set_sat_lr_profile), so that under a decaying LR no rung carries most of the "
                "updates."})
    steps: list[list[float]] | None = field(default=None, metadata={
        "expects": "a list of [until_fraction, rate] pairs",
        "help": "steps: [[until_fraction, rate], ...] with increasing fractions; rates absolute (for omission_rate, "
                "per-component rates scale by the same ratio); after the last stair the rate is 0."})
    attn_unit: str = field(default="head", metadata={
        "choices": ATTN_UNITS,
        "help": "head: a query head is a unit; kv_group: a KV head and the query heads sharing it."})
    layers: list[int] | None = field(default=None, metadata={
        "expects": "a list of integer layer indices", "null": "all",
        "help": "Decoder layer indices that take part (negative indices count from the end); None = all."})
    layer_rates: list[float] | str | None = field(default=None, metadata={
        "range": "[0, inf)",
        "expects": "a non-empty list of numbers >= 0 (one factor per decoder layer), 'auto'",
        "help": "Per-layer factors on the omission rates (and on layer_drop_rate): layer i omits rate x "
                "layer_rates[i]; one entry per decoder layer of the model; a mean of 1 over the layers SAT applies "
                "to keeps the FLOPs of the uniform setting. auto: measured at the start of training (SATCallback, or "
                "measure_layer_rates): each layer's loss increase with its lowest-importance units omitted on the "
                "first batches, turned into factors of mean 1 that omit less where the damage is larger "
                "(docs/method.md). None: 1 everywhere."})
    layer_drop_rate: float = field(default=0.0, metadata={
        "range": "[0, 1)",
        "help": "Whole-layer backward skipping (DropBP): the expected fraction of the applied layers whose backward "
                "is skipped in each training forward, drawn per forward (scaled per layer by layer_rates and by the "
                "schedule): a skipped layer's forward is unchanged, its parameters get no gradient and the input "
                "gradient passes through its residual connections only."})
    vocab_omission_rate: float = field(default=0.0, metadata={
        "range": "[0, 1)",
        "help": "Output layer (LM head): the fraction of its vocabulary rows whose weight gradient is omitted in each "
                "training step (scaled by the schedule): the rows whose logits' gradients have the smallest norm over "
                "the batch's tokens, read in the backward, so the kept rows are the exact top-k of that norm. The "
                "forward and the input gradient stay dense. On SmolLM2-135M the head is a fifth of the step and 5% of "
                "its rows carry 99.98% of its weight gradient's squared norm (docs/method.md). 0: off."})
    vocab_omission_input_grad: bool = field(default=False, metadata={
        "help": "With vocab_omission_rate: the output layer's input gradient (what reaches the decoder) is taken over "
                "the kept vocabulary rows too, G[:, kept] W[kept], which drops the omitted rows' share (the "
                "low-probability tail of the softmax; measured on SmolLM2-135M: 2.6-3.7% of its norm at rate 0.9). "
                "An approximation, unlike the weight-gradient omission alone; it saves as much again, but measured "
                "on SmolLM2-135M (CPT, r=0.4, rate 0.9) it cost +2.5% eval loss by step 20 and +4.8% by step 40, where "
                "the weight-gradient omission alone cost ~0.03 points (BENCHMARKS.md): not for use, kept as the "
                "measured negative."})
    loss_tokens_dense: bool = field(default=False, metadata={
        "help": "MLP channels are omitted only in the rows of tokens that carry no loss (prompt, template, padding: "
                "label -100 at the next position); the rows of tokens that carry loss run over every channel in the "
                "backward, and with forward=sparse in the forward too (SparseLoRA's output-token split; for SFT). "
                "Heads are then kept (attn_omission_rate must be 0)."})
    omitted_update: str = field(default="zero", metadata={
        "choices": OMITTED_UPDATES,
        "help": "What the optimizer does with a unit that was omitted in every micro-batch of a step. zero: its "
                "gradient is zero and the optimizer applies its usual update (AdamW's moments decay, momentum still "
                "moves the weights, weight decay applies). skip: the unit's weights and optimizer state stay as they "
                "were for that step, as lazy Adam does (SATCallback restores them after the optimizer step)."})
    seed: int = field(default=0, metadata={
        "help": "Seed of the selection generators (same seed, same selections)."})
    history_decay: float = field(default=0.9, metadata={
        "range": "[0, 1)",
        "help": "history: weight of the old score in the running average of observed importance."})
    history_exploration: float = field(default=20.0, metadata={
        "range": "[0, inf)",
        "help": "history: a unit unobserved for a steps has its score multiplied by 2 ** (a / history_exploration) "
                "(its score doubles every history_exploration steps), so every unit returns to the kept set; 0 "
                "disables the bonus."})
    fused_scoring: str = field(default="auto", metadata={
        "choices": FUSED_SCORING,
        "help": "Importance scoring compiled (torch.compile, inductor) into one read of the activations per layer: "
                "auto (default: on CUDA when Triton is installed), on (any device; the CPU needs a C++ compiler), off "
                "(eager). The same scores up to float rounding; a compile that fails warns and runs eager."})

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "SATConfig":
        """Check every field and the rules between them, and return self. A config is checked once: again only
        when a value changed since (apply_sat calls this on the config it is given)."""
        if self.__dict__.get("_checked") == self._values():
            return self
        check_fields(self, self._field_error)
        self._check_rules()
        self._checked = self._values()
        return self

    def _values(self) -> tuple:
        return tuple(copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self))

    def _field_error(self, problem: Problem) -> Exception:
        return SATConfigError(problem.as_field(self._prefix))

    def _check_rules(self) -> None:
        p = self._prefix
        conflict = forward_conflict(self.forward, self.source)
        if conflict:
            raise SATConfigError(f"{p}{conflict}")
        if self.schedule == "ladder" and self.dense_start + self.dense_tail >= 1.0:
            raise SATConfigError(f"{p}dense_start={self.dense_start!r} + dense_tail={self.dense_tail!r} leave the "
                                 "ladder no step; their sum must be below 1")
        if self.schedule == "steps":
            self._check_steps()
        elif self.steps is not None:
            raise SATConfigError(f"{p}steps is set but schedule={self.schedule!r} ignores it; set schedule='steps' "
                                 "to use the stairs, or remove steps")
        if self.layers is not None:
            self.layers = check_layers(self.layers, where=f"{p}layers")
        rates = self.layer_rates
        if isinstance(rates, str) and rates != "auto":
            raise SATConfigError(f"{p}layer_rates={rates!r} must be a list of per-layer factors, 'auto' or null")
        if isinstance(rates, (list, tuple)):
            if not rates:
                raise SATConfigError(f"{p}layer_rates=[] must be a non-empty list of numbers >= 0 (one factor per "
                                     "decoder layer), 'auto' or null")
            self.layer_rates = [float(v) for v in rates]
        if self.selection == "unbiased" and (self.max_attn_rate > 0 or self.effective_forward != "dense"):
            raise SATConfigError(f"{p}selection='unbiased' weights the kept MLP channels' gradients by 1/p, which is "
                                 "exact only where the forward is the dense model's and for MLP channels: it needs "
                                 "source='current' with forward='dense' and attn_omission_rate=0 (got "
                                 f"source={self.source!r}, forward={self.forward!r}, attention rate "
                                 f"{self.max_attn_rate:g})")
        if self.vocab_omission_input_grad and not self.vocab_omission_rate:
            raise SATConfigError(f"{p}vocab_omission_input_grad=True needs vocab_omission_rate > 0 (it takes the input "
                                 "gradient over the kept vocabulary rows): set vocab_omission_rate, e.g. 0.9")
        if self.vocab_omission_rate and self.omitted_update != "zero":
            raise SATConfigError(f"{p}vocab_omission_rate={self.vocab_omission_rate:g} with "
                                 f"omitted_update={self.omitted_update!r}: skipping covers heads and MLP channels, not "
                                 "the output layer's vocabulary rows; set omitted_update='zero' or vocab_omission_rate=0")
        if self.loss_tokens_dense and self.max_attn_rate > 0:
            raise SATConfigError(f"{p}loss_tokens_dense=True omits MLP channels only, but the attention rate is "
                                 f"{self.max_attn_rate:g}: set attn_omission_rate=0 (attention mixes the rows, so a "
                                 "head cannot be kept for some rows and omitted for others exactly and cheaply)")

    def _check_steps(self) -> None:
        p, stairs = self._prefix, self.steps
        if not stairs:
            raise SATConfigError(f"{p}steps must be a non-empty list of [until_fraction, rate] pairs when "
                                 "schedule='steps'")
        last = 0.0
        for i, stair in enumerate(stairs):
            if not isinstance(stair, (list, tuple)) or len(stair) != 2:
                raise SATConfigError(f"{p}steps[{i}]={stair!r} must be a pair [until_fraction, rate]")
            until, rate = stair
            if not is_number(until) or not (last < until <= 1.0):
                raise SATConfigError(f"{p}steps[{i}] until_fraction={until!r} must increase and lie in (0, 1]")
            if not is_number(rate) or not 0.0 <= rate < 1.0:
                raise SATConfigError(f"{p}steps[{i}] rate={rate!r} must be a number in [0, 1)")
            if rate > self.omission_rate + 1e-12:
                raise SATConfigError(f"{p}steps[{i}] rate={rate!r} exceeds omission_rate={self.omission_rate!r}, "
                                     "the maximum")
            last = until
        self.steps = [[float(u), float(r)] for u, r in stairs]

    @classmethod
    def _from_checked(cls, values: dict[str, Any]) -> "SATConfig":
        """A SATConfig of values already checked together (a run config's sat: section): not checked again."""
        config = cls.__new__(cls)
        config.__dict__.update(copy.deepcopy(values))
        config._checked = config._values()
        return config

    @property
    def effective_forward(self) -> str:
        """forward with auto resolved (resolve_forward)."""
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
