"""Autograd pieces that let the backward run over kept units only.

`current` (paper) mode computes the projections of every unit once, without autograd, to score them.
The kept slices of those outputs are then re-attached to the graph with `precomputed_linear`, whose
backward is exactly that of `F.linear(x, weight, bias)` on the kept rows: no forward is repeated and
no gradient work is done for omitted units. Weights are sliced with `index_select` outside, so
autograd scatters the kept rows' gradients back into the full parameter (zeros elsewhere).
"""

from __future__ import annotations

import torch


class _PrecomputedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, out):
        # out == F.linear(x, weight, bias), computed earlier without autograd.
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return out.detach()

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        # (N, k) @ (k, d) and (k, N) @ (N, d): 2Ndk FLOPs each, as for a linear over the kept rows.
        if ctx.needs_input_grad[0]:
            grad_x = grad_out.matmul(weight.to(grad_out.dtype)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            g2 = grad_out.reshape(-1, grad_out.shape[-1])
            grad_w = g2.t().matmul(x.reshape(-1, x.shape[-1]).to(g2.dtype)).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None


def precomputed_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor
) -> torch.Tensor:
    """Return `out` (== F.linear(x, weight, bias), already computed) with F.linear's backward attached.

    x: (..., d); weight: (k, d) kept rows; bias: (k,) or None; out: (..., k).
    """
    return _PrecomputedLinear.apply(x, weight, bias, out)


def head_columns(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Feature indices of whole heads: head h -> h*head_dim ... h*head_dim + head_dim - 1.  (k,) -> (k*head_dim,)"""
    offsets = torch.arange(head_dim, device=heads.device, dtype=heads.dtype)
    return (heads[:, None] * head_dim + offsets).reshape(-1)
