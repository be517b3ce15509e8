"""SATAttention and SATMLP: wrappers that hold the original module as `base_layer`.

The first branch of every forward is the dense path: the base layer itself, untouched. The sparse path
runs only in training, while SAT is enabled and the scheduled rate omits at least one unit.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import SATConfig
from ..core.importance import group_scores, head_scores, mlp_scores
from ..core.ops import (additive_mask, col_linear, flash_attention_cpu, flash_cpu_available, head_columns,
                        kept_attention, rope, row_linears, same_rope, swiglu_mlp)
from ..core.selection import select_units, uniform
from ..distributed import reduce_scores
from ..schedules import kept_count, scheduled_rates
from .adapters import SATAdapter, get_path, model_module_function

BASE_PREFIX = "base_layer."


class SATRuntime:
    """State shared by all wrapped layers of one model: config, schedule position, the current batch."""

    def __init__(self, config: SATConfig, adapter: SATAdapter):
        self.config = config
        self.adapter = adapter
        self.enabled = True
        self.step = 0
        self.total_steps: int | None = None
        self.attn_rate, self.mlp_rate = scheduled_rates(config, 0, None)
        # Incremented once per training forward of the model. A layer that sees the same id twice is being
        # recomputed (gradient checkpointing) and must reuse its selection.
        self.forward_id = 0
        self.token_mask: torch.Tensor | None = None  # (B, T) of the current batch, 1 = real token
        # (forward id, attention mask, dtype, its additive form): every layer of a forward gets the same mask,
        # which paper mode's flash path converts once per forward.
        self.mask_cache: tuple | None = None

    def set_step(self, step: int, total_steps: int | None) -> None:
        self.step, self.total_steps = int(step), (int(total_steps) if total_steps else None)
        self.attn_rate, self.mlp_rate = scheduled_rates(self.config, self.step, self.total_steps)

    def begin_forward(self, attention_mask) -> None:
        self.forward_id += 1
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            self.token_mask = attention_mask
        else:
            self.token_mask = None

    def mask_for(self, x: torch.Tensor) -> torch.Tensor | None:
        m = self.token_mask
        if m is None or tuple(m.shape) != tuple(x.shape[:2]):
            return None
        return m


def _kept_linears(x: torch.Tensor, linears: list[nn.Linear], idxs: list[torch.Tensor], outs=None):
    """Projections `linears` of x restricted to the kept output features idxs (outs: already computed)."""
    return row_linears(x, [m.weight for m in linears], idxs, [m.bias for m in linears], outs)


def _kept_cols(linear: nn.Linear, idx: torch.Tensor, metric: str):
    """The kept input columns of a down/output projection, for the `output` metric only (no autograd)."""
    return linear.weight.detach().index_select(1, idx) if metric == "output" else None


def _strip_base_prefix(module, state_dict, prefix, local_metadata):
    # Checkpoints of a patched model keep the plain architecture's names.
    for key in [k for k in state_dict if k.startswith(prefix + BASE_PREFIX)]:
        state_dict[prefix + key[len(prefix) + len(BASE_PREFIX):]] = state_dict.pop(key)


def _add_base_prefix(module, state_dict, prefix, *args):
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + BASE_PREFIX)]:
        state_dict[prefix + BASE_PREFIX + key[len(prefix):]] = state_dict.pop(key)


class _SATModule(nn.Module):
    component = ""  # "attn" or "mlp"

    def __init__(self, base_layer: nn.Module, runtime: SATRuntime, layer_idx: int, n_units: int):
        super().__init__()
        self.base_layer = base_layer
        self.sat_runtime = runtime
        self.sat_layer_idx = layer_idx
        self.sat_n_units = n_units
        salt = 0 if self.component == "attn" else 1
        self._seed = (runtime.config.seed * 1_000_003 + layer_idx * 2 + salt) % (2**63)
        self._generator: torch.Generator | None = None
        self._cache_id = -1
        self._cache: tuple[int, torch.Tensor] | None = None
        self._path_id, self._path_history = -1, False
        self.sat_history: torch.Tensor | None = None  # running importance per unit (history source)
        self.sat_age: torch.Tensor | None = None  # steps since each unit was last observed
        self.sat_last_kept: torch.Tensor | None = None
        self.sat_last_scores: torch.Tensor | None = None
        self.register_state_dict_post_hook(_strip_base_prefix)
        self.register_load_state_dict_pre_hook(_add_base_prefix)

    def _fqn_modifiers(self) -> dict[str, str]:
        """State-dict names of the base layer's members skip `base_layer.`: torch.distributed.checkpoint
        (FSDP2 state dicts, as accelerate saves them) maps such names back to modules through this hook."""
        base = self.base_layer
        names = [n for n, _ in base.named_children()] + [n for n, _ in base.named_parameters(recurse=False)]
        names += [n for n, _ in base.named_buffers(recurse=False)]
        return {name: "base_layer" for name in names}

    # -- shared machinery -------------------------------------------------------------------------------
    def base_layer_device(self) -> torch.device:
        return next(self.base_layer.parameters()).device

    def _rate(self) -> float:
        rt = self.sat_runtime
        return rt.attn_rate if self.component == "attn" else rt.mlp_rate

    def _kept_k(self) -> int | None:
        """Number of kept units when this forward runs sparse, else None (dense)."""
        rt = self.sat_runtime
        if not (self.training and rt.enabled):
            return None
        k = kept_count(self.sat_n_units, self._rate())
        if k >= self.sat_n_units:
            self.sat_last_kept = None  # this forward runs dense: every unit is kept
            return None
        return k

    def generator(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device.type != torch.device(device).type:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self._seed)
        return self._generator

    def _cached(self, k: int) -> torch.Tensor | None:
        if self._cache_id == self.sat_runtime.forward_id and self._cache is not None and self._cache[0] == k:
            return self._cache[1]
        return None

    def _use_history(self) -> bool:
        """Select from history statistics in this forward? Fixed per forward, so that a recomputation
        (gradient checkpointing) takes the same path even though the first pass seeded the statistics."""
        rt = self.sat_runtime
        if self._path_id != rt.forward_id:
            self._path_id = rt.forward_id
            self._path_history = rt.config.source == "history" and self.sat_history is not None
        return self._path_history

    def _choose(self, k: int, scores: torch.Tensor, device) -> torch.Tensor:
        cfg = self.sat_runtime.config
        if cfg.metric == "random":
            scores = uniform(self.sat_n_units, self.generator(device))
        scores = reduce_scores(scores, cfg.metric)
        idx = select_units(scores, k, cfg.selection, self.generator(device))
        self._cache_id, self._cache = self.sat_runtime.forward_id, (k, idx)
        self.sat_last_kept, self.sat_last_scores = idx, scores.detach()
        if cfg.source == "history" and self.sat_history is None:
            # First sparse forward in history mode observes every unit (current path) to seed the statistics.
            self.sat_history = scores.detach().float().clone()
            self.sat_age = torch.zeros_like(self.sat_history)
        return idx

    def _history_scores(self) -> torch.Tensor:
        cfg = self.sat_runtime.config
        if cfg.history_exploration > 0:
            # The score of an unobserved unit doubles every `history_exploration` steps, so any unit
            # overtakes the kept ones within log2(score ratio) doublings and is observed again.
            return self.sat_history * torch.exp2((self.sat_age / cfg.history_exploration).clamp_max(60.0))
        return self.sat_history

    def _observe(self, idx: torch.Tensor, observed: torch.Tensor) -> None:
        """history: fold this step's scores of the kept units into the running statistics (once per forward)."""
        decay = self.sat_runtime.config.history_decay
        observed = reduce_scores(observed.detach().float(), self.sat_runtime.config.metric)
        old = self.sat_history.index_select(0, idx)
        self.sat_history.index_copy_(0, idx, decay * old + (1.0 - decay) * observed)
        self.sat_age.add_(1.0).index_fill_(0, idx, 0.0)


class SATMLP(_SATModule):
    """Gated MLP over kept channels only: Y = (act(X Wg_k^T) * X Wu_k^T) Wd_k^T."""

    component = "mlp"

    def __init__(self, base_layer: nn.Module, runtime: SATRuntime, layer_idx: int):
        ad = runtime.adapter
        n = get_path(base_layer, ad.gate).out_features
        super().__init__(base_layer, runtime, layer_idx, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self._kept_k()
        if k is None:
            return self.base_layer(x)
        ad, base = self.sat_runtime.adapter, self.base_layer
        gate, up, down = get_path(base, ad.gate), get_path(base, ad.up), get_path(base, ad.down)
        act = base.act_fn
        fused = _is_silu(act)  # one function for the whole MLP, that saves only x and the kept gate/up outputs
        metric = self.sat_runtime.config.metric
        mask = self.sat_runtime.mask_for(x)
        if self._use_history():
            idx = self._cached(k)
            fresh = idx is None
            if fresh:
                idx = self._choose(k, self._history_scores(), x.device)
            if fused:
                y, h = swiglu_mlp(x, idx, gate, up, down)
            else:
                g, u = _kept_linears(x, [gate, up], [idx, idx])  # (B, T, k) each
                h = act(g) * u
                y = col_linear(h, down.weight, idx, down.bias)
            if fresh:
                with torch.no_grad():
                    self._observe(idx, mlp_scores(h.detach(), mask, metric, _kept_cols(down, idx, metric)))
            return y

        dense_forward = self.sat_runtime.config.forward == "dense"
        with torch.no_grad():
            if fused:  # channels first, (f, N), so that the kept channels are whole rows to copy
                g_all, u_all = _linear_t(x, gate), _linear_t(x, up)
            else:
                g_all, u_all = gate(x), up(x)  # (B, T, f): every channel, to score them
            idx = self._cached(k)
            h_all = None
            if dense_forward or (idx is None and metric != "random"):
                h_all = act(g_all).mul_(u_all)
            if idx is None:
                scores = None
                if metric != "random":
                    if fused:  # scored from a (B, T, f) view; the kept rows are handed to the MLP below
                        scores = mlp_scores(h_all.t().reshape(*x.shape[:-1], -1), mask, metric, down.weight)
                    else:
                        scores = mlp_scores(h_all, mask, metric, down.weight, scratch=not dense_forward)
                idx = self._choose(k, scores, x.device)
            y_all = None
            if dense_forward:  # the output over every channel: 2 N d f FLOPs
                y_all = (torch.mm(h_all.t(), down.weight.t()) if fused else h_all @ down.weight.t())
                if down.bias is not None:
                    y_all += down.bias
            if fused:  # (N, k) views of (k, N)
                g_k, u_k = g_all.index_select(0, idx).t(), u_all.index_select(0, idx).t()
                h_k = h_all.index_select(0, idx).t() if h_all is not None else None
            else:
                g_k, u_k = _select_last(g_all, idx), _select_last(u_all, idx)  # (B, T, k)
            del g_all, u_all, h_all
        if fused:
            return swiglu_mlp(x, idx, gate, up, down, g_k, u_k, h_k, y_all)[0]
        g, u = _kept_linears(x, [gate, up], [idx, idx], [g_k, u_k])
        return col_linear(act(g) * u, down.weight, idx, down.bias, out=y_all)


def _linear_t(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """linear(x) transposed and contiguous: (out_features, N) for x (..., in_features). The GEMM costs the same
    either way round; a kept subset of output features is then a row gather (~6x faster on the CPU than the
    same columns of (N, out_features))."""
    x2 = x.reshape(-1, x.shape[-1])
    w = linear.weight
    if linear.bias is None:
        return torch.mm(w, x2.t())
    return torch.addmm(linear.bias[:, None], w, x2.t())


def _select_last(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t[..., idx] for a contiguous t. (On the CPU, index_select along the last dim of a 3-d tensor is ~20x
    slower than along dim 1 of the same data viewed as 2-d.)"""
    return t.reshape(-1, t.shape[-1]).index_select(1, idx).reshape(*t.shape[:-1], idx.shape[0])


def _select_heads(t: torch.Tensor, heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The features of whole heads of a contiguous (B, T, H*hd): (B, T, h*hd), copied a head at a time (about 4x
    faster on the CPU than selecting the same h*hd columns one by one)."""
    B, T = t.shape[:2]
    return t.reshape(B * T, -1, head_dim).index_select(1, heads).view(B, T, -1)


def _is_silu(act) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU")


class _GroupsView:
    """The attention module as the attention function sees it, with a different KV repeat factor."""

    def __init__(self, base: nn.Module, groups: int):
        self._base, self.num_key_value_groups = base, groups

    def __getattr__(self, name):
        return getattr(self._base, name)


_ATTN_ARGS = ("hidden_states", "position_embeddings", "attention_mask")


class SATAttention(_SATModule):
    """Self-attention over kept query heads (attn_unit=head) or kept KV groups (attn_unit=kv_group)."""

    component = "attn"

    def __init__(self, base_layer: nn.Module, runtime: SATRuntime, layer_idx: int):
        cfg = base_layer.config
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = base_layer.head_dim
        self.rep = self.n_heads // self.n_kv
        n = self.n_heads if runtime.config.attn_unit == "head" else self.n_kv
        super().__init__(base_layer, runtime, layer_idx, n)
        self._rope = model_module_function(base_layer, "apply_rotary_pos_emb")
        if same_rope(self._rope, self.head_dim):  # satlm's own kernels for the same computation (core/ops.py)
            self._rope = rope
        self._eager = model_module_function(base_layer, "eager_attention_forward")

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
        group_of = torch.div(units, self.rep, rounding_mode="floor")
        groups = torch.unique(group_of)  # sorted; a host sync (the kept-group count sets K/V shapes)
        return units, groups, torch.searchsorted(groups, group_of)

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
        return self._sparse_forward(k, named["hidden_states"], named["position_embeddings"],
                                    named.get("attention_mask"), kwargs)

    def _flash_reuse(self, attend_all, x, attention_mask, dropout, kwargs):
        """(additive mask, is_causal) when paper mode can take the kept heads' attention from its pass over every
        head (attend_all: scoring, or forward=dense): SDPA on the CPU, which runs PyTorch's flash kernel; else None
        (the kept heads are attended again)."""
        base = self.base_layer
        if not (attend_all and x.device.type == "cpu"
                and base.config._attn_implementation == "sdpa" and dropout == 0.0 and flash_cpu_available()
                and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
                and not torch.is_autocast_enabled("cpu")
                and kwargs.get("softcap") is None and kwargs.get("position_bias") is None
                and not kwargs.get("output_attentions", False)):
            return None
        if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4):
            return None
        is_causal = kwargs.get("is_causal")
        is_causal = getattr(base, "is_causal", True) if is_causal is None else is_causal
        is_causal = bool(x.shape[1] > 1 and attention_mask is None and is_causal)
        rt, cache = self.sat_runtime, self.sat_runtime.mask_cache
        if not (cache and cache[0] == rt.forward_id and cache[1] is attention_mask and cache[2] == x.dtype):
            rt.mask_cache = cache = (rt.forward_id, attention_mask, x.dtype, additive_mask(attention_mask, x.dtype))
        return cache[3], is_causal

    def _sparse_forward(self, k, x, position_embeddings, attention_mask, kwargs):
        rt, base = self.sat_runtime, self.base_layer
        ad = rt.adapter
        qp, kp, vp, op = (get_path(base, n) for n in (ad.q, ad.k, ad.v, ad.o))
        cos, sin = position_embeddings
        B, T = x.shape[:2]
        hd, metric = self.head_dim, rt.config.metric
        attend = self._attention_function()
        extra = {**kwargs, **ad.attn_kwargs(base)}
        dropout = base.attention_dropout if self.training else 0.0
        mask = rt.mask_for(x)
        units = self._cached(k)
        fresh = units is None
        flash = None  # paper mode only: see _flash_reuse
        y_all = None  # paper mode with forward=dense: the output over every head

        if self._use_history():
            if fresh:
                units = self._choose(k, self._history_scores(), x.device)
            heads, groups, kv_map = self._expand(units)
            qcols, kvcols = head_columns(heads, hd), head_columns(groups, hd)
            q, key, val = _kept_linears(x, [qp, kp, vp], [qcols, kvcols, kvcols])
        else:
            # Every head is attended without autograd to score the heads (and, forward=dense, for the output);
            # the kept heads' outputs are taken from that pass when it ran SDPA's CPU flash kernel.
            dense_forward = rt.config.forward == "dense"
            attend_all = dense_forward or (fresh and metric != "random")
            flash = self._flash_reuse(attend_all, x, attention_mask, dropout, kwargs)
            with torch.no_grad():
                q_all, k_all, v_all = qp(x), kp(x), vp(x)  # (B, T, H*hd), (B, T, n_kv*hd) x2
                if attend_all:
                    qh = q_all.view(B, T, -1, hd).transpose(1, 2)  # (B, H, T, hd)
                    kh = k_all.view(B, T, -1, hd).transpose(1, 2)  # (B, n_kv, T, hd)
                    qh, kh = self._rope(qh, kh, cos, sin)
                    vh = v_all.view(B, T, -1, hd).transpose(1, 2)
                    if flash is not None:
                        if self.rep > 1:
                            kh, vh = kh.repeat_interleave(self.rep, 1), vh.repeat_interleave(self.rep, 1)
                        o_all, lse_all = flash_attention_cpu(qh, kh, vh, flash[0], flash[1], base.scaling)
                    else:
                        o_all, _ = attend(_GroupsView(base, self.rep), qh, kh, vh, attention_mask,
                                          dropout=0.0, scaling=base.scaling, **extra)  # (B, T, H, hd)
                    del qh, kh, vh
                if fresh:
                    scores = None
                    if metric != "random":
                        scores = head_scores(o_all, mask, metric, op.weight)
                        if rt.config.attn_unit == "kv_group":
                            scores = group_scores(scores, self.n_kv)
                    units = self._choose(k, scores, x.device)
                heads, groups, kv_map = self._expand(units)
                qcols, kvcols = head_columns(heads, hd), head_columns(groups, hd)
                q_k = _select_heads(q_all, heads, hd)
                k_k, v_k = _select_heads(k_all, groups, hd), _select_heads(v_all, groups, hd)
                if dense_forward:  # the output projection over every head: 2 N d d_attn FLOPs
                    y_all = F.linear(o_all.reshape(B, T, -1), op.weight, op.bias)
                if flash is not None:  # (B, T, h_kept, hd) and (B, h_kept, T)
                    o_kept, lse_kept = o_all.index_select(2, heads), lse_all.index_select(1, heads)
                    del lse_all
                if attend_all:
                    del o_all
                del q_all, k_all, v_all
            q, key, val = _kept_linears(x, [qp, kp, vp], [qcols, kvcols, kvcols], [q_k, k_k, v_k])

        q = q.view(B, T, -1, hd).transpose(1, 2)  # (B, h_kept, T, hd)
        key = key.view(B, T, -1, hd).transpose(1, 2)  # (B, g_kept, T, hd)
        val = val.view(B, T, -1, hd).transpose(1, 2)
        q, key = self._rope(q, key, cos, sin)
        if kv_map is None:
            groups_per_kv = self.rep if rt.config.attn_unit == "kv_group" else 1
        else:
            key, val, groups_per_kv = key.index_select(1, kv_map), val.index_select(1, kv_map), 1
        if flash is not None:
            if groups_per_kv > 1:
                key, val = key.repeat_interleave(groups_per_kv, 1), val.repeat_interleave(groups_per_kv, 1)
            o = kept_attention(q, key, val, o_kept, lse_kept, flash[0], flash[1], base.scaling)
        else:
            o, _ = attend(_GroupsView(base, groups_per_kv), q, key, val, attention_mask,
                          dropout=dropout, scaling=base.scaling, **extra)  # (B, T, h_kept, hd)
        if fresh and self._use_history():
            with torch.no_grad():
                obs = head_scores(o.detach(), mask, metric, _kept_cols(op, qcols, metric))
                if rt.config.attn_unit == "kv_group":
                    obs = group_scores(obs, obs.shape[0] // self.rep)
                self._observe(units, obs)
        return col_linear(o.reshape(B, T, -1), op.weight, heads, op.bias, hd, out=y_all), None  # (B, T, d)
