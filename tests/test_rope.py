"""satlm's RoPE kernels for the kept heads against the architectures' own apply_rotary_pos_emb."""

from __future__ import annotations

import pytest
import torch

from satlm.core.ops import rope, same_rope


def _hf_functions():
    from transformers.models.llama import modeling_llama
    from transformers.models.mistral import modeling_mistral
    from transformers.models.qwen2 import modeling_qwen2

    return [m.apply_rotary_pos_emb for m in (modeling_llama, modeling_mistral, modeling_qwen2)]


def _run(f, q0, k0, cos, sin):
    q, k = q0.detach().clone().requires_grad_(), k0.detach().clone().requires_grad_()
    oq, ok = f(q, k, cos, sin)
    (oq.double().sin().sum() + ok.double().cos().sum()).backward()
    return oq, ok, q.grad, k.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fn", _hf_functions(), ids=["llama", "mistral", "qwen2"])
def test_rope_equals_the_architecture_forward_and_backward(fn, dtype):
    g = torch.Generator().manual_seed(0)
    # q as SAT hands it over: a (B, h, T, hd) view of (B, T, h*hd); k contiguous.
    q0 = torch.randn(2, 7, 3 * 16, generator=g).to(dtype).view(2, 7, 3, 16).transpose(1, 2)
    k0 = torch.randn(2, 2, 7, 16, generator=g).to(dtype)
    cos, sin = (torch.randn(2, 7, 16, generator=g).to(dtype) for _ in "cs")
    theirs, ours = _run(fn, q0, k0, cos, sin), _run(rope, q0, k0, cos, sin)
    for a, b in zip(theirs, ours):
        assert a.dtype == b.dtype and a.shape == b.shape
    if dtype == torch.float32:
        for a, b in zip(theirs, ours):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        return
    # bf16: the two round differently (satlm's multiply-adds round once, not twice); neither may be further
    # from the exact result, computed in float64, than bf16 rounding of the terms allows.
    exact = _run(fn, q0.double(), k0.double(), cos.double(), sin.double())
    for a, b, e in zip(theirs, ours, exact):
        err_theirs, err_ours = (a.double() - e).abs().max().item(), (b.double() - e).abs().max().item()
        assert err_ours <= max(2 * err_theirs, 2 ** -8 * e.abs().max().item()), (err_ours, err_theirs)


def test_same_rope_accepts_the_standard_form_and_rejects_others():
    for fn in _hf_functions():
        assert same_rope(fn, 16)

    def interleaved(q, k, cos, sin, unsqueeze_dim=1):  # GPT-J style: rotates pairs (x0, x1), (x2, x3), ...
        def rot(x):
            return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return q * cos + rot(q) * sin, k * cos + rot(k) * sin

    def partial(q, k, cos, sin, unsqueeze_dim=1):  # rotary on half the head only
        half = q.shape[-1] // 2
        rq, rk = _hf_functions()[0](q[..., :half], k[..., :half], cos[..., :half], sin[..., :half])
        return torch.cat((rq, q[..., half:]), -1), torch.cat((rk, k[..., half:]), -1)

    assert not same_rope(interleaved, 16)
    assert not same_rope(partial, 16)
    assert not same_rope(None, 16)
    assert not same_rope(lambda q, k: (q, k), 16)  # another signature
    assert not same_rope(_hf_functions()[0], 15)  # odd head size
