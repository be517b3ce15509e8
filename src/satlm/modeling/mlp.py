"""SATMLP: the MLP over kept channels. Gated (gate/up, or one fused gate_up) or not (fc), any activation.

    gated:      Y = (act(X Wg_k^T) * X Wu_k^T) Wd_k^T        non-gated:  Y = act(X Wfc_k^T) Wd_k^T

A sparse forward takes one of three paths, chosen once per forward (`_sparse`):
- `_history`: the kept channels come from statistics of earlier steps; every projection runs over them only.
- `_paper` (source: current): every channel computed without autograd to score them (and, with `forward: dense`,
  for the output); the kept channels re-attached to the graph with a kept-only backward.
- a recomputation (gradient checkpointing) of the thinned paper forward: the kept channels are known, so only they
  are computed, as in history mode (the same tensors are saved as in the first pass).
How the kept channels are computed is chosen once per forward too: SiLU-gated MLPs without LoRA run as one
autograd function (core/ops.py swiglu_mlp) that saves x and the kept gate/up outputs only, channels first in
paper mode (`_FusedSwiGLU`); every other MLP is a kept-rows projection, the activation with autograd and a
kept-columns projection (`_Generic`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.importance import mlp_scores_rows
from ..core.ops import swiglu_mlp
from .base import _SATModule
from .families import get_path
from .proj import Proj, Rows, col_project, parts_key
from .runtime import SATRuntime


def _is_silu(act) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU")


def _select_last(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t[..., idx] for a contiguous t. (On the CPU, index_select along the last dim of a 3-d tensor is ~20x
    slower than along dim 1 of the same data viewed as 2-d.)"""
    return t.reshape(-1, t.shape[-1]).index_select(1, idx).reshape(*t.shape[:-1], idx.shape[0])


class _Generic:
    """Any MLP (gated or not, any activation, LoRA): a kept-rows projection, the activation, kept columns."""

    def __init__(self, rows: Rows, down: Proj, act, gated: bool, x: torch.Tensor, training: bool, n_units: int,
                 token_mask: torch.Tensor | None):
        self.rows, self.down, self.act, self.gated, self.x = rows, down, act, gated, x
        self.token_mask = token_mask  # (B, T) of x's rows, 1 = a real token (for the scores), or None
        self.masks = rows.masks(x, training)  # LoRA dropout, drawn as peft draws it: gate, up, then down
        self.down_masks = down.masks((*x.shape[:-1], n_units), x, training)
        rows.prepare(x, self.masks)

    def kept(self, idx: torch.Tensor, taken=None, y_all=None, scale=None):
        """(output, kept activations) over the kept channels; taken: take()'s kept slices of the pass over every
        channel, which are then the values (paper mode); y_all: the value over every channel (forward=dense);
        scale: (k,) weights of the kept channels' gradients (selection: unbiased, with y_all: the value is y_all's,
        so only the gradients through the down projection's input, and its weight's, are weighted)."""
        n = 2 if self.gated else 1
        parts = self.rows.kept(self.x, [idx] * n, taken, self.masks)
        h = self.act(parts[0]) * parts[1] if self.gated else self.act(parts[0])
        h_down = h if scale is None else h * scale.to(h.dtype)
        return col_project(h_down, self.down, idx, idx, 1, self.down_masks, out=y_all), h

    def take(self, idx, g_all, u_all, h_all):
        """The kept channels of the pass over every channel: [(B, T, k)] (g, and u when gated)."""
        return [_select_last(t, idx) for t in (g_all, u_all)[:2 if self.gated else 1]]

    def all_channels(self):
        """(g, u) over every channel without autograd ((B, T, f); u None for a non-gated MLP)."""
        out = self.rows.full(self.x, self.masks)
        return (out[0], out[1]) if self.gated else (out[0], None)

    def activations(self, g, u):
        return self.act(g).mul_(u) if self.gated else self.act(g)

    def scores(self, rt: SATRuntime, h, mask, metric: str, scratch: bool):
        return rt.mlp_scores(h, mask, metric, self.down.weight, scratch=scratch)

    def output_all(self, h):
        y = h @ self.down.weight.t()
        if self.down.bias is not None:
            y += self.down.bias
        if self.down.loras:
            y += self.down.lora_once(h, self.down_masks)
        return y


class _FusedSwiGLU(_Generic):
    """A SiLU-gated MLP without LoRA as one autograd function; paper mode computes its channels first, (f, N),
    so that the kept channels are whole rows to copy."""

    def kept(self, idx, taken=None, y_all=None, scale=None):
        weights, r, biases, _ = self.rows.spec([idx, idx])
        return swiglu_mlp(self.x, idx, weights, r, biases, self.down, *(taken or (None, None, None)), y_all, scale)

    def take(self, idx, g_all, u_all, h_all):
        """(g, u, h) of the kept channels: (N, k) views of (k, N) row copies (h None when not computed)."""
        h_k = h_all.index_select(0, idx).t() if h_all is not None else None
        return g_all.index_select(0, idx).t(), u_all.index_select(0, idx).t(), h_k

    def all_channels(self):
        return tuple(self.rows.full_t(self.x))  # (f, N) each

    def scores(self, rt, h, mask, metric, scratch):
        if mask is None and metric in ("l2", "output"):  # one read: a norm per row
            return mlp_scores_rows(h, metric, self.down.weight)
        return rt.mlp_scores(h.t().reshape(*self.x.shape[:-1], -1), mask, metric, self.down.weight)

    def output_all(self, h):
        y = torch.mm(h.t(), self.down.weight.t())
        if self.down.bias is not None:
            y += self.down.bias
        return y


class SATMLP(_SATModule):
    component = "mlp"

    def __init__(self, base_layer: nn.Module, runtime: SATRuntime, layer_idx: int):
        lay = runtime.layout
        down = get_path(base_layer, lay.down)
        super().__init__(base_layer, runtime, layer_idx, down.in_features)
        self.where = f"layers[{layer_idx}].{lay.mlp}"
        self._proj_names, self._gated = list(lay.mlp_projections()), lay.gated
        self._parts_cache: tuple | None = None

    # -- the layout's pieces: built once, again only when a projection module changed (see attention.py) --
    def _parts(self) -> tuple[Rows, Proj, nn.Module]:
        lay, base, f = self.sat_runtime.layout, self.base_layer, self.sat_n_units
        key = parts_key(base, self._proj_names)
        if self._parts_cache is None or self._parts_cache[0] != key:
            if lay.gated:
                rows = Rows.of(base, [lay.gate, lay.up], lay.gate_up, [f, f], self.where)
            else:
                rows = Rows.of(base, [lay.fc], None, [f], self.where)
            down = Proj(get_path(base, lay.down), f"{self.where}.{lay.down}")
            self._parts_cache = (key, rows, down)
        return self._parts_cache[1], self._parts_cache[2], getattr(base, lay.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self._kept_k()
        if k is None:
            return self.base_layer(x)
        y = self._sparse(k, x)
        p = getattr(self.base_layer, self.sat_runtime.layout.mlp_dropout or "", None)
        if p:
            y = F.dropout(y, p=p, training=self.training)
        return y

    # -- the paths ------------------------------------------------------------------------------------------
    def _compute(self, x: torch.Tensor, token_mask: torch.Tensor | None) -> _Generic:
        rows, down, act = self._parts()
        gated = self._gated
        fused = gated and _is_silu(act) and not rows.has_lora and not down.loras
        return (_FusedSwiGLU if fused else _Generic)(rows, down, act, gated, x, self.training, self.sat_n_units,
                                                     token_mask)

    def _sparse(self, k: int, x: torch.Tensor) -> torch.Tensor:
        split = self.sat_runtime.loss_rows_for(x)
        if split is not None:
            return self._loss_rows_dense(k, x, *split)
        return self._path(k, x, self.sat_runtime.mask_for(x))

    def _loss_rows_dense(self, k: int, x: torch.Tensor, loss_rows: torch.Tensor, other_rows: torch.Tensor):
        """loss_tokens_dense: the rows of tokens that carry loss run the base MLP over every channel (forward and
        backward); the other rows take this forward's path over the kept channels (scored on them alone)."""
        if other_rows.numel() == 0:
            return self.base_layer(x)
        if loss_rows.numel() == 0:
            return self._path(k, x, self.sat_runtime.mask_for(x))
        flat = x.reshape(-1, x.shape[-1])  # (N, d)
        mask = self.sat_runtime.mask_for(x)
        mask = mask.reshape(-1).index_select(0, other_rows)[None] if mask is not None else None
        y_other = self._path(k, flat.index_select(0, other_rows)[None], mask)[0]  # (N_other, d)
        y_loss = self.base_layer(flat.index_select(0, loss_rows))  # (N_loss, d)
        y = torch.zeros((flat.shape[0], y_other.shape[-1]), dtype=y_other.dtype, device=y_other.device)
        return y.index_copy(0, other_rows, y_other).index_copy(0, loss_rows, y_loss).view(*x.shape[:-1], -1)

    def _path(self, k: int, x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
        """The path of this forward (module doc), chosen once."""
        c, sel = self._compute(x, token_mask), self.sat_selector
        if sel.use_history():
            return self._history(c, k)
        idx = sel.cached(k)
        if idx is not None and not self.sat_runtime.dense_forward:
            return c.kept(idx)[0]
        return self._paper(c, k, self.sat_runtime.dense_forward)

    def _history(self, c: _Generic, k: int) -> torch.Tensor:
        rt, sel = self.sat_runtime, self.sat_selector
        idx = sel.cached(k)
        fresh = idx is None
        if fresh:
            idx = sel.choose_from_history(k, c.x.device)
        y, h = c.kept(idx)
        if fresh:
            with torch.no_grad():
                metric = rt.config.metric
                cols = c.down.weight.detach().index_select(1, idx) if metric == "output" else None
                sel.observe(idx, rt.mlp_scores(h.detach(), c.token_mask, metric, cols))
        return y

    def _paper(self, c: _Generic, k: int, dense: bool) -> torch.Tensor:
        rt, sel = self.sat_runtime, self.sat_selector
        metric = rt.config.metric
        with torch.no_grad():
            g_all, u_all = c.all_channels()
            idx = sel.cached(k)  # a recomputation of the dense forward keeps its channels
            h_all = None
            if dense or (idx is None and metric != "random"):
                h_all = c.activations(g_all, u_all)
            if idx is None:
                scores = None
                if metric != "random":
                    scores = c.scores(rt, h_all, c.token_mask, metric, scratch=not dense)
                idx = sel.choose(k, scores, c.x.device)
            y_all = c.output_all(h_all) if dense else None  # the output over every channel: 2 N d f FLOPs
            taken = c.take(idx, g_all, u_all, h_all)
            del g_all, u_all, h_all
        return c.kept(idx, taken, y_all, sel.weights(k) if dense else None)[0]
