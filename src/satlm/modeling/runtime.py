"""SATRuntime: the state shared by every wrapped module of one model (config, schedule position, this forward)."""

from __future__ import annotations

import torch

from ..config import SATConfig, SATConfigError
from ..core import importance
from ..core.ops import additive_mask
from ..schedules import needs_lr_profile, schedule_fraction, scheduled_rates
from .families import Layout

IGNORE_INDEX = -100  # the label of a token that carries no loss (transformers' convention)


class SATRuntime:
    """Config, layout, schedule position and what is known about the current training forward."""

    def __init__(self, config: SATConfig, layout: Layout):
        self.config = config  # sets dense_forward too
        self.layout = layout
        self.enabled = True
        self.step = 0
        self.total_steps: int | None = None
        self.attn_rate, self.mlp_rate = scheduled_rates(config, 0, None)
        # Incremented once per training forward of the model (saved for resume). Each forward starts by resetting
        # every selector (begin_forward): a layer that finds a selection of this forward is being recomputed
        # (gradient checkpointing) and reuses it.
        self.forward_id = 0
        self.modules: list = []  # every wrapped module (kept counts follow the rates: set_step; selectors reset)
        # True from a training forward (whose logits need a gradient) until its backward reaches the logits.
        self.awaiting_backward = False
        self.token_mask: torch.Tensor | None = None  # (B, T) of the current batch, 1 = real token
        # (attention mask, (dtype, alignment), its additive form) of this forward: every layer gets the same mask,
        # which paper mode's reuse kernels convert once per forward.
        self.mask_cache: tuple | None = None
        # The self-check (selfcheck.py) runs the sparse path with every unit kept.
        self.keep_all = False
        self.lr_profile: list[float] | None = None  # the learning rate of every step (rung_placement: lr)
        # layer_rates: layer index -> factor on its rates (explicit, or measured when "auto"); empty: 1 everywhere.
        self.layer_factors: dict[int, float] = {}
        self.sensitivity: dict | None = None  # what measure_layer_rates found (for the logs and for resume)
        # layer_drop_rate: the layers whose backward this forward skips, drawn in begin_forward.
        self.drop_layers: list[int] = []  # the layers that take part in dropping (the applied ones)
        self.dropped: frozenset[int] = frozenset()
        self.drop_generator = torch.Generator().manual_seed(config.seed * 1_000_003 + 7)
        # loss_tokens_dense: the labels of the coming forward (the outer model's pre-hook) and the row split of the
        # forward (flat indices of the rows that carry loss and of the others) with the (B, T) shape it is for.
        self.pending_labels: torch.Tensor | None = None
        self.loss_split: tuple | None = None

    @property
    def config(self) -> SATConfig:
        return self._config

    @config.setter
    def config(self, config: SATConfig) -> None:
        # The forward's reading, resolved once per config (the benchmark and the self-check swap configs).
        self._config, self.dense_forward = config, config.effective_forward == "dense"

    def set_step(self, step: int, total_steps: int | None) -> None:
        self.step, self.total_steps = int(step), (int(total_steps) if total_steps else None)
        if needs_lr_profile(self.config) and self.total_steps and self.lr_profile is None:
            raise SATConfigError("SATConfig.rung_placement='lr' places the ladder's rungs by the learning rate of "
                                 "each step, which this model was never given: train with SATCallback (it reads the "
                                 "Trainer's LR scheduler) or call satlm.set_sat_lr_profile(model, lrs) first")
        self.attn_rate, self.mlp_rate = scheduled_rates(self.config, self.step, self.total_steps, self.lr_profile)
        for m in self.modules:
            m.update_kept_count()

    def layer_factor(self, layer: int) -> float:
        return self.layer_factors.get(layer, 1.0)

    def drop_probability(self, layer: int) -> float:
        """layer_drop_rate at this step (scaled by the schedule and the layer's factor)."""
        rate = self.config.layer_drop_rate
        if not rate:
            return 0.0
        f = schedule_fraction(self.config, self.step, self.total_steps, self.lr_profile)
        return min(1.0, rate * f * self.layer_factor(layer))

    def vocab_rate(self) -> float:
        """vocab_omission_rate at this step (scaled by the schedule)."""
        rate = self.config.vocab_omission_rate
        if not rate:
            return 0.0
        return rate * schedule_fraction(self.config, self.step, self.total_steps, self.lr_profile)

    def _draw_dropped(self) -> frozenset[int]:
        """This forward's skipped layers: layer i with probability drop_probability(i), from the runtime's own
        generator on the CPU (no device sync; saved for exact resume)."""
        if not self.config.layer_drop_rate or not self.drop_layers:
            return frozenset()
        u = torch.rand(len(self.drop_layers), generator=self.drop_generator).tolist()
        return frozenset(i for i, v in zip(self.drop_layers, u) if v < self.drop_probability(i))

    def _split_loss_rows(self) -> None:
        """loss_tokens_dense: flat indices of the rows whose token carries loss (its next label is not -100) and of
        the others. One host sync per forward (the two row counts set the shapes), none per layer."""
        labels, self.pending_labels = self.pending_labels, None
        if labels is None:
            raise SATConfigError("SATConfig.loss_tokens_dense=True needs the labels: call the model with labels= "
                                 "(the Trainer does), so that SAT knows which tokens carry the loss")
        carries = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
        carries[:, :-1] = labels[:, 1:] != IGNORE_INDEX
        flat = carries.reshape(-1)
        self.loss_split = (tuple(labels.shape), flat.nonzero().squeeze(1), (~flat).nonzero().squeeze(1))

    def begin_forward(self, attention_mask, device: torch.device | None = None) -> None:
        """A new training forward (the model's forward pre-hook; never inside a compiled region): the batch's
        token mask, every selector reset, and with a device, this forward's selection noise drawn."""
        self.forward_id += 1
        self.mask_cache = None
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            self.token_mask = attention_mask
        else:
            self.token_mask = None
        draw = device if (self.enabled and not self.keep_all) else None
        for m in self.modules:
            m.sat_selector.begin_forward(draw)
        self.dropped = self._draw_dropped() if draw is not None else frozenset()
        self.loss_split = None
        if self.config.loss_tokens_dense and draw is not None:
            self._split_loss_rows()

    def loss_rows_for(self, x: torch.Tensor) -> tuple | None:
        """(flat indices of the loss rows, of the other rows) when loss_tokens_dense split this forward's batch
        and x is that batch (B, T, ...), else None."""
        s = self.loss_split
        if s is None or tuple(x.shape[:2]) != s[0]:
            return None
        return s[1], s[2]

    def mask_for(self, x: torch.Tensor) -> torch.Tensor | None:
        """The batch's (B, T) token mask when it matches x's batch and length, else None (every token counts)."""
        m = self.token_mask
        if m is None or tuple(m.shape) != tuple(x.shape[:2]):
            return None
        return m

    def additive_mask_for(self, attention_mask, dtype: torch.dtype, align: int = 0):
        """The attention mask as SDPA's kernels take it (ops.additive_mask), converted once per forward."""
        cache = self.mask_cache
        if not (cache and cache[0] is attention_mask and cache[1] == (dtype, align)):
            self.mask_cache = cache = (attention_mask, (dtype, align), additive_mask(attention_mask, dtype, align))
        return cache[2]

    def mlp_scores(self, h, token_mask, metric, down_weight=None, scratch=False) -> torch.Tensor:
        """importance.mlp_scores, fused into one read of h where SATConfig.fused_scoring asks for it."""
        if importance.fused_scoring_wanted(self.config.fused_scoring, h.device.type):
            return importance.FUSED_MLP_SCORES(h, token_mask, metric, down_weight)
        return importance.mlp_scores(h, token_mask, metric, down_weight, scratch=scratch)

    def head_scores(self, o, token_mask, metric, o_weight_cols=None) -> torch.Tensor:
        """importance.head_scores, fused into one read of o where SATConfig.fused_scoring asks for it."""
        if importance.fused_scoring_wanted(self.config.fused_scoring, o.device.type):
            return importance.FUSED_HEAD_SCORES(o, token_mask, metric, o_weight_cols)
        return importance.head_scores(o, token_mask, metric, o_weight_cols)
