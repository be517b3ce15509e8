"""SATRuntime: the state shared by every wrapped module of one model (config, schedule position, this forward)."""

from __future__ import annotations

import torch

from ..config import SATConfig
from ..core import importance
from ..core.ops import additive_mask
from ..schedules import scheduled_rates
from .families import Layout


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

    @property
    def config(self) -> SATConfig:
        return self._config

    @config.setter
    def config(self, config: SATConfig) -> None:
        # The forward's reading, resolved once per config (the benchmark and the self-check swap configs).
        self._config, self.dense_forward = config, config.effective_forward == "dense"

    def set_step(self, step: int, total_steps: int | None) -> None:
        self.step, self.total_steps = int(step), (int(total_steps) if total_steps else None)
        self.attn_rate, self.mlp_rate = scheduled_rates(self.config, self.step, self.total_steps)
        for m in self.modules:
            m.update_kept_count()

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
