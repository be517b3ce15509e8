"""Autograd functions whose backward runs over kept units only and keeps no copy of sliced weights.

`row_linears` computes (or, in paper mode, receives already computed) F.linear(x, W[idx], b[idx]) for one
or more projections that share their input x: q/k/v, or gate/up. `col_linear` is F.linear(h, W[:, idx], b)
for the down and output projections. `swiglu_mlp` is a whole SiLU-gated MLP over kept channels, which saves
only x and the kept gate/up outputs and recomputes the activation in the backward. None of them saves a
slice of a weight: the kept rows or columns are taken again in the backward, and their gradients are
written into a zero gradient of the full parameter (`_scatter_rows`, `_scatter_cols`)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .importance import column_norms


def _kept_rows(weights, idxs, dtype=None) -> torch.Tensor:
    """[W_0[idx_0]; W_1[idx_1]; ...] gathered straight into one buffer (one copy, no cat)."""
    out = torch.empty(sum(i.shape[0] for i in idxs), weights[0].shape[1], dtype=weights[0].dtype,
                      device=weights[0].device)
    start = 0
    for w, i in zip(weights, idxs):
        torch.index_select(w, 0, i, out=out[start:start + i.shape[0]])
        start += i.shape[0]
    return out if dtype is None else out.to(dtype)


def _scatter_rows(weight: torch.Tensor, idx: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """A zero tensor shaped like weight, with `part` in the kept rows idx (the inverse of a row gather)."""
    return torch.zeros_like(weight).index_copy_(0, idx, part.to(weight.dtype))


def _unique(tensors) -> tuple[list[torch.Tensor], tuple[int, ...]]:
    """The distinct tensors of a list (by identity) and where each entry is among them. An autograd Function is
    handed each tensor once: torch.compile cannot trace one that receives the same tensor twice (k and v share
    their kept groups' indices, gate and up their kept channels')."""
    uniq: list[torch.Tensor] = []
    where = []
    for t in tensors:
        j = next((i for i, u in enumerate(uniq) if u is t), None)
        if j is None:
            uniq.append(t)
            j = len(uniq) - 1
        where.append(j)
    return uniq, tuple(where)


# Positions of _RowLinears.forward's inputs, for ctx.needs_input_grad: weights follow _RW, then biases, outputs,
# and the distinct index tensors.
_RW = 4


class _RowLinears(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, n, compute, where, *tensors):
        weights, biases, outs, uniq = tensors[:n], tensors[n:2 * n], tensors[2 * n:3 * n], tensors[3 * n:]
        idxs = [uniq[j] for j in where]
        ctx.save_for_backward(x, *weights, *uniq)
        ctx.n, ctx.where = n, where
        ctx.biases = [(b.shape, b.dtype) if b is not None else None for b in biases]
        if compute:  # history mode: one GEMM over the stacked kept rows (autocast applies here as usual)
            w = _kept_rows(weights, idxs)
            b = None
            if any(bi is not None for bi in biases):
                b = torch.cat([bi.index_select(0, i) if bi is not None else w.new_zeros(i.shape[0])
                               for bi, i in zip(biases, idxs)])
            return tuple(F.linear(x, w, b).split([i.shape[0] for i in idxs], dim=-1))
        return tuple(o.detach() for o in outs)  # paper mode: computed earlier without autograd

    @staticmethod
    def backward(ctx, *grads):
        x, *rest = ctx.saved_tensors
        n = ctx.n
        weights, uniq = rest[:n], rest[n:]
        idxs = [uniq[j] for j in ctx.where]
        dtype = grads[0].dtype
        widths = [i.shape[0] for i in idxs]
        # (N, sum k_i): the output gradients side by side, so that one GEMM serves every projection.
        g = torch.cat([gr.reshape(-1, k) for gr, k in zip(grads, widths)], dim=1)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ _kept_rows(weights, idxs, dtype)).reshape(x.shape).to(x.dtype)  # 2N d sum(k)
        grad_ws: list = [None] * n
        need_w = ctx.needs_input_grad[_RW:_RW + n]
        need_b = ctx.needs_input_grad[_RW + n:_RW + 2 * n]
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        if all(need_w):
            gw = g.t() @ x2  # (sum k, d): 2N d sum(k) FLOPs
            grad_ws = [_scatter_rows(w, i, part) for part, w, i in zip(gw.split(widths, dim=0), weights, idxs)]
        else:  # some weights frozen: no GEMM for their gradients
            for j, (g_j, w, i) in enumerate(zip(g.split(widths, dim=1), weights, idxs)):
                if need_w[j]:
                    grad_ws[j] = _scatter_rows(w, i, g_j.t() @ x2)
        grad_bs = []
        for g_i, i, b, need in zip(g.split(widths, dim=1), idxs, ctx.biases, need_b):
            if b is None or not need:
                grad_bs.append(None)
                continue
            full = g_i.new_zeros(b[0], dtype=b[1])
            grad_bs.append(full.index_copy_(0, i, g_i.sum(0).to(b[1])))
        return (grad_x, None, None, None, *grad_ws, *grad_bs, *([None] * n), *([None] * len(uniq)))


def row_linears(x, weights, idxs, biases, outs=None) -> tuple[torch.Tensor, ...]:
    """F.linear(x, weights[j][idxs[j]], biases[j][idxs[j]]) for each j, with a kept-rows-only backward.

    x: (..., d); weights[j]: (out_j, d) full parameters; idxs[j]: (k_j,) kept output features; biases[j]:
    (out_j,) or None. outs: the same results already computed (paper mode), or None to compute them.
    """
    n = len(weights)
    outs = list(outs) if outs is not None else [None] * n
    uniq, where = _unique(idxs)
    return _RowLinears.apply(x, n, outs[0] is None, where, *weights, *biases, *outs, *uniq)


def _kept_cols(weight: torch.Tensor, idx: torch.Tensor, block: int) -> torch.Tensor:
    """weight[:, kept columns]: idx are column indices (block 1) or indices of blocks of `block` adjacent
    columns (whole heads), which are copied a block at a time."""
    if block == 1:
        return weight.index_select(1, idx)
    out_features = weight.shape[0]
    return weight.view(out_features, -1, block).index_select(1, idx).view(out_features, -1)


def _scatter_cols(weight: torch.Tensor, idx: torch.Tensor, block: int, part: torch.Tensor) -> torch.Tensor:
    """A zero tensor shaped like weight, with `part` in the kept columns (the inverse of _kept_cols)."""
    full = torch.zeros_like(weight)
    if block == 1:  # scatter_ along dim 1 is ~2x faster on the CPU than index_copy_ along dim 1
        return full.scatter_(1, idx.expand(weight.shape[0], -1), part)
    out_features = weight.shape[0]
    full.view(out_features, -1, block).index_copy_(1, idx, part.view(out_features, -1, block))
    return full


class _ColLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, idx, bias, block, out):
        ctx.save_for_backward(h, weight, idx)
        ctx.bias = (bias.shape, bias.dtype) if bias is not None else None
        ctx.block = block
        if out is not None:  # forward=dense: the output over every unit, computed without autograd
            return out.detach()
        return F.linear(h, _kept_cols(weight, idx, block), bias)

    @staticmethod
    def backward(ctx, grad):
        h, weight, idx = ctx.saved_tensors
        dtype = grad.dtype
        grad_h = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_h = (grad @ _kept_cols(weight, idx, ctx.block).to(dtype)).to(h.dtype)  # 2N d k FLOPs
        g2 = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[1]:
            part = g2.t() @ h.reshape(-1, h.shape[-1]).to(dtype)  # (d, k): 2N d k FLOPs
            grad_w = _scatter_cols(weight, idx, ctx.block, part.to(weight.dtype))
        if ctx.bias is not None and ctx.needs_input_grad[3]:
            grad_b = g2.sum(0).to(ctx.bias[1])
        return grad_h, grad_w, None, grad_b, None, None


def col_linear(h: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor, bias: torch.Tensor | None,
               block: int = 1, out: torch.Tensor | None = None):
    """F.linear(h, weight[:, cols], bias) with a kept-columns-only backward. h: (..., k); weight: (out, in);
    cols = idx (block 1), or the blocks idx of `block` adjacent columns (block = head_dim: whole heads).
    out: the forward's value when already computed over every column (forward=dense), else None; the backward
    is the kept columns' either way."""
    return _ColLinear.apply(h, weight, idx, bias, block, out)


class _VocabRowsLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, k, reduce, input_kept):
        ctx.save_for_backward(h, weight)
        ctx.bias = (bias.shape, bias.dtype) if bias is not None else None
        ctx.k, ctx.reduce, ctx.input_kept = k, reduce, input_kept
        return F.linear(h, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        h, weight = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])  # (N, V): the logits' gradient
        h2 = h.reshape(-1, h.shape[-1])
        rows = gradient_rows(g2)  # the rows that carry gradient (tokens with loss), or None: all of them
        if rows is not None:  # the others are exactly zero and add nothing to any of the products below
            g2, h2 = g2.index_select(0, rows), h2.index_select(0, rows)
        grad_h = grad_w = grad_b = None
        kept = idx = None
        if ctx.needs_input_grad[1] or (ctx.needs_input_grad[0] and ctx.input_kept):
            scores = column_norms(g2)  # (V,): one read of the gradient
            if ctx.reduce is not None:
                scores = ctx.reduce(scores)
            idx = torch.topk(scores, ctx.k, sorted=False).indices
            kept = g2.index_select(1, idx)  # (N', k)
        if ctx.needs_input_grad[0]:
            if ctx.input_kept:  # the kept rows only: 2 N' k d FLOPs
                part = kept @ weight.index_select(0, idx).to(kept.dtype)
            else:  # every vocabulary row: 2 N' V d FLOPs
                part = g2 @ weight.to(g2.dtype)
            if rows is not None:  # zero in the rows without gradient
                part = h.new_zeros(grad.shape[:-1].numel(), h.shape[-1]).index_copy_(0, rows, part.to(h.dtype))
            grad_h = part.reshape(h.shape).to(h.dtype)
        if ctx.needs_input_grad[1]:
            part = kept.t() @ h2.to(kept.dtype)  # (k, d): 2 N' k d FLOPs
            grad_w = _scatter_rows(weight, idx, part)
        if ctx.bias is not None and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0).to(ctx.bias[1])
        return grad_h, grad_w, grad_b, None, None, None


def gradient_rows(g: torch.Tensor, least_zero: float = 1 / 16) -> torch.Tensor | None:
    """Indices of the rows of a (N, V) logits gradient that hold a nonzero (or NaN) entry, or None when fewer than
    `least_zero` of the rows are zero (gathering the others would cost about what skipping saves). A token without
    loss (a prompt or padding token in SFT; in any batch a sequence's last position) has an all-zero row, which the
    output layer's weight and input gradients skip exactly. One read of g (each row's largest and smallest entry:
    exact where a norm could underflow, and on the CPU ~8x faster than the max-norm) and one host sync."""
    nonzero = (g.amax(dim=1) != 0) | (g.amin(dim=1) != 0)
    rows = nonzero.nonzero().squeeze(1)
    return None if g.shape[0] - rows.shape[0] < least_zero * g.shape[0] else rows


def vocab_rows_linear(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: int, reduce=None,
                      input_kept: bool = False):
    """F.linear(h, weight, bias) for an output layer (weight: (V, d), one row per vocabulary entry) whose backward
    writes the weight gradient of the k rows only whose logits' gradients have the largest norm over the batch's
    tokens (known in the backward, so the selection is exact top-k of that norm); the other rows' weight gradient
    is zero. The forward and the bias gradient are the dense layer's; the input gradient too, unless input_kept,
    when it is taken over the kept rows only (G[:, kept] W[kept]: the omitted rows' share is dropped). reduce:
    combines the (V,) norms over data-parallel ranks (distributed.reduce_scores), or None."""
    return _VocabRowsLinear.apply(h, weight, bias, k, reduce, input_kept)


def head_columns(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Feature indices of whole heads: head h -> h*head_dim ... h*head_dim + head_dim - 1.  (k,) -> (k*head_dim,)"""
    offsets = torch.arange(head_dim, device=heads.device, dtype=heads.dtype)
    return (heads[:, None] * head_dim + offsets).reshape(-1)


# Positions of _SwiGLU.forward's inputs, for ctx.needs_input_grad (named: an off-by-one here once dropped the
# gradients of frozen-neighbour weights silently). The gate/up weights and their biases follow _N, then the
# distinct index tensors (the kept channels and the gate/up row indices). `scale` (position _N) is the kept
# channels' gradient weights (selection: unbiased) or None.
_X, _WD, _BD, _N = 0, 5, 6, 9


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, g, u, h, y, wd, bd, n, where, scale, *tensors):
        weights, biases, uniq = tensors[:n], tensors[n:2 * n], tensors[2 * n:]
        idx, rows = uniq[where[0]], [uniq[j] for j in where[1:]]
        k = idx.shape[0]
        x2 = x.reshape(-1, x.shape[-1])
        if g is None:  # history mode: one GEMM over the kept gate and up rows
            b = None
            if any(bi is not None for bi in biases):
                b = torch.cat([bi.index_select(0, r) if bi is not None else x2.new_zeros(r.shape[0])
                               for bi, r in zip(biases, rows)])
            gu = F.linear(x2, _kept_rows(weights, rows), b)  # (N, 2k): 4 N d k FLOPs
            g, u = gu[:, :k], gu[:, k:]
        else:  # paper mode: computed without autograd while scoring
            g, u = g.detach().reshape(-1, k), u.detach().reshape(-1, k)
        h = F.silu(g).mul_(u) if h is None else h.detach().reshape(-1, k)  # (N, k)
        if y is None:
            y = F.linear(h, _kept_cols(wd, idx, 1), bd)  # 2 N d k FLOPs
        else:  # forward=dense: the output over every channel, computed without autograd
            y = y.detach().reshape(-1, wd.shape[0])
        ctx.save_for_backward(x, g, u, wd, *weights, *uniq)
        ctx.n, ctx.where, ctx.n_uniq = n, where, len(uniq)
        ctx.scale = scale.detach() if scale is not None else None
        ctx.biases = tuple((b.shape, b.dtype) if b is not None else None for b in biases)
        ctx.bd = (bd.shape, bd.dtype) if bd is not None else None
        ctx.mark_non_differentiable(h)
        ctx.set_materialize_grads(False)  # no zero-filled gradient for h, which is not differentiable
        return y.reshape(*x.shape[:-1], y.shape[-1]), h.reshape(*x.shape[:-1], k)

    @staticmethod
    def backward(ctx, dy, _dh_unused):
        n, where = ctx.n, ctx.where
        n_uniq = ctx.n_uniq
        nones = (None,) * (2 * n + n_uniq)
        if dy is None:  # the output was not used (grads are not materialized)
            return (None,) * (_N + 1) + nones
        x, g, u, wd, *rest = ctx.saved_tensors
        weights, uniq = rest[:n], rest[n:]
        idx, rows = uniq[where[0]], [uniq[j] for j in where[1:]]
        need = ctx.needs_input_grad
        need_w = need[_N + 1:_N + 1 + n]
        need_b = [ctx.biases[j] is not None and need[_N + 1 + n + j] for j in range(n)]
        k = idx.shape[0]
        dtype = dy.dtype
        x2, dy2 = x.reshape(-1, x.shape[-1]).to(dtype), dy.reshape(-1, dy.shape[-1])
        g, u = g.to(dtype), u.to(dtype)
        a = F.silu(g)  # recomputed: nothing of the activation was saved
        grad_wd = grad_bd = grad_x = None
        scale = ctx.scale.to(dtype) if ctx.scale is not None else None
        if need[_WD]:
            part = dy2.t() @ (a * u).to(dtype)  # (d, k): 2 N d k FLOPs
            if scale is not None:
                part = part * scale  # the kept columns' gradients weighted (selection: unbiased)
            grad_wd = _scatter_cols(wd, idx, 1, part.to(wd.dtype))
        if ctx.bd is not None and need[_BD]:
            grad_bd = dy2.sum(0).to(ctx.bd[1])
        grad_ws: list = [None] * n
        grad_bs: list = [None] * n
        head = (grad_x, None, None, None, None, grad_wd, grad_bd, None, None, None)
        if not (need[_X] or any(need_w) or any(need_b)):
            return (*head, *grad_ws, *grad_bs, *([None] * n_uniq))
        # Elementwise work stays in the layout of g and u: (N, k), or channels first (paper mode: views of (k, N)).
        channels_first = g.dim() == 2 and g.shape[0] > 1 and g.shape[1] > 1 and g.stride(0) == 1
        if channels_first:
            dh = (_kept_cols(wd, idx, 1).t().to(dtype) @ dy2.t()).t()  # (N, k) view of (k, N): 2 N d k FLOPs
        else:
            dh = dy2 @ _kept_cols(wd, idx, 1).to(dtype)  # (N, k): 2 N d k FLOPs
        if scale is not None:
            dh = dh.mul_(scale)  # every gradient through a kept channel weighted by its 1/p
        # d(gate), d(up) side by side, so that one GEMM serves both
        if torch.compiler.is_compiling():  # traced: no out= into strided views (the compiler fuses these anyway)
            dgu = torch.cat([torch.ops.aten.silu_backward(dh * u, g), dh * a], dim=1)
        else:
            dgu = dh.new_empty(2 * k, dh.shape[0]).t() if channels_first else dh.new_empty(dh.shape[0], 2 * k)
            torch.mul(dh, a, out=dgu[:, k:])
            torch.ops.aten.silu_backward.grad_input(dh.mul_(u), g, grad_input=dgu[:, :k])
        if need[_X]:
            grad_x = (dgu @ _kept_rows(weights, rows, dtype)).reshape(x.shape).to(x.dtype)  # 4 N d k
        widths = [r.shape[0] for r in rows]
        if all(need_w):
            gw = dgu.t() @ x2  # (2k, d): 4 N d k FLOPs
            grad_ws = [_scatter_rows(w, r, part) for part, w, r in zip(gw.split(widths, dim=0), weights, rows)]
        else:  # a frozen gate or up projection: no GEMM for its gradient
            for j, (part, w, r) in enumerate(zip(dgu.split(widths, dim=1), weights, rows)):
                if need_w[j]:
                    grad_ws[j] = _scatter_rows(w, r, part.t() @ x2)
        for j, (part, r) in enumerate(zip(dgu.split(widths, dim=1), rows)):
            if need_b[j]:
                shape, bdtype = ctx.biases[j]
                grad_bs[j] = part.new_zeros(shape, dtype=bdtype).index_copy_(0, r, part.sum(0).to(bdtype))
        head = (grad_x, None, None, None, None, grad_wd, grad_bd, None, None, None)
        return (*head, *grad_ws, *grad_bs, *([None] * n_uniq))


def swiglu_mlp(x, idx, weights, rows, biases, down, g=None, u=None, h=None, y=None, scale=None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """down(silu(gate(x)) * up(x)) over the kept channels idx, and the kept activations H (no gradient).

    x: (..., d); idx: (k,) kept channels, ascending; weights, rows, biases: the gate and up projections' weights,
    the row indices of their kept channels and their biases, such that the stacked kept rows are [gate_k | up_k]
    (two Linears with rows [idx, idx], or one fused [gate | up] Linear with rows [cat(idx, f + idx)]); down: the
    down projection (nn.Linear); g, u: (..., k) the kept gate and up outputs when already computed (paper mode),
    else None; h: silu(g) * u when computed too (paper mode, from its scoring pass), else None; y: the MLP's
    output over every channel when computed already (forward=dense: the value returned; the backward is still
    over the kept channels), else None. Saves x and the kept gate/up outputs only: the activation is recomputed
    in the backward. scale: (k,) weights of the kept channels' gradients (selection: unbiased, with y given), else
    None.
    """
    n = len(weights)
    uniq, where = _unique([idx, *rows])
    return _SwiGLU.apply(x, g, u, h, y, down.weight, down.bias, n, where, scale, *weights, *biases, *uniq)


# -- paper mode: the kept heads' attention outputs come from the scoring pass ---------------------------------
# Paper mode runs attention over every head (without autograd) to score them. Where that pass calls one of
# PyTorch's attention kernels that also return the log-sum-exp of every row, the kept heads' outputs and
# log-sum-exps are all the kernel's backward needs, so their attention is not computed again. The kernels
# ("kinds"): on the CPU, SDPA's flash kernel (any mask); on CUDA, the flash kernel (fp16/bf16, no mask: the
# is_causal batches) and the memory-efficient one (an additive bias: padded batches).
_ATEN = torch.ops.aten
_FLASH_CPU = getattr(_ATEN, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_CPU_BACKWARD = getattr(_ATEN, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
_FLASH_CUDA = getattr(_ATEN, "_scaled_dot_product_flash_attention", None)
_FLASH_CUDA_BACKWARD = getattr(_ATEN, "_scaled_dot_product_flash_attention_backward", None)
_EFFICIENT = getattr(_ATEN, "_scaled_dot_product_efficient_attention", None)
_EFFICIENT_BACKWARD = getattr(_ATEN, "_scaled_dot_product_efficient_attention_backward", None)
# The memory-efficient kernel reads its bias in rows aligned to this many elements (SDPA pads them the same way).
EFFICIENT_BIAS_ALIGN = 16
# The kinds that take grouped K/V (GQA: n_kv heads, query head h attends with K/V head h // (H / n_kv)) and
# return dk/dv per K/V head, so K/V need not be copied per query head: PyTorch's flash kernels (CPU and CUDA;
# SDPA's enable_gqa passes them grouped K/V as they are). The memory-efficient kernel takes one K/V per head.
GROUPED_KV_KINDS = frozenset({"cpu", "flash"})
# How often each CUDA kind ran, and how often it failed and the exact fallback ran instead ("fallback:forward":
# the kept heads attended again; "fallback:backward": their attention recomputed with autograd). For
# benchmarks/gpu_check.py: a kernel this PyTorch build or GPU refuses costs speed, never a wrong gradient.
CUDA_REUSE_COUNTS: dict[str, int] = {}


def flash_cpu_available() -> bool:
    return _FLASH_CPU is not None and _FLASH_CPU_BACKWARD is not None


def reuse_kernel(device_type: str, dtype: torch.dtype, masked: bool, head_dim: int,
                 autocast: bool = False) -> str | None:
    """The kernel whose scoring pass paper mode can reuse: "cpu", "flash" or "efficient" (see above); None: the
    kept heads are attended again. dtype: what the attention computes in (the autocast dtype under autocast)."""
    half = dtype in (torch.float16, torch.bfloat16)
    if device_type == "cpu":  # under CPU autocast the kept heads are left to SDPA (not measured; no reason to)
        return "cpu" if flash_cpu_available() and not autocast and (half or dtype == torch.float32) else None
    if device_type != "cuda" or head_dim % 8 or head_dim > 256:
        return None
    if not masked and half and _FLASH_CUDA is not None and _FLASH_CUDA_BACKWARD is not None:
        return "flash"
    if masked and (half or dtype == torch.float32) and _EFFICIENT is not None and _EFFICIENT_BACKWARD is not None:
        return "efficient"
    return None


def additive_mask(mask: torch.Tensor | None, dtype: torch.dtype, align: int = 0) -> torch.Tensor | None:
    """A boolean attention mask (True = attend) as the additive float mask SDPA's kernels take; align > 0: its
    rows padded in memory to a multiple of `align` elements (the values are the same; for the efficient kernel)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    elif align:
        mask = mask.to(dtype)
    if align and mask.shape[-1] % align:
        S = mask.shape[-1]
        mask = F.pad(mask, (0, align - S % align))[..., :S]
    return mask


def _bias(mask, q, k):
    """The efficient kernel's bias: the mask broadcast (a view) over (B, H, T, S)."""
    return None if mask is None else mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])


def attention_with_lse(kind: str, q, k, v, mask, is_causal: bool, scale: float):
    """One attention kernel's forward. q: (B, H, T, hd); k, v: (B, H_kv, T, hd) in q's dtype, H_kv = H or, for
    the GROUPED_KV_KINDS, a divisor of H (query head h attends with K/V head h // (H / H_kv)). Returns the
    output as (B, T, H, hd) (the kernels' memory layout), the log-sum-exp (B, H, T'), and what the backward
    needs besides (a tuple that does not depend on the heads, so it serves any subset of them)."""
    if kind == "cpu":
        out, lse = _FLASH_CPU(q, k, v, 0.0, is_causal, attn_mask=mask, scale=scale)
        return out.transpose(1, 2), lse, ()
    if kind == "flash":
        r = _FLASH_CUDA(q, k, v, 0.0, is_causal, False, scale=scale)
        return r[0].transpose(1, 2), r[1], tuple(r[2:8])  # cum_seq_q, cum_seq_k, max_q, max_k, rng_state, unused
    if kind == "efficient":
        out, lse, seed, offset = _EFFICIENT(q, k, v, _bias(mask, q, k), True, 0.0, is_causal, scale=scale)
        return out.transpose(1, 2), lse, (seed, offset)
    raise ValueError(f"unknown attention kernel {kind!r}")


def _attention_backward(kind, grad, q, k, v, out, lse, extra, mask, is_causal, scale):
    g, o = grad.transpose(1, 2), out.transpose(1, 2)
    if kind == "cpu":
        return _FLASH_CPU_BACKWARD(g, q, k, v, o, lse, 0.0, is_causal, attn_mask=mask, scale=scale)
    if kind == "flash":
        cum_q, cum_k, max_q, max_k, rng, unused = extra
        return _FLASH_CUDA_BACKWARD(g, q, k, v, o, lse, cum_q, cum_k, max_q, max_k, 0.0, is_causal, rng, unused,
                                    scale=scale)
    seed, offset = extra
    dq, dk, dv, _ = _EFFICIENT_BACKWARD(g, q, k, v, _bias(mask, q, k), o, lse, seed, offset, 0.0,
                                        [True, True, True, False], is_causal, scale=scale)
    return dq, dk, dv


def count_reuse(key: str) -> None:
    """One more use of a CUDA kind, or of a fallback (CUDA_REUSE_COUNTS)."""
    CUDA_REUSE_COUNTS[key] = CUDA_REUSE_COUNTS.get(key, 0) + 1


class _KeptAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, out, lse, mask, is_causal, scale, kind, extra):
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.is_causal, ctx.scale, ctx.kind, ctx.extra = is_causal, scale, kind, extra
        return out.detach()

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, mask = ctx.saved_tensors
        if ctx.kind == "cpu":
            dq, dk, dv = _attention_backward("cpu", grad, q, k, v, out, lse, (), mask, ctx.is_causal, ctx.scale)
        else:
            try:
                dq, dk, dv = _attention_backward(ctx.kind, grad, q, k, v, out, lse, ctx.extra, mask, ctx.is_causal,
                                                 ctx.scale)
            except RuntimeError:  # this GPU / build refuses the kernel: the same gradient by autograd
                count_reuse("fallback:backward")
                dq, dk, dv = _recomputed_attention_grads(grad, q, k, v, mask, ctx.is_causal, ctx.scale)
        return dq, dk, dv, None, None, None, None, None, None, None


def _recomputed_attention_grads(grad, q, k, v, mask, is_causal, scale):
    with torch.enable_grad():
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, is_causal=is_causal, scale=scale,
                                           enable_gqa=kk.shape[1] != qq.shape[1])
        return torch.autograd.grad(o, (qq, kk, vv), grad.transpose(1, 2))


def kept_attention(q, k, v, out, lse, mask, is_causal: bool, scale: float, kind: str = "cpu",
                   extra: tuple = ()) -> torch.Tensor:
    """Attention of the kept heads whose forward was already computed: returns `out` (B, T, h, hd) attached to
    the graph; the backward is the kernel's (`kind`, with `extra` from attention_with_lse) over the kept heads.
    q: (B, h, T, hd) as attended (after RoPE); k, v: (B, h, T, hd), or grouped (B, g, T, hd) with g dividing h
    for the GROUPED_KV_KINDS; lse: (B, h, T')."""
    return _KeptAttention.apply(q, k, v, out, lse, mask, is_causal, scale, kind, extra)


# -- rotary position embedding of the kept heads ------------------------------------------------------------
class _Rope(torch.autograd.Function):
    """x * cos + rotate_half(x) * sin, with rotate_half(x) = [-x2, x1], in three kernels each way (one full,
    two half-width multiply-adds) instead of the slices, negation, concatenation, products and sum of the
    textbook form and their autograd nodes."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        half = x.shape[-1] // 2
        out = x * cos
        out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
        out[..., half:].addcmul_(x[..., :half], sin[..., half:])
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        half = grad.shape[-1] // 2
        gx = grad * cos
        gx[..., :half].addcmul_(grad[..., half:], sin[..., half:])
        gx[..., half:].addcmul_(grad[..., :half], sin[..., :half], value=-1)
        return gx, None, None


def rope(q, k, cos, sin, unsqueeze_dim: int = 1):
    """Rotary embedding of q and k, as Llama's apply_rotary_pos_emb computes it. q, k: (B, heads, T, hd);
    cos, sin: (B, T, hd)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return _Rope.apply(q, cos, sin), _Rope.apply(k, cos, sin)


@functools.lru_cache(maxsize=None)  # one probe per (function, head size), not one per layer
def same_rope(fn, head_dim: int) -> bool:
    """Does the model's rotary function `fn(q, k, cos, sin)` compute what `rope` does? (Checked on random
    inputs, forward and backward; architectures with partial or interleaved rotary keep their own.)"""
    if fn is None or head_dim % 2:
        return False
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 3, 5, head_dim, generator=g, dtype=torch.float64, requires_grad=True) for _ in "qk")
    cos, sin = (torch.randn(2, 5, head_dim, generator=g, dtype=torch.float64) for _ in "cs")
    try:
        ref = fn(q, k, cos, sin)
        out = rope(q, k, cos, sin)
        grads_ref = torch.autograd.grad(sum((r * (i + 1)).sum() for i, r in enumerate(ref)), (q, k))
        grads = torch.autograd.grad(sum((r * (i + 1)).sum() for i, r in enumerate(out)), (q, k))
    except Exception:  # a different signature or shape convention
        return False
    return all(torch.allclose(a, b, rtol=1e-12, atol=1e-12) for a, b in zip((*ref, *grads_ref), (*out, *grads)))
