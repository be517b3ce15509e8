"""Importance scoring in one read of the activations (SATConfig.fused_scoring).

Compiled by inductor (here its C++ backend; Triton on CUDA), each scoring function must be one fused reduction
kernel (read from the generated code, so that a second pass over the activations fails the test), give the eager
scores, and, switched on in a model, the same kept sets and gradients as eager scoring. A compile that fails
warns and leaves scoring eager.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch

import satlm
import satlm.core.importance as importance
from conftest import batch, sat_config, tiny_model
from satlm.config import SATConfig, SATConfigError


@pytest.fixture
def fresh_fused(monkeypatch):
    """New compiled wrappers for each test (the module-level ones would carry graphs between tests)."""
    torch._dynamo.reset()
    monkeypatch.setattr(importance, "FUSED_MLP_SCORES", importance._Fused(importance._mlp_scores_pure))
    monkeypatch.setattr(importance, "FUSED_HEAD_SCORES", importance._Fused(importance.head_scores))
    yield importance
    torch._dynamo.reset()


def _kernels(fn, *args) -> list[str]:
    """The kernels inductor's code for fn(*args) runs: those it generated (C++ or Triton) and library calls."""
    from torch._inductor.utils import run_and_get_code

    _, code = run_and_get_code(fn, *args)
    code = "\n".join(code)
    generated = re.findall(r"^(\w+) = async_compile\.(?:cpp_pybinding|cpp|triton)\(", code, re.M)
    return generated + re.findall(r"extern_kernels\.\w+\(", code)


def _padded_mask(B, T):
    m = torch.ones(B, T, dtype=torch.long)
    m[0, : T // 3] = 0  # left padding in the first row
    m[1, T - 2:] = 0  # right padding in the second
    return m


@pytest.mark.parametrize("which", ["head", "mlp"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_l2_scoring_is_one_fused_kernel_with_the_eager_scores(fresh_fused, which, padded):
    torch.manual_seed(0)
    B, T = 3, 20
    a = torch.randn(B, T, 4, 16) if which == "head" else torch.randn(B, T, 48)
    mask = _padded_mask(B, T) if padded else None
    fused = fresh_fused.FUSED_HEAD_SCORES if which == "head" else fresh_fused.FUSED_MLP_SCORES
    eager = importance.head_scores if which == "head" else importance.mlp_scores
    fused.compiled = torch.compile(fused.fn, dynamic=True, fullgraph=True)
    kernels = _kernels(fused.compiled, a, mask, "l2", None)
    # the mask multiply, square, sum and square root in one kernel: the activations are read once
    assert len(kernels) == 1, kernels
    got, ref = fused(a, mask, "l2", None), eager(a, mask, "l2", None)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # a second shape reuses the dynamic graph
    a2 = a[:, :7].contiguous()
    m2 = None if mask is None else mask[:, :7].contiguous()
    torch.testing.assert_close(fused(a2, m2, "l2", None), eager(a2, m2, "l2", None), rtol=1e-5, atol=1e-5)
    assert not fused.failed


@pytest.mark.integration
@pytest.mark.parametrize("metric", ["l1", "output"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_other_metrics_and_bf16_match_eager(fresh_fused, metric, dtype):
    torch.manual_seed(1)
    B, T, H, hd, f, d = 2, 24, 4, 16, 40, 32
    mask = _padded_mask(B, T)
    o, h = torch.randn(B, T, H, hd, dtype=dtype), torch.randn(B, T, f, dtype=dtype)
    w_o, w_d = torch.randn(d, H * hd, dtype=dtype), torch.randn(d, f, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for m in (None, mask):
        torch.testing.assert_close(fresh_fused.FUSED_HEAD_SCORES(o, m, metric, w_o),
                                   importance.head_scores(o, m, metric, w_o), rtol=tol, atol=tol)
        torch.testing.assert_close(fresh_fused.FUSED_MLP_SCORES(h, m, metric, w_d),
                                   importance.mlp_scores(h, m, metric, w_d), rtol=tol, atol=tol)
    assert not (fresh_fused.FUSED_HEAD_SCORES.failed or fresh_fused.FUSED_MLP_SCORES.failed)


def _step(model, data):
    model.zero_grad(set_to_none=True)
    loss = model(**data).loss
    loss.backward()
    mods = satlm.modeling.patch._sat_modules(model)
    kept = [m.sat_last_kept.clone() for m in mods]
    scores = [m.sat_last_scores.clone() for m in mods]
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, kept, scores


@pytest.mark.parametrize("source,forward", [("current", "sparse"), ("current", "dense"), ("history", "sparse")])
def test_fused_scoring_in_a_model_gives_eager_scoring_selections_and_gradients(fresh_fused, source, forward):
    """Paper mode (both forwards) and history, heads and channels, a padded batch (the masked scoring) and an
    unpadded one; fused on against off, over two steps (history scores what the first step observed)."""
    base = tiny_model(attn="sdpa")
    runs = {}
    for mode in ("off", "on"):
        model = copy.deepcopy(base)
        satlm.apply_sat(model, sat_config(omission_rate=0.5, attn_omission_rate=0.5, schedule="constant",
                                          source=source, forward=forward, fused_scoring=mode))
        runs[mode] = [_step(model, batch(pad=pad)) for pad in (True, False)]
    assert fresh_fused.FUSED_HEAD_SCORES.compiled is not None and fresh_fused.FUSED_MLP_SCORES.compiled is not None
    assert not (fresh_fused.FUSED_HEAD_SCORES.failed or fresh_fused.FUSED_MLP_SCORES.failed)
    for (l1, g1, k1, s1), (l2, g2, k2, s2) in zip(runs["off"], runs["on"]):
        for a, b in zip(s1, s2):  # the scores themselves (a wrong score need not change a tiny model's kept set)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert all(torch.equal(a, b) for a, b in zip(k1, k2))
        torch.testing.assert_close(l1, l2, rtol=1e-6, atol=1e-6)
        for n in g1:
            torch.testing.assert_close(g1[n], g2[n], rtol=1e-5, atol=1e-6)


def test_a_compile_that_fails_warns_once_and_scores_eager(fresh_fused, monkeypatch):
    def broken(fn, **kw):
        def run(*a):
            raise RuntimeError("no C++ compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    fused = importance._Fused(importance.head_scores)
    o, mask = torch.randn(2, 8, 4, 16), _padded_mask(2, 8)
    with pytest.warns(UserWarning, match="fused_scoring: off"):
        got = fused(o, mask, "l2", None)
    torch.testing.assert_close(got, importance.head_scores(o, mask, "l2", None))
    assert fused.failed
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        fused(o, mask, "l2", None)


def test_when_scoring_is_fused():
    from torch.utils._triton import has_triton

    assert not importance.fused_scoring_wanted("auto", "cpu")  # the CPU stays eager unless asked
    assert importance.fused_scoring_wanted("on", "cpu")
    assert not importance.fused_scoring_wanted("off", "cuda")
    assert importance.fused_scoring_wanted("auto", "cuda") == has_triton()
    with pytest.raises(SATConfigError, match="fused_scoring.*auto, on, off"):
        SATConfig(fused_scoring="yes")
