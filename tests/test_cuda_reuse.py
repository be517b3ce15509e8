"""Paper mode's reuse of its scoring pass through CUDA's attention kernels, checked on the CPU.

There is no GPU here, so PyTorch's CUDA flash and memory-efficient ops are replaced by emulations written
here from their schemas (`torch.ops.aten._scaled_dot_product_flash_attention` and
`_scaled_dot_product_efficient_attention`, forward and backward): float64 attention that returns what each
op returns (the flash kernel's 9-tuple, the efficient kernel's log-sum-exp padded to 32 rows) and asserts
what each op requires (one dtype for q/k/v; no mask for flash; for the efficient kernel a bias of q's dtype,
broadcast over (B, H, T, S), its rows aligned to 16 elements, and K/V per query head, where flash takes grouped
K/V as flash-attention does: a K/V head count that divides the query heads', dk/dv per K/V head). satlm is made
to pick them on the CPU; the model must then equal the masked dense reference (benchmarks/reference.py) and
attend once per layer.
What this cannot check is the GPU kernels themselves: benchmarks/gpu_check.py does that on a device.
"""

from __future__ import annotations

import copy

import pytest
import torch
from reference import reference_step, rel_err

import satlm
import satlm.core.ops as ops
import satlm.modeling.attention as attention
from conftest import batch, sat_config, tiny_model
from sat_steps import sat_step_applied


def _math(q, k, v, bias, is_causal, scale):
    rep = q.shape[1] // k.shape[1]  # grouped K/V: query head h attends with K/V head h // rep
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.double()
    if is_causal:
        T, S = s.shape[-2:]
        s = s.masked_fill(~torch.ones(T, S, dtype=torch.bool).tril(), float("-inf"))
    # a fully masked row (left padding) attends to nothing: output 0, and no NaN in any gradient
    empty = torch.isneginf(s).all(-1, keepdim=True)
    s = torch.where(empty, torch.zeros_like(s), s)
    lse = s.logsumexp(-1)
    p = (s - lse[..., None]).exp() * ~empty
    return p @ v.double(), lse


def _bmhk(out, dtype):
    """(B, H, T, hd) with the kernels' memory layout (B, T, H, hd)."""
    return out.to(dtype).transpose(1, 2).contiguous().transpose(1, 2)


def _grads(grad, q, k, v, bias, is_causal, scale, out, lse):
    with torch.enable_grad():  # a backward runs with grad mode off
        qq, kk, vv = (t.detach().double().requires_grad_() for t in (q, k, v))
        o, l = _math(qq, kk, vv, bias, is_causal, scale)
        gq, gk, gv = torch.autograd.grad(o, (qq, kk, vv), grad.double())
    # the saved output and log-sum-exp must be the kept heads' own (a wrong slice fails here)
    finite, tol = torch.isfinite(l), (1e-4 if q.dtype == torch.float32 else 3e-2)
    assert torch.allclose(l[finite], lse[..., : l.shape[-1]].double()[finite], atol=tol), "logsumexp of other heads"
    assert torch.allclose(o.detach(), out.double(), atol=tol), "output of other heads"
    return gq.to(q.dtype), gk.to(k.dtype), gv.to(v.dtype)


class Emulated:
    def __init__(self):
        self.calls: list = []

    def _check_qkv(self, q, k, v, grouped=False):
        assert q.dtype == k.dtype == v.dtype, (q.dtype, k.dtype, v.dtype)
        assert k.shape == v.shape and k.shape[1] <= q.shape[1]
        if grouped:
            assert q.shape[1] % k.shape[1] == 0, "the K/V heads must divide the query heads"
        else:
            assert q.shape[1] == k.shape[1], "heads must be repeated per query head"
        assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1

    def flash(self, q, k, v, dropout_p=0.0, is_causal=False, return_debug_mask=False, *, scale=None):
        self._check_qkv(q, k, v, grouped=True)
        assert dropout_p == 0.0 and not return_debug_mask
        self.calls.append(("flash", q.shape[1], q.dtype, k.shape[1]))
        out, lse = _math(q, k, v, None, is_causal, scale)
        e = torch.empty(0)
        return (_bmhk(out, q.dtype), lse.float(), e, e, q.shape[2], k.shape[2], torch.zeros(2, dtype=torch.int64), e, e)

    def flash_backward(self, grad, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, dropout_p, is_causal, rng, unused,
                       *, scale=None):
        self._check_qkv(q, k, v, grouped=True)
        assert (max_q, max_k) == (q.shape[2], k.shape[2]) and lse.shape == q.shape[:3] and dropout_p == 0.0
        assert rng.dtype == torch.int64
        self.calls.append(("flash_backward", q.shape[1], q.dtype, k.shape[1]))
        return _grads(grad, q, k, v, None, is_causal, scale, out, lse)

    def _check_bias(self, bias, q, k):
        assert bias is not None, "the efficient kernel is for masked batches"
        assert bias.dtype == q.dtype, (bias.dtype, q.dtype)
        assert tuple(bias.shape) == (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        assert bias.stride(-1) == 1 and bias.stride(-2) % ops.EFFICIENT_BIAS_ALIGN == 0, bias.stride()

    def efficient(self, q, k, v, attn_bias, compute_log_sumexp, dropout_p=0.0, is_causal=False, *, scale=None):
        self._check_qkv(q, k, v)
        self._check_bias(attn_bias, q, k)
        assert compute_log_sumexp and dropout_p == 0.0
        self.calls.append(("efficient", q.shape[1], q.dtype, k.shape[1]))
        out, lse = _math(q, k, v, attn_bias, is_causal, scale)
        T = q.shape[2]
        padded = torch.full((*lse.shape[:2], -(-T // 32) * 32), float("inf"))  # the kernel pads rows to 32
        padded[..., :T] = lse
        seed = offset = torch.zeros((), dtype=torch.int64)
        return _bmhk(out, q.dtype), padded.float(), seed, offset

    def efficient_backward(self, grad, q, k, v, attn_bias, out, lse, seed, offset, dropout_p, grad_input_mask,
                           is_causal=False, *, scale=None):
        self._check_qkv(q, k, v)
        self._check_bias(attn_bias, q, k)
        assert list(grad_input_mask) == [True, True, True, False] and lse.shape[-1] % 32 == 0
        self.calls.append(("efficient_backward", q.shape[1], q.dtype, k.shape[1]))
        return (*_grads(grad, q, k, v, attn_bias, is_causal, scale, out, lse), torch.empty(0))


@pytest.fixture
def emulated(monkeypatch):
    e = Emulated()
    monkeypatch.setattr(ops, "_FLASH_CUDA", e.flash)
    monkeypatch.setattr(ops, "_FLASH_CUDA_BACKWARD", e.flash_backward)
    monkeypatch.setattr(ops, "_EFFICIENT", e.efficient)
    monkeypatch.setattr(ops, "_EFFICIENT_BACKWARD", e.efficient_backward)
    ops.CUDA_REUSE_COUNTS.clear()
    yield e
    ops.CUDA_REUSE_COUNTS.clear()


def _pick(kind_for_mask):
    """reuse_kernel as it answers on CUDA, asked on the CPU: flash without a mask, efficient with one."""
    return lambda device, dtype, masked, head_dim, autocast=False: kind_for_mask[masked]


def _sdpa_counter(monkeypatch):
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    return calls


@pytest.mark.parametrize("forward", ["sparse", "dense"])
@pytest.mark.parametrize("pad", [False, True], ids=["causal-flash", "padded-efficient"])
@pytest.mark.parametrize("unit,heads,kv", [("head", 8, 2), ("kv_group", 8, 2), ("head", 4, 4)])
def test_cuda_kernels_reuse_the_scoring_pass_and_match_the_reference(monkeypatch, emulated, unit, heads, kv, pad,
                                                                     forward):
    model = tiny_model(heads=heads, kv_heads=kv, attn="sdpa")
    ref_model = copy.deepcopy(model)
    data = batch(t=12, pad=pad)  # T=12: the bias rows need padding to 16
    if forward == "sparse":
        ref = reference_step(ref_model, data, 0.5, unit)
    satlm.apply_sat(model, sat_config(omission_rate=0.5, schedule="constant", selection="topk", metric="l2",
                                      source="current", attn_unit=unit, forward=forward))
    monkeypatch.setattr(attention, "reuse_kernel", _pick({False: "flash", True: "efficient"}))
    sdpa_calls = _sdpa_counter(monkeypatch)
    emulated.calls.clear()
    loss, grads, kept = sat_step_applied(model, data)

    layers = model.config.num_hidden_layers
    kind = "efficient" if pad else "flash"
    rep = heads // kv if unit == "kv_group" else 1
    forwards = [c for c in emulated.calls if not c[0].endswith("backward")]
    backwards = [c[1] for c in emulated.calls if c[0].endswith("backward")]
    # one attention per layer; flash gets the model's K/V heads as they are (no copy per query head)
    assert forwards == [(kind, heads, torch.float32, kv if kind == "flash" else heads)] * layers and not sdpa_calls
    assert backwards == [len(kept[(i, "attn")]) * rep for i in reversed(range(layers))]  # kept heads only
    # the kept K/V: grouped for flash under kv_group (regular groups); per kept head otherwise (head unit: which
    # groups the kept heads use is irregular; the efficient kernel takes one K/V per query head)
    kv_heads = [c[3] for c in emulated.calls if c[0].endswith("backward")]
    assert kv_heads == [len(kept[(i, "attn")]) * (1 if kind == "flash" else rep) for i in reversed(range(layers))]
    assert ops.CUDA_REUSE_COUNTS == {kind: layers}
    if forward == "sparse":
        assert kept == ref.kept
        assert abs(loss.item() - ref.loss.item()) <= 1e-5 * abs(ref.loss.item())
        for name, g_ref in ref.grads.items():
            assert rel_err(grads[name], g_ref) <= 1e-5, name
    else:  # forward=dense: the same step with the kernels not reused (the recompute path, tested elsewhere)
        monkeypatch.setattr(attention, "reuse_kernel", lambda *a, **k: None)
        other = copy.deepcopy(ref_model)
        satlm.apply_sat(other, sat_config(omission_rate=0.5, schedule="constant", selection="topk", metric="l2",
                                          source="current", attn_unit=unit, forward=forward))
        loss2, grads2, kept2 = sat_step_applied(other, data)
        assert kept == kept2 and abs(loss.item() - loss2.item()) <= 1e-5 * abs(loss2.item())
        for name, g in grads2.items():
            assert rel_err(grads[name], g) <= 1e-5, name


def test_autocast_casts_q_k_v_as_sdpa_does(monkeypatch, emulated):
    """Under autocast the kernels get q/k/v in the autocast dtype (q is fp32 after RoPE, v is not), as SDPA
    casts them, and the gradients flow back through the casts to the fp32 master weights."""
    model = tiny_model(heads=8, kv_heads=2, attn="sdpa")
    ref_model = copy.deepcopy(model)
    data = batch(t=12, pad=True)
    satlm.apply_sat(model, sat_config(omission_rate=0.5, schedule="constant", selection="topk", metric="l2",
                                      source="current", forward="sparse"))
    monkeypatch.setattr(attention, "reuse_kernel", _pick({False: "flash", True: "efficient"}))
    emulated.calls.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads, kept = sat_step_applied(model, data)
    assert {c[2] for c in emulated.calls} == {torch.bfloat16}
    assert len(emulated.calls) == 2 * model.config.num_hidden_layers
    assert all(g is None or g.dtype == torch.float32 for g in grads.values())
    # against the masked reference under the same autocast, masked with SAT's own kept sets (bf16 near-ties)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = reference_step(ref_model, data, kept=kept)
    assert abs(loss.item() - ref.loss.item()) <= 3e-2 * abs(ref.loss.item())
    for name, g_ref in ref.grads.items():
        if g_ref is not None and g_ref.norm() > 0:
            assert rel_err(grads[name], g_ref) <= 5e-2, name


@pytest.mark.parametrize("kind,unit,kv", [("efficient", "head", 2), ("flash", "kv_group", 4)])
def test_a_refused_kernel_falls_back_to_the_same_gradients(monkeypatch, emulated, kind, unit, kv):
    """A kernel the GPU or build refuses (RuntimeError) costs the reuse, not the gradient: forward refused, the
    kept heads are attended again; backward refused, their attention is recomputed with autograd (flash under
    kv_group: from grouped K/V, 2 kept groups of 4 heads, so that a missing enable_gqa cannot broadcast)."""
    data = batch(t=12, pad=kind == "efficient")
    base = tiny_model(heads=8, kv_heads=kv, attn="sdpa")
    cfg = sat_config(omission_rate=0.5, schedule="constant", selection="topk", metric="l2", source="current",
                     attn_unit=unit)
    ref = reference_step(copy.deepcopy(base), data, 0.5, unit)
    op = "_EFFICIENT" if kind == "efficient" else "_FLASH_CUDA"

    def refuse(*a, **k):
        raise RuntimeError("No available kernel")

    for where in ("forward", "backward"):
        model = copy.deepcopy(base)
        satlm.apply_sat(model, cfg)
        monkeypatch.setattr(attention, "reuse_kernel", _pick({False: "flash", True: "efficient"}))
        monkeypatch.setattr(ops, op if where == "forward" else f"{op}_BACKWARD", refuse)
        ops.CUDA_REUSE_COUNTS.clear()
        loss, grads, _ = sat_step_applied(model, data)
        assert ops.CUDA_REUSE_COUNTS.get(f"fallback:{where}") == model.config.num_hidden_layers, where
        assert abs(loss.item() - ref.loss.item()) <= 1e-5 * abs(ref.loss.item())
        for name, g_ref in ref.grads.items():
            assert rel_err(grads[name], g_ref) <= 1e-5, (where, name)
        monkeypatch.undo()
        for name, fn in [("_FLASH_CUDA", emulated.flash), ("_FLASH_CUDA_BACKWARD", emulated.flash_backward),
                         ("_EFFICIENT", emulated.efficient), ("_EFFICIENT_BACKWARD", emulated.efficient_backward)]:
            monkeypatch.setattr(ops, name, fn)


def test_reuse_kernel_choices():
    """What satlm picks on each device (the real ops, where this PyTorch has them)."""
    f32, bf16 = torch.float32, torch.bfloat16
    assert ops.reuse_kernel("cpu", f32, True, 64) == ("cpu" if ops.flash_cpu_available() else None)
    assert ops.reuse_kernel("cpu", bf16, False, 64, autocast=True) is None  # CPU autocast: left to SDPA
    if ops._FLASH_CUDA is not None:
        assert ops.reuse_kernel("cuda", bf16, False, 64) == "flash"
        assert ops.reuse_kernel("cuda", f32, False, 64) is None  # flash is half precision only
    if ops._EFFICIENT is not None:
        assert ops.reuse_kernel("cuda", f32, True, 64) == "efficient"
        assert ops.reuse_kernel("cuda", bf16, True, 64) == "efficient"
    assert ops.reuse_kernel("cuda", bf16, False, 60) is None  # head size not a multiple of 8
    assert ops.reuse_kernel("mps", bf16, False, 64) is None
