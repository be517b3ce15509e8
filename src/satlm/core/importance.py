"""Unit importance from activations, over the batch's non-padding tokens (docs/method.md, Importance).

All reductions are elementwise or norms (no matmuls except the `output` head metric's small Grams), so
the FLOPs of a step stay those of the projections.
"""

from __future__ import annotations

import warnings

import torch


def _masked(a: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Zero the rows of padding tokens. a: (B, T, ...); token_mask: (B, T) or None."""
    if token_mask is None:
        return a
    m = token_mask.to(a.dtype)
    return a * m.reshape(*m.shape, *([1] * (a.dim() - 2)))


def _token_count(a: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor | float:
    if token_mask is None:
        return float(a.shape[0] * a.shape[1])
    return token_mask.sum().clamp_min(1).float()


def mlp_scores(
    h: torch.Tensor, token_mask: torch.Tensor | None, metric: str, down_weight: torch.Tensor | None = None,
    scratch: bool = False,
) -> torch.Tensor:
    """Scores of MLP channels. h = act(G) * U: (B, T, f) -> (f,) float32.

    down_weight: (d, f) columns, needed by `output`. scratch: h is a temporary the caller drops, and may be
    overwritten.
    """
    hm = _masked(h, token_mask).reshape(-1, h.shape[-1])  # (N, f)
    if metric == "l1":
        return hm.abs().sum(dim=0, dtype=torch.float32) / _token_count(h, token_mask)
    l2 = _square_sum(hm, scratch or token_mask is not None).sum(dim=0).sqrt()
    if metric == "output":
        return l2 * _norm(down_weight.detach(), 0)
    return l2  # "l2"; "random" is drawn by the caller


def mlp_scores_rows(h_rows: torch.Tensor, metric: str, down_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Scores of MLP channels from channels-first activations of an unpadded batch: h_rows (f, N), contiguous ->
    (f,) float32, for the l2 and output metrics. One read of the activations (a norm along each contiguous row;
    on the CPU ~3x faster than mlp_scores' square-then-sum over the (N, f) view). Equal to mlp_scores(h_rows.t(),
    None, metric, down_weight)."""
    l2 = _norm(h_rows, 1)
    if metric == "output":
        return l2 * _norm(down_weight.detach(), 0)
    return l2


def _norm(a: torch.Tensor, dim: int) -> torch.Tensor:
    """The 2-norm along dim in float32 (accumulated in float32 for 16-bit inputs, in the input's own wider type
    for float64)."""
    return torch.linalg.vector_norm(a, dim=dim, dtype=torch.float32 if a.dtype.itemsize < 4 else None).float()


def column_norms(a: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """The 2-norm of each column of a (N, V) matrix, (V,) float32, in one read of it: blocks of `chunk` rows
    squared and added into a (chunk, V) float32 accumulator, summed at the end. On the CPU linalg.vector_norm
    over dim 0 reads the matrix strided: for the (1024, 49152) logits gradient of SmolLM2 it took 136 ms against
    17 ms this way (2026-12-07), more than the head's weight-gradient GEMM that the vocabulary lever saves."""
    n = a.shape[0]
    if n <= chunk or a.device.type != "cpu":
        return _norm(a, 0)
    acc = torch.zeros(chunk, a.shape[1], dtype=torch.float32, device=a.device)
    full = n - n % chunk
    for s in range(0, full, chunk):
        x = a[s:s + chunk].float()
        acc.addcmul_(x, x)
    if full < n:
        x = a[full:].float()
        acc[: n - full].addcmul_(x, x)
    return acc.sum(0).sqrt_()


def _square_sum(a: torch.Tensor, owned: bool) -> torch.Tensor:
    """a * a in float32, in place when `a` is a temporary of ours. (Summing squares this way is ~4x faster on
    the CPU than linalg.vector_norm over the leading dimensions.)"""
    if a.dtype != torch.float32:
        a, owned = a.float(), True
    return a.square_() if owned else a.square()


def head_scores(
    o: torch.Tensor, token_mask: torch.Tensor | None, metric: str, o_weight_cols: torch.Tensor | None = None
) -> torch.Tensor:
    """Scores of attention heads. o: per-head core outputs (B, T, H, hd) -> (H,) float32.

    o_weight_cols: (d, H*hd), the o_proj columns of these heads, needed by `output`.
    """
    om = _masked(o, token_mask)
    if metric == "l1":
        return om.abs().sum(dim=(0, 1, 3), dtype=torch.float32) / (_token_count(o, token_mask) * o.shape[-1])
    if metric == "output":
        # ||O_h Wo_h^T||_F^2 = <O_h^T O_h, Wo_h^T Wo_h>: two (hd x hd) Grams per head instead of a d-wide product.
        n_heads, hd = o.shape[2], o.shape[3]
        of = om.reshape(-1, n_heads, hd).float()  # (N, H, hd)
        gram_o = torch.einsum("nhi,nhj->hij", of, of)  # (H, hd, hd)
        w = o_weight_cols.detach().float().reshape(-1, n_heads, hd)  # (d, H, hd)
        gram_w = torch.einsum("dhi,dhj->hij", w, w)
        return (gram_o * gram_w).sum(dim=(1, 2)).clamp_min(0).sqrt()
    of = om.reshape(-1, om.shape[2], om.shape[3])  # (N, H, hd)
    return _square_sum(of, token_mask is not None).sum(dim=(0, 2)).sqrt()


def group_scores(head_scores_: torch.Tensor, n_groups: int) -> torch.Tensor:
    """A KV group's score is the sum of its query heads' scores. (H,) -> (n_groups,)"""
    return head_scores_.reshape(n_groups, -1).sum(dim=1)


# -- scoring in one read of the activations (SATConfig.fused_scoring) ----------------------------------------
# Eager, a padded batch's scores take several passes over the activations (the mask multiply, the square, the
# sum) and a head score's reduction over (tokens, head features) is strided. Compiled by inductor, each scoring
# function is one fused reduction kernel that reads the activations once (tests/test_fused_scoring.py reads
# the generated code). "auto" compiles on CUDA (Triton), where scoring is a measurable part of a layer, and not
# on the CPU, where it is under 1% of a step and compiling needs a C++ compiler and seconds of start-up.


def fused_scoring_wanted(mode: str, device_type: str) -> bool:
    """Whether scoring on this device is compiled, for SATConfig.fused_scoring = mode (auto, on, off)."""
    if mode == "off":
        return False
    if mode == "on":
        return True
    if device_type != "cuda":
        return False
    try:
        from torch.utils._triton import has_triton
    except ImportError:
        return False
    return has_triton()


class _Fused:
    """fn compiled once with dynamic shapes (one graph per metric, mask present or not and dtype). A compile that
    fails (no Triton or C++ compiler, an unsupported op) warns once and leaves fn eager: the same scores up to
    float rounding."""

    def __init__(self, fn):
        self.fn, self.compiled, self.failed = fn, None, False

    def __call__(self, *args):
        if self.failed or torch.compiler.is_compiling():  # inside a compiled model: traced with it, and fused there
            return self.fn(*args)
        if self.compiled is None:
            self.compiled = torch.compile(self.fn, dynamic=True, fullgraph=True)
        try:
            return self.compiled(*args)
        except Exception as e:  # noqa: BLE001 - any compile failure; the eager call below re-raises a real error
            self.failed = True
            warnings.warn(f"satlm: fused scoring ({self.fn.__name__}) could not be compiled, so it runs eager "
                          f"(same scores, several passes over the activations); set sat.fused_scoring: off to "
                          f"skip the attempt. The error: {type(e).__name__}: {str(e)[:300]}", stacklevel=2)
            return self.fn(*args)


def _mlp_scores_pure(h, token_mask, metric, down_weight):
    return mlp_scores(h, token_mask, metric, down_weight)  # no in-place scratch: compiled it would copy back


FUSED_MLP_SCORES = _Fused(_mlp_scores_pure)
FUSED_HEAD_SCORES = _Fused(head_scores)
