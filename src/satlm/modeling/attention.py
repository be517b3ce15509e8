"""SATAttention: self-attention over kept query heads (attn_unit=head) or kept KV groups (attn_unit=kv_group).

Each sparse forward reads top to bottom: project (every head without autograd in paper mode, to score them;
the kept heads with autograd) -> heads (view, q/k norm, RoPE: `_heads`, one function for both passes) -> attend
(reuse the scoring pass's attention where it ran PyTorch's CPU flash kernel, else attend the kept heads again)
-> output projection over the kept heads' columns. With `forward: dense` the output is the projection over
every head, computed in the scoring pass; the backward is the kept heads' either way.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.importance import group_scores
from ..core.ops import (EFFICIENT_BIAS_ALIGN, GROUPED_KV_KINDS, attention_with_lse, count_reuse, head_columns,
                        kept_attention, reuse_kernel, rope, same_rope)
from .base import _SATModule
from .families import get_path, model_module_function
from .proj import Proj, Rows, col_project
from .runtime import SATRuntime

_ATTN_ARGS = ("hidden_states", "position_embeddings", "attention_mask")


class _Reuse(NamedTuple):
    """Paper mode's reuse of its scoring pass: the kernel (ops.reuse_kernel), its mask, is_causal, and the dtype
    q/k/v are cast to (the autocast dtype; None: no cast)."""

    kind: str
    mask: torch.Tensor | None
    is_causal: bool
    dtype: torch.dtype | None


class _GroupsView:
    """The attention module as the attention function sees it, with a different KV repeat factor."""

    def __init__(self, base: nn.Module, groups: int):
        self._base, self.num_key_value_groups = base, groups

    def __getattr__(self, name):
        return getattr(self._base, name)


def _select_heads(t: torch.Tensor, heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The features of whole heads of a contiguous (B, T, H*hd): (B, T, h*hd), copied a head at a time (about 4x
    faster on the CPU than selecting the same h*hd columns one by one)."""
    B, T = t.shape[:2]
    return t.reshape(B * T, -1, head_dim).index_select(1, heads).view(B, T, -1)


class SATAttention(_SATModule):
    component = "attn"

    def __init__(self, base_layer: nn.Module, runtime: SATRuntime, layer_idx: int):
        cfg = base_layer.config
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = base_layer.head_dim
        self.rep = self.n_heads // self.n_kv
        n = self.n_heads if runtime.config.attn_unit == "head" else self.n_kv
        super().__init__(base_layer, runtime, layer_idx, n)
        lay = runtime.layout
        self.where = f"layers[{layer_idx}].{lay.attn}"
        self._model_rope = model_module_function(base_layer, "apply_rotary_pos_emb")
        # satlm's own kernels where they compute the same (core/ops.py), over the whole head (not partial rotary)
        self._same_rope = same_rope(self._model_rope, self.head_dim)
        self._eager = model_module_function(base_layer, "eager_attention_forward")

    # -- the layout's pieces, looked up in every sparse forward (a LoRA layer injected after SAT is caught) --
    def _parts(self) -> tuple[Rows, Proj]:
        lay, base, hd = self.sat_runtime.layout, self.base_layer, self.head_dim
        rows = Rows.of(base, [lay.q, lay.k, lay.v], lay.qkv, [self.n_heads * hd, self.n_kv * hd, self.n_kv * hd],
                       self.where)
        return rows, Proj(get_path(base, lay.o), f"{self.where}.{lay.o}")

    def _attention_function(self):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        impl = self.base_layer.config._attn_implementation
        if impl in (None, "eager"):
            return self._eager
        if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
            return ALL_ATTENTION_FUNCTIONS.get_interface(impl, self._eager)
        return ALL_ATTENTION_FUNCTIONS[impl]

    def _expand(self, units: torch.Tensor):
        """Kept units -> (query heads, KV groups, per-head index into the kept groups or None)."""
        if self.sat_runtime.config.attn_unit == "kv_group":
            heads = (units[:, None] * self.rep + torch.arange(self.rep, device=units.device)).reshape(-1)
            return heads, units, None
        if self.rep == 1:
            return units, units, None
        # Every K/V group is projected: which groups a kept head uses is known on the device only, and counting
        # them (torch.unique) would stop the host at every layer and step. A group no kept head uses gets a zero
        # gradient, as in the masked reference; its K/V projection is the only extra work (kg = 1).
        groups = torch.arange(self.n_kv, device=units.device)
        return units, groups, torch.div(units, self.rep, rounding_mode="floor")

    def _heads(self, q, k, cos, sin, heads=None, groups=None):
        """(B, T, h*hd) q and k of these heads (None: every head) -> (B, h, T, hd), normed and rotated as the
        family does (a full-width q/k norm was applied before the heads were taken: see _project)."""
        B, T, hd = q.shape[0], q.shape[1], self.head_dim
        lay, base = self.sat_runtime.layout, self.base_layer
        q, k = q.view(B, T, -1, hd), k.view(B, T, -1, hd)
        if lay.qk_norm == "head":  # over each head's features: the kept heads' slice is exact
            q, k = get_path(base, lay.q_norm)(q), get_path(base, lay.k_norm)(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        if lay.uses_rope(base):
            fn = rope if self._same_rope and cos.shape[-1] == hd else self._model_rope
            q, k = fn(q, k, cos, sin)
        return q, k

    def forward(self, *args, **kwargs):
        k = self._kept_k()
        cache_key = "cache" if "cache" in kwargs else "past_key_values"
        if k is None or len(args) > len(_ATTN_ARGS) or self.rep * self.n_kv != self.n_heads:
            return self.base_layer(*args, **kwargs)
        named = dict(zip(_ATTN_ARGS, args))
        for name in _ATTN_ARGS:
            if name in kwargs:
                named[name] = kwargs.pop(name)
        kwargs.pop(cache_key, None)  # training: nothing is cached (K/V of omitted heads would be missing)
        if named.get("position_embeddings") is None:
            return self.base_layer(**named, **kwargs)
        y = self._sparse(k, named["hidden_states"], named["position_embeddings"], named.get("attention_mask"), kwargs)
        p = getattr(self.base_layer, self.sat_runtime.layout.o_dropout or "", None)
        if p:
            y = F.dropout(y, p=p, training=self.training)
        return y, None

    def _flash_reuse(self, attend_all, x, attention_mask, dropout, extra) -> _Reuse | None:
        """How paper mode can take the kept heads' attention from its pass over every head (attend_all: scoring,
        or forward=dense): with SDPA, through a kernel that returns the log-sum-exp (ops.reuse_kernel: the CPU
        flash kernel; on CUDA flash or memory-efficient); None: the kept heads are attended again."""
        base = self.base_layer
        if not (attend_all and base.config._attn_implementation == "sdpa" and dropout == 0.0
                and extra.get("softcap") is None and extra.get("position_bias") is None
                and not extra.get("output_attentions", False)):
            return None
        if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4):
            return None
        dev = x.device.type
        autocast = dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev)
        dtype = torch.get_autocast_dtype(dev) if autocast else x.dtype
        kind = reuse_kernel(dev, dtype, attention_mask is not None, self.head_dim, autocast)
        if kind is None:
            return None
        is_causal = extra.get("is_causal")
        is_causal = getattr(base, "is_causal", True) if is_causal is None else is_causal
        is_causal = bool(x.shape[1] > 1 and attention_mask is None and is_causal)
        align = EFFICIENT_BIAS_ALIGN if kind == "efficient" else 0
        mask = self.sat_runtime.additive_mask_for(attention_mask, dtype, align)
        # Under autocast SDPA computes in the autocast dtype; the kernels are called directly, so q/k/v are cast
        # here as SDPA would cast them (q after RoPE is fp32 there, v is not).
        return _Reuse(kind, mask, is_causal, dtype if autocast else None)

    def _attend_with_lse(self, flash: _Reuse, q, k, v):
        """The reuse kernel's forward (q, k, v cast to the autocast dtype under autocast); None where a CUDA
        kernel refuses these inputs (the caller then attends as the model does)."""
        if flash.dtype is not None:
            q, k, v = q.to(flash.dtype), k.to(flash.dtype), v.to(flash.dtype)
        if flash.kind == "cpu":
            return attention_with_lse("cpu", q, k, v, flash.mask, flash.is_causal, self.base_layer.scaling)
        try:
            r = attention_with_lse(flash.kind, q, k, v, flash.mask, flash.is_causal, self.base_layer.scaling)
        except RuntimeError:
            count_reuse("fallback:forward")
            return None
        count_reuse(flash.kind)
        return r

    def _sparse(self, k, x, position_embeddings, attention_mask, kwargs):
        rt, base, sel = self.sat_runtime, self.base_layer, self.sat_selector
        lay = rt.layout
        rows, op = self._parts()
        cos, sin = position_embeddings
        B, T = x.shape[:2]
        hd, metric = self.head_dim, rt.config.metric
        attend = self._attention_function()
        extra = {**kwargs, **lay.attn_kwargs(base)}
        dropout = base.attention_dropout if self.training else 0.0
        mask = rt.mask_for(x)
        units = sel.cached(k)
        fresh = units is None
        flash = None  # paper mode only: see _flash_reuse
        recompute_flash = False  # a recomputation runs the kept heads' flash forward itself
        y_all = None  # paper mode with forward=dense: the output over every head
        # LoRA dropout masks, drawn as peft draws them: q, k, v, then o (exact while attention dropout is 0)
        masks = rows.masks(x, self.training)
        o_masks = op.masks((B, T, self.n_heads * hd), x, self.training)
        rows.prepare(x, masks)
        full_norm = lay.qk_norm == "full"
        if full_norm:  # the norm spans every head: q and k at full width, with autograd (separate q/k/v only)
            q_full = get_path(base, lay.q_norm)(rows.projs[0].full(x, masks[0]))  # (B, T, H*hd)
            k_full = get_path(base, lay.k_norm)(rows.projs[1].full(x, masks[1]))  # (B, T, n_kv*hd)
            v_rows, v_masks = Rows(rows.projs[2:], [(0, 0, self.n_kv * hd)]), masks[2:]

        if sel.use_history():
            if fresh:
                units = sel.choose_from_history(k, x.device)
            heads, groups, kv_map = self._expand(units)
            qcols, kvcols = head_columns(heads, hd), head_columns(groups, hd)
            if full_norm:
                (val,) = v_rows.kept(x, [kvcols], masks=v_masks)
                q, key = _select_heads(q_full, heads, hd), _select_heads(k_full, groups, hd)
            else:
                q, key, val = rows.kept(x, [qcols, kvcols, kvcols], masks=masks)
        elif not fresh and not rt.dense_forward and not full_norm:
            # A recomputation (gradient checkpointing) of the thinned forward: the kept heads are known, so only
            # their q/k/v are projected. Where the first pass took the kept heads' attention from its flash pass
            # over every head, the kept heads' flash forward runs here, so that the same tensors are saved.
            heads, groups, kv_map = self._expand(units)
            qcols, kvcols = head_columns(heads, hd), head_columns(groups, hd)
            q, key, val = rows.kept(x, [qcols, kvcols, kvcols], masks=masks)
            flash = self._flash_reuse(metric != "random", x, attention_mask, dropout, extra)
            recompute_flash = flash is not None
        else:
            # Every head is attended without autograd to score the heads (and, forward=dense, for the output);
            # the kept heads' outputs are taken from that pass when it ran SDPA's CPU flash kernel.
            # A recomputation of the dense forward (gradient checkpointing, `fresh` False) attends every head again
            # too: its value is the full output, and it takes the same path and saves the same tensors.
            attend_all = rt.dense_forward or metric != "random"
            flash = self._flash_reuse(attend_all, x, attention_mask, dropout, extra)
            with torch.no_grad():
                if full_norm:
                    q_all, k_all, v_all = q_full.detach(), k_full.detach(), v_rows.full(x, v_masks)[0]
                else:
                    q_all, k_all, v_all = rows.full(x, masks)  # (B, T, H*hd), (B, T, n_kv*hd) x2
                if attend_all:
                    qh, kh = self._heads(q_all, k_all, cos, sin)  # (B, H, T, hd), (B, n_kv, T, hd)
                    vh = v_all.view(B, T, -1, hd).transpose(1, 2)
                    if flash is not None:  # K/V as they are where the kernel takes them grouped
                        kr, vr = kh, vh
                        if self.rep > 1 and flash.kind not in GROUPED_KV_KINDS:
                            kr, vr = kh.repeat_interleave(self.rep, 1), vh.repeat_interleave(self.rep, 1)
                        r = self._attend_with_lse(flash, qh, kr, vr)
                        del kr, vr
                        if r is None:
                            flash = None
                        else:
                            o_all, lse_all, attn_extra = r
                    if flash is None:
                        o_all, _ = attend(_GroupsView(base, self.rep), qh, kh, vh, attention_mask,
                                          dropout=0.0, scaling=base.scaling, **extra)  # (B, T, H, hd)
                    del qh, kh, vh
                if fresh:
                    scores = None
                    if metric != "random":
                        scores = rt.head_scores(o_all, mask, metric, op.weight)
                        if rt.config.attn_unit == "kv_group":
                            scores = group_scores(scores, self.n_kv)
                    units = sel.choose(k, scores, x.device)
                heads, groups, kv_map = self._expand(units)
                qcols, kvcols = head_columns(heads, hd), head_columns(groups, hd)
                if rt.dense_forward:  # the output projection over every head: 2 N d d_attn FLOPs
                    y_all = op.full_once(o_all.reshape(B, T, -1), o_masks)
                if flash is not None:  # (B, T, h_kept, hd) and (B, h_kept, T)
                    o_kept, lse_kept = o_all.index_select(2, heads), lse_all.index_select(1, heads)
                    del lse_all
                if attend_all:
                    del o_all
                v_k = _select_heads(v_all, groups, hd)
                if not full_norm:
                    q_k, k_k = _select_heads(q_all, heads, hd), _select_heads(k_all, groups, hd)
                del q_all, k_all, v_all
            if full_norm:
                (val,) = v_rows.kept(x, [kvcols], [v_k], v_masks)
                q, key = _select_heads(q_full, heads, hd), _select_heads(k_full, groups, hd)
            else:
                q, key, val = rows.kept(x, [qcols, kvcols, kvcols], [q_k, k_k, v_k], masks)

        q, key = self._heads(q, key, cos, sin)  # (B, h_kept, T, hd), (B, g_kept, T, hd)
        val = val.view(B, T, -1, hd).transpose(1, 2)
        if kv_map is None:
            groups_per_kv = self.rep if rt.config.attn_unit == "kv_group" else 1
        else:
            key, val, groups_per_kv = key.index_select(1, kv_map), val.index_select(1, kv_map), 1
        if flash is not None:  # K/V per query head, unless the kernel takes them grouped (kv_group: regular groups)
            if groups_per_kv > 1 and flash.kind not in GROUPED_KV_KINDS:
                key, val = key.repeat_interleave(groups_per_kv, 1), val.repeat_interleave(groups_per_kv, 1)
                groups_per_kv = 1
            if recompute_flash:
                with torch.no_grad():
                    r = self._attend_with_lse(flash, q, key, val)
                if r is None:
                    flash = None
                else:
                    o_kept, lse_kept, attn_extra = r
        if flash is not None:
            if flash.dtype is not None:  # as SDPA casts under autocast (the gradients flow back through the casts)
                q, key, val = q.to(flash.dtype), key.to(flash.dtype), val.to(flash.dtype)
            o = kept_attention(q, key, val, o_kept, lse_kept, flash.mask, flash.is_causal, base.scaling,
                               flash.kind, attn_extra)
        else:
            o, _ = attend(_GroupsView(base, groups_per_kv), q, key, val, attention_mask,
                          dropout=dropout, scaling=base.scaling, **extra)  # (B, T, h_kept, hd)
        if fresh and sel.use_history():
            with torch.no_grad():
                cols = op.weight.detach().index_select(1, qcols) if metric == "output" else None
                obs = rt.head_scores(o.detach(), mask, metric, cols)
                if rt.config.attn_unit == "kv_group":
                    obs = group_scores(obs, obs.shape[0] // self.rep)
                sel.observe(units, obs)
        return col_project(o.reshape(B, T, -1), op, qcols, heads, hd, o_masks, out=y_all)  # (B, T, d)
