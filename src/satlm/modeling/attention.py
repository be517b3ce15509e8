"""SATAttention: self-attention over kept query heads (attn_unit=head) or kept KV groups (attn_unit=kv_group).

A sparse forward takes one of three paths, chosen once per forward (`_sparse`), each a straight function over
the same steps: select the units -> project the kept heads' q/k/v (`_QKV` / `_FullNormQKV`: a hook of the
layout) -> heads (view, q/k norm, RoPE: `_heads`, one function for every pass) -> attend the kept heads
(`_attend_kept`) -> the output projection over the kept heads' columns (`_out`).

- `_history`: the kept heads come from statistics of earlier steps, before the forward: every projection and the
  attention core run over the kept heads only.
- `_paper` (source: current): every head is projected and attended without autograd to score the heads; with
  `forward: dense` that pass's output projection over every head is the value returned. The kept heads are then
  re-attached to the graph with a kept-only backward; their attention is taken from the pass over every head where
  that pass ran a kernel returning the log-sum-exp (`_reuse`, core/ops.py), else they are attended again.
- `_recompute`: gradient checkpointing's second forward of the thinned paper path: the kept heads are known, so
  only they are projected (and, where the first pass reused a kernel's output, that kernel runs over them, so that
  the same tensors are saved).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.importance import group_scores
from ..core.ops import (EFFICIENT_BIAS_ALIGN, GROUPED_KV_KINDS, attention_with_lse, count_reuse, head_columns,
                        kept_attention, reuse_kernel, rope, same_rope)
from .base import _SATModule
from .families import get_path, model_module_function
from .proj import Proj, Rows, col_project, parts_key
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


# -- q, k and v of the heads: a hook of the layout ------------------------------------------------------------
class _QKV:
    """q, k, v as separate or fused projections whose rows slice with the heads."""

    full_width = False

    def __init__(self, rows: Rows, x: torch.Tensor, masks, head_dim: int):
        self.rows, self.x, self.masks, self.hd = rows, x, masks, head_dim

    def all(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every head, for scoring (called without autograd): (B, T, H*hd), (B, T, n_kv*hd) x2."""
        return tuple(self.rows.full(self.x, self.masks))

    def kept(self, heads, groups, every=None) -> list[torch.Tensor]:
        """The kept heads' q and the kept groups' k, v with a kept-rows backward; every: all()'s tensors, whose
        kept slices are then the values (paper mode), else they are computed here."""
        hd = self.hd
        outs = None
        if every is not None:
            q_all, k_all, v_all = every
            outs = [_select_heads(q_all, heads, hd), _select_heads(k_all, groups, hd), _select_heads(v_all, groups, hd)]
        qcols, kvcols = head_columns(heads, hd), head_columns(groups, hd)
        return self.rows.kept(self.x, [qcols, kvcols, kvcols], outs, self.masks)


class _FullNormQKV(_QKV):
    """A q/k norm over the whole projection (OLMo-2/3) couples the heads: q and k are projected and normed at full
    width with autograd (their backward is dense); v and everything after run over the kept heads."""

    full_width = True

    def __init__(self, rows: Rows, x, masks, head_dim: int, q_norm: nn.Module, k_norm: nn.Module, n_kv: int):
        super().__init__(rows, x, masks, head_dim)
        self.q_full = q_norm(rows.projs[0].full(x, masks[0]))  # (B, T, H*hd)
        self.k_full = k_norm(rows.projs[1].full(x, masks[1]))  # (B, T, n_kv*hd)
        self.v_rows, self.v_masks = Rows(rows.projs[2:], [(0, 0, n_kv * head_dim)]), masks[2:]

    def all(self):
        return self.q_full.detach(), self.k_full.detach(), self.v_rows.full(self.x, self.v_masks)[0]

    def kept(self, heads, groups, every=None):
        outs = None if every is None else [_select_heads(every[2], groups, self.hd)]
        (v,) = self.v_rows.kept(self.x, [head_columns(groups, self.hd)], outs, self.v_masks)
        return [_select_heads(self.q_full, heads, self.hd), _select_heads(self.k_full, groups, self.hd), v]


@dataclass
class _Step:
    """What every step of one sparse forward needs."""

    x: torch.Tensor  # (B, T, d)
    cos: torch.Tensor
    sin: torch.Tensor
    attention_mask: Any
    token_mask: torch.Tensor | None  # (B, T), 1 = a real token (for the scores)
    extra: dict  # the family's extra attention arguments and the caller's
    dropout: float
    attend: Callable  # the model's attention function
    qkv: _QKV
    op: Proj  # o_proj
    o_masks: list  # o_proj's LoRA dropout masks


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
        self.where = f"layers[{layer_idx}].{runtime.layout.attn}"
        # The family's functions. Since transformers 5.25 some are modules wrapping a function (hub kernels): kept
        # out of the module tree, which this wrapper shares with the base module (they would become its children).
        vars(self)["_model_rope"] = model_module_function(base_layer, "apply_rotary_pos_emb")
        vars(self)["_eager"] = model_module_function(base_layer, "eager_attention_forward")
        # satlm's own kernels where they compute the same (core/ops.py), over the whole head (not partial rotary)
        self._same_rope = same_rope(self._model_rope, self.head_dim)
        lay = runtime.layout
        self._proj_names = [n for n in (lay.q, lay.k, lay.v, lay.qkv, lay.o) if n]
        self._parts_cache: tuple | None = None

    # -- the layout's pieces: built once, again only when a projection module changed (LoRA injected after SAT,
    # an adapter switched off or merged) --
    def _parts(self) -> tuple[Rows, Proj]:
        lay, base, hd = self.sat_runtime.layout, self.base_layer, self.head_dim
        key = parts_key(base, self._proj_names)
        if self._parts_cache is None or self._parts_cache[0] != key:
            rows = Rows.of(base, [lay.q, lay.k, lay.v], lay.qkv, [self.n_heads * hd, self.n_kv * hd, self.n_kv * hd],
                           self.where)
            self._parts_cache = (key, rows, Proj(get_path(base, lay.o), f"{self.where}.{lay.o}"))
        return self._parts_cache[1], self._parts_cache[2]

    def _attention_function(self):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        impl = self.base_layer.config._attn_implementation
        if impl in (None, "eager"):
            return self._eager
        if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
            return ALL_ATTENTION_FUNCTIONS.get_interface(impl, self._eager)
        return ALL_ATTENTION_FUNCTIONS[impl]

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

    # -- the paths ------------------------------------------------------------------------------------------
    def _sparse(self, k: int, x, position_embeddings, attention_mask, kwargs) -> torch.Tensor:
        """The path of this forward (module doc), chosen once."""
        s = self._step(x, position_embeddings, attention_mask, kwargs)
        sel = self.sat_selector
        if sel.use_history():
            return self._history(s, k)
        units = sel.cached(k)
        if units is not None and not self.sat_runtime.dense_forward and not s.qkv.full_width:
            return self._recompute(s, units)
        return self._paper(s, k, self.sat_runtime.dense_forward)

    def _history(self, s: _Step, k: int) -> torch.Tensor:
        sel = self.sat_selector
        units = sel.cached(k)
        fresh = units is None
        if fresh:
            units = sel.choose_from_history(k, s.x.device)
        heads, groups, kv_map = self._expand(units)
        q, key, val = s.qkv.kept(heads, groups)
        o = self._attend_kept(s, q, key, val, kv_map, None)  # (B, T, h_kept, hd)
        if fresh:
            self._observe(s, units, heads, o)
        return self._out(s, o, heads)

    def _recompute(self, s: _Step, units: torch.Tensor) -> torch.Tensor:
        heads, groups, kv_map = self._expand(units)
        q, key, val = s.qkv.kept(heads, groups)
        reuse = self._reuse(s, self.sat_runtime.config.metric != "random")
        return self._out(s, self._attend_kept(s, q, key, val, kv_map, reuse), heads)

    def _paper(self, s: _Step, k: int, dense: bool) -> torch.Tensor:
        # The pass over every head scores them (all but the random metric) and, forward=dense, is the output.
        attend_all = dense or self.sat_runtime.config.metric != "random"
        reuse = self._reuse(s, attend_all)
        kept = y_all = None
        with torch.no_grad():
            every = s.qkv.all()
            o_all = None
            if attend_all:
                o_all, kept, reuse = self._attend_all(s, *every, reuse)  # (B, T, H, hd)
            units = self._choose(s, k, o_all)
            heads, groups, kv_map = self._expand(units)
            if dense:  # the output projection over every head: 2 N d d_attn FLOPs
                y_all = s.op.full_once(o_all.reshape(*s.x.shape[:2], -1), s.o_masks)
            if reuse is not None:  # the kept heads' (B, T, h_kept, hd) outputs and (B, h_kept, T) log-sum-exps
                kept = (o_all.index_select(2, heads), kept[0].index_select(1, heads), kept[1])
            del o_all
        q, key, val = s.qkv.kept(heads, groups, every)
        del every
        return self._out(s, self._attend_kept(s, q, key, val, kv_map, reuse, kept), heads, y_all)

    # -- the steps ------------------------------------------------------------------------------------------
    def _step(self, x, position_embeddings, attention_mask, kwargs) -> _Step:
        rt, base, lay = self.sat_runtime, self.base_layer, self.sat_runtime.layout
        rows, op = self._parts()
        # LoRA dropout masks, drawn as peft draws them: q, k, v, then o (exact while attention dropout is 0)
        masks = rows.masks(x, self.training)
        o_masks = op.masks((*x.shape[:2], self.n_heads * self.head_dim), x, self.training)
        rows.prepare(x, masks)
        if lay.qk_norm == "full":
            qkv = _FullNormQKV(rows, x, masks, self.head_dim, get_path(base, lay.q_norm), get_path(base, lay.k_norm),
                               self.n_kv)
        else:
            qkv = _QKV(rows, x, masks, self.head_dim)
        cos, sin = position_embeddings
        return _Step(x, cos, sin, attention_mask, rt.mask_for(x), {**kwargs, **lay.attn_kwargs(base)},
                     base.attention_dropout if self.training else 0.0, self._attention_function(), qkv, op, o_masks)

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

    def _choose(self, s: _Step, k: int, o_all: torch.Tensor | None) -> torch.Tensor:
        """The kept units: this forward's (a recomputation), else by the scores of every head's output."""
        rt, sel = self.sat_runtime, self.sat_selector
        units = sel.cached(k)
        if units is not None:
            return units
        scores = None
        if rt.config.metric != "random":
            scores = rt.head_scores(o_all, s.token_mask, rt.config.metric, s.op.weight)
            if rt.config.attn_unit == "kv_group":
                scores = group_scores(scores, self.n_kv)
        return sel.choose(k, scores, s.x.device)

    def _observe(self, s: _Step, units, heads, o) -> None:
        """history: fold the kept units' scores of this step into the statistics."""
        rt = self.sat_runtime
        with torch.no_grad():
            metric = rt.config.metric
            cols = s.op.weight.detach().index_select(1, head_columns(heads, self.head_dim)) if metric == "output" \
                else None
            obs = rt.head_scores(o.detach(), s.token_mask, metric, cols)
            if rt.config.attn_unit == "kv_group":
                obs = group_scores(obs, obs.shape[0] // self.rep)
            self.sat_selector.observe(units, obs)

    def _heads(self, q, k, cos, sin):
        """(B, T, h*hd) q and k -> (B, h, T, hd), normed and rotated as the family does (a full-width q/k norm
        was applied before the heads were taken: _FullNormQKV)."""
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

    def _attend_all(self, s: _Step, q_all, k_all, v_all, reuse: _Reuse | None):
        """Every head attended (no autograd): (output (B, T, H, hd), (log-sum-exp, kernel extra) or None, reuse
        or None where the kernel refused these inputs)."""
        B, T = s.x.shape[:2]
        qh, kh = self._heads(q_all, k_all, s.cos, s.sin)  # (B, H, T, hd), (B, n_kv, T, hd)
        vh = v_all.view(B, T, -1, self.head_dim).transpose(1, 2)
        if reuse is not None:  # K/V as they are where the kernel takes them grouped
            kr, vr = kh, vh
            if self.rep > 1 and reuse.kind not in GROUPED_KV_KINDS:
                kr, vr = kh.repeat_interleave(self.rep, 1), vh.repeat_interleave(self.rep, 1)
            r = self._attend_with_lse(reuse, qh, kr, vr)
            if r is not None:
                return r[0], (r[1], r[2]), reuse
        o_all, _ = s.attend(_GroupsView(self.base_layer, self.rep), qh, kh, vh, s.attention_mask, dropout=0.0,
                            scaling=self.base_layer.scaling, **s.extra)
        return o_all, None, None

    def _attend_kept(self, s: _Step, q, key, val, kv_map, reuse: _Reuse | None, kept=None) -> torch.Tensor:
        """The kept heads' attention with autograd: (B, T, h_kept, hd). reuse: its forward (kept: (output,
        log-sum-exp, extra)) and backward are the kernel's; kept None: the kernel runs over the kept heads here."""
        B, T, base = s.x.shape[0], s.x.shape[1], self.base_layer
        q, key = self._heads(q, key, s.cos, s.sin)  # (B, h_kept, T, hd), (B, g_kept, T, hd)
        val = val.view(B, T, -1, self.head_dim).transpose(1, 2)
        if kv_map is None:
            per_kv = self.rep if self.sat_runtime.config.attn_unit == "kv_group" else 1
        else:
            key, val, per_kv = key.index_select(1, kv_map), val.index_select(1, kv_map), 1
        if reuse is not None and per_kv > 1 and reuse.kind not in GROUPED_KV_KINDS:  # K/V per query head
            key, val, per_kv = key.repeat_interleave(per_kv, 1), val.repeat_interleave(per_kv, 1), 1
        if reuse is not None and kept is None:
            with torch.no_grad():
                kept = self._attend_with_lse(reuse, q, key, val)
            reuse = reuse if kept is not None else None
        if reuse is None:
            o, _ = s.attend(_GroupsView(base, per_kv), q, key, val, s.attention_mask, dropout=s.dropout,
                            scaling=base.scaling, **s.extra)
            return o
        if reuse.dtype is not None:  # as SDPA casts under autocast (the gradients flow back through the casts)
            q, key, val = q.to(reuse.dtype), key.to(reuse.dtype), val.to(reuse.dtype)
        return kept_attention(q, key, val, kept[0], kept[1], reuse.mask, reuse.is_causal, base.scaling, reuse.kind,
                              kept[2])

    def _out(self, s: _Step, o: torch.Tensor, heads: torch.Tensor, y_all: torch.Tensor | None = None):
        """The output projection over the kept heads' columns; y_all: the value over every head (forward=dense)."""
        B, T = s.x.shape[:2]
        cols = head_columns(heads, self.head_dim)
        return col_project(o.reshape(B, T, -1), s.op, cols, heads, self.head_dim, s.o_masks, out=y_all)  # (B, T, d)

    # -- kernel reuse ---------------------------------------------------------------------------------------
    def _reusable(self, s: _Step) -> bool:
        """SDPA without dropout, soft-capping, a position bias or returned weights, and a 4-d mask or none: what
        the kernels that return the log-sum-exp compute."""
        extra, mask = s.extra, s.attention_mask
        plain = (self.base_layer.config._attn_implementation == "sdpa" and s.dropout == 0.0
                 and extra.get("softcap") is None and extra.get("position_bias") is None
                 and not extra.get("output_attentions", False))
        return plain and (mask is None or (isinstance(mask, torch.Tensor) and mask.dim() == 4))

    def _reuse(self, s: _Step, attend_all: bool) -> _Reuse | None:
        """How paper mode can take the kept heads' attention from its pass over every head (attend_all: scoring,
        or forward=dense): with SDPA, through a kernel that returns the log-sum-exp (ops.reuse_kernel: the CPU
        flash kernel; on CUDA flash or memory-efficient); None: the kept heads are attended again."""
        if not (attend_all and self._reusable(s)):
            return None
        base, x, extra, attention_mask = self.base_layer, s.x, s.extra, s.attention_mask
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

    def _attend_with_lse(self, reuse: _Reuse, q, k, v):
        """The reuse kernel's forward (q, k, v cast to the autocast dtype under autocast); None where a CUDA
        kernel refuses these inputs (the caller then attends as the model does)."""
        if reuse.dtype is not None:
            q, k, v = q.to(reuse.dtype), k.to(reuse.dtype), v.to(reuse.dtype)
        if reuse.kind == "cpu":
            return attention_with_lse("cpu", q, k, v, reuse.mask, reuse.is_causal, self.base_layer.scaling)
        try:
            r = attention_with_lse(reuse.kind, q, k, v, reuse.mask, reuse.is_causal, self.base_layer.scaling)
        except RuntimeError:
            count_reuse("fallback:forward")
            return None
        count_reuse(reuse.kind)
        return r
