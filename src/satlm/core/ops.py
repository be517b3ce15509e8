"""Autograd pieces that let the backward run over kept units only.

`current` (paper) mode computes the projections of every unit once, without autograd, to score them.
The kept slices of those outputs are then re-attached to the graph with `precomputed_linear`, whose
backward is exactly that of `F.linear(x, weight, bias)` on the kept rows: no forward is repeated and
no gradient work is done for omitted units. Weights are sliced with `rows` / `cols`, whose backward
writes the kept slices' gradients into a zero gradient of the full parameter with `index_copy_`
(cheaper than the scatter-add of `index_select`'s own backward).
"""

from __future__ import annotations

import torch


class _Rows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, idx, dim):
        ctx.save_for_backward(idx)
        ctx.shape, ctx.dim = weight.shape, dim
        return weight.index_select(dim, idx)

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        full = grad.new_zeros(ctx.shape)
        full.index_copy_(ctx.dim, idx, grad)
        return full, None, None


def rows(weight: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """weight[idx] along dim 0 (kept output features): (out, in) -> (k, in); also for biases (out,) -> (k,)."""
    return _Rows.apply(weight, idx, 0)


def cols(weight: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """weight[:, idx] (kept input features of a down or output projection): (out, in) -> (out, k)."""
    return _Rows.apply(weight, idx, 1)


class _PrecomputedLinears(torch.autograd.Function):
    """outs[i] == F.linear(x, weights[i], biases[i]), computed earlier without autograd; attaches their
    backward, with one fused GEMM for the input gradient and one for the weight gradients."""

    @staticmethod
    def forward(ctx, x, n, *tensors):
        weights, biases, outs = tensors[:n], tensors[n:2 * n], tensors[2 * n:]
        ctx.save_for_backward(x, *weights)
        ctx.n = n
        ctx.has_bias = [b is not None for b in biases]
        ctx.bias_dtypes = [b.dtype if b is not None else None for b in biases]
        return tuple(o.detach() for o in outs)

    @staticmethod
    def backward(ctx, *grads):
        x, *weights = ctx.saved_tensors
        n = ctx.n
        dtype = grads[0].dtype
        widths = [w.shape[0] for w in weights]
        # (N, sum k_i): the output gradients side by side, so that one GEMM serves every projection.
        g = torch.cat([gr.reshape(-1, w) for gr, w in zip(grads, widths)], dim=1)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            w_all = torch.cat([w.to(dtype) for w in weights], dim=0)  # (sum k_i, d)
            grad_x = (g @ w_all).reshape(x.shape).to(x.dtype)  # 2N d sum(k_i) FLOPs
        grad_ws: list = [None] * n
        if any(ctx.needs_input_grad[2:2 + n]):
            gw = g.t() @ x.reshape(-1, x.shape[-1]).to(dtype)  # (sum k_i, d): 2N d sum(k_i) FLOPs
            grad_ws = [p.to(w.dtype) for p, w in zip(gw.split(widths, dim=0), weights)]
        grad_bs = [g_i.sum(0).to(dt) if has else None
                   for g_i, has, dt in zip(g.split(widths, dim=1), ctx.has_bias, ctx.bias_dtypes)]
        return (grad_x, None, *grad_ws, *grad_bs, *([None] * n))


def precomputed_linears(x: torch.Tensor, weights, biases, outs) -> tuple[torch.Tensor, ...]:
    """Return `outs` (outs[i] == F.linear(x, weights[i], biases[i]), already computed) with the backward of
    those linears attached. x: (..., d); weights[i]: (k_i, d) kept rows; biases[i]: (k_i,) or None;
    outs[i]: (..., k_i)."""
    n = len(weights)
    return _PrecomputedLinears.apply(x, n, *weights, *biases, *outs)


def head_columns(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Feature indices of whole heads: head h -> h*head_dim ... h*head_dim + head_dim - 1.  (k,) -> (k*head_dim,)"""
    offsets = torch.arange(head_dim, device=heads.device, dtype=heads.dtype)
    return (heads[:, None] * head_dim + offsets).reshape(-1)
