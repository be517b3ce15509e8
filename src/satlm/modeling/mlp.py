"""SATMLP: the MLP over kept channels. Gated (gate/up, or one fused gate_up) or not (fc), any activation.

    gated:      Y = (act(X Wg_k^T) * X Wu_k^T) Wd_k^T        non-gated:  Y = act(X Wfc_k^T) Wd_k^T

With `forward: dense` the forward's output is the full MLP's and only the backward is over the kept channels.
SiLU-gated MLPs run as one autograd function (core/ops.py swiglu_mlp) that saves x and the kept gate/up outputs
only; other MLPs are a kept-rows projection, the activation with autograd, and a kept-columns projection.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.importance import mlp_scores_rows
from ..core.ops import swiglu_mlp
from .base import _SATModule
from .families import get_path
from .proj import Proj, Rows, col_project
from .runtime import SATRuntime


def _is_silu(act) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU")


def _select_last(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t[..., idx] for a contiguous t. (On the CPU, index_select along the last dim of a 3-d tensor is ~20x
    slower than along dim 1 of the same data viewed as 2-d.)"""
    return t.reshape(-1, t.shape[-1]).index_select(1, idx).reshape(*t.shape[:-1], idx.shape[0])


def _output_cols(down: Proj, idx: torch.Tensor, metric: str):
    """The kept input columns of the down projection, for the `output` metric only (no autograd)."""
    return down.weight.detach().index_select(1, idx) if metric == "output" else None


class SATMLP(_SATModule):
    component = "mlp"

    def __init__(self, base_layer: nn.Module, runtime: SATRuntime, layer_idx: int):
        lay = runtime.layout
        down = get_path(base_layer, lay.down)
        super().__init__(base_layer, runtime, layer_idx, down.in_features)
        self.where = f"layers[{layer_idx}].{lay.mlp}"

    # -- the layout's pieces, looked up in every sparse forward (a LoRA layer injected after SAT is caught) --
    def _parts(self) -> tuple[Rows, Proj, nn.Module]:
        lay, base, f = self.sat_runtime.layout, self.base_layer, self.sat_n_units
        if lay.gated:
            rows = Rows.of(base, [lay.gate, lay.up], lay.gate_up, [f, f], self.where)
        else:
            rows = Rows.of(base, [lay.fc], None, [f], self.where)
        return rows, Proj(get_path(base, lay.down), f"{self.where}.{lay.down}"), getattr(base, lay.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self._kept_k()
        if k is None:
            return self.base_layer(x)
        y = self._sparse(k, x)
        p = getattr(self.base_layer, self.sat_runtime.layout.mlp_dropout or "", None)
        if p:
            y = F.dropout(y, p=p, training=self.training)
        return y

    def _sparse(self, k: int, x: torch.Tensor) -> torch.Tensor:
        rt, sel = self.sat_runtime, self.sat_selector
        gated = rt.layout.gated
        rows, down, act = self._parts()
        # One function for the whole SiLU-gated MLP; with LoRA the kept projections run one by one.
        fused = gated and _is_silu(act) and not rows.has_lora and not down.loras
        masks = rows.masks(x, self.training)  # LoRA dropout, drawn as peft draws it: gate, up, then down
        down_masks = down.masks((*x.shape[:-1], self.sat_n_units), x, self.training)
        rows.prepare(x, masks)
        metric, mask = rt.config.metric, rt.mask_for(x)
        if sel.use_history():
            idx = sel.cached(k)
            fresh = idx is None
            if fresh:
                idx = sel.choose_from_history(k, x.device)
            y, h = self._kept(x, idx, rows, down, act, fused, masks, down_masks)
            if fresh:
                with torch.no_grad():
                    sel.observe(idx, rt.mlp_scores(h.detach(), mask, metric, _output_cols(down, idx, metric)))
            return y
        idx = sel.cached(k)
        if idx is not None and not rt.dense_forward:
            # A recomputation (gradient checkpointing) of the thinned forward: its kept channels are known, so
            # only they are computed, as history mode does (the same tensors are saved as in the first pass).
            return self._kept(x, idx, rows, down, act, fused, masks, down_masks)[0]
        return self._paper(k, x, rows, down, act, fused, masks, down_masks)

    def _kept(self, x, idx, rows: Rows, down: Proj, act, fused: bool, masks, down_masks):
        """(output, kept activations) over the kept channels idx only: every projection shrinks."""
        if fused:
            weights, r, biases, _ = rows.spec([idx, idx])
            return swiglu_mlp(x, idx, weights, r, biases, down)
        if self.sat_runtime.layout.gated:
            g, u = rows.kept(x, [idx, idx], masks=masks)  # (B, T, k) each
            h = act(g) * u
        else:
            h = act(rows.kept(x, [idx], masks=masks)[0])
        return col_project(h, down, idx, idx, 1, down_masks), h

    def _paper(self, k, x, rows: Rows, down: Proj, act, fused: bool, masks, down_masks) -> torch.Tensor:
        """Paper mode: every channel computed without autograd to score them (and, forward=dense, for the output);
        the kept channels re-attached to the graph with a kept-only backward."""
        rt, sel = self.sat_runtime, self.sat_selector
        gated, dense_forward = rt.layout.gated, rt.dense_forward
        metric, mask = rt.config.metric, rt.mask_for(x)
        with torch.no_grad():
            if fused:  # channels first, (f, N), so that the kept channels are whole rows to copy
                g_all, u_all = rows.full_t(x)
            elif gated:
                g_all, u_all = rows.full(x, masks)  # (B, T, f): every channel, to score them
            else:
                g_all, u_all = rows.full(x, masks)[0], None
            idx = sel.cached(k)
            h_all = None
            if dense_forward or (idx is None and metric != "random"):
                h_all = act(g_all).mul_(u_all) if gated else act(g_all)
            if idx is None:
                scores = None
                if metric != "random":
                    if fused and mask is None and metric in ("l2", "output"):  # one read: a norm per row
                        scores = mlp_scores_rows(h_all, metric, down.weight)
                    elif fused:  # scored from a (B, T, f) view; the kept rows are handed to the MLP below
                        scores = rt.mlp_scores(h_all.t().reshape(*x.shape[:-1], -1), mask, metric, down.weight)
                    else:
                        scores = rt.mlp_scores(h_all, mask, metric, down.weight, scratch=not dense_forward)
                idx = sel.choose(k, scores, x.device)
            y_all = None
            if dense_forward:  # the output over every channel: 2 N d f FLOPs
                y_all = torch.mm(h_all.t(), down.weight.t()) if fused else h_all @ down.weight.t()
                if down.bias is not None:
                    y_all += down.bias
                if down.loras:
                    y_all += down.lora_once(h_all, down_masks)
            if fused:  # (N, k) views of (k, N)
                g_k, u_k = g_all.index_select(0, idx).t(), u_all.index_select(0, idx).t()
                h_k = h_all.index_select(0, idx).t() if h_all is not None else None
            else:
                g_k = _select_last(g_all, idx)  # (B, T, k)
                u_k = _select_last(u_all, idx) if gated else None
            del g_all, u_all, h_all
        if fused:
            weights, r, biases, _ = rows.spec([idx, idx])
            return swiglu_mlp(x, idx, weights, r, biases, down, g_k, u_k, h_k, y_all)[0]
        if gated:
            g, u = rows.kept(x, [idx, idx], [g_k, u_k], masks)
            h = act(g) * u
        else:
            h = act(rows.kept(x, [idx], [g_k], masks)[0])
        return col_project(h, down, idx, idx, 1, down_masks, out=y_all)
