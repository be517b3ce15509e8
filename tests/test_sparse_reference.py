"""Paper mode (forward="sparse") and history mode against the masked dense reference (benchmarks/reference.py),
written independently of satlm's code.

The reference runs the plain HF model and multiplies the outputs of omitted units by zero just before
the down and output projections, choosing them by L2 importance over non-padding tokens (top-k).
SAT must give the same loss and the same gradient for every parameter, and exactly zero gradient on
omitted slices.
"""

from __future__ import annotations

import copy

import pytest
import torch
from reference import reference_step, rel_err

import satlm
from conftest import batch, sat_config, tiny_model
from sat_steps import (assert_omitted_slices_have_no_gradient, history_step_and_reference, sat_step,
                       sat_step_applied)


CASES = [
    # (arch, heads, kv_heads, attention implementation, other config fields)
    ("llama", 8, 2, "eager", {}),
    ("llama", 4, 4, "eager", {}),
    ("llama", 8, 2, "sdpa", {}),
    ("mistral", 8, 2, "sdpa", {}),
    ("qwen2", 8, 4, "eager", {}),
    # MLP biases (the fused SiLU MLP), and a non-SiLU activation (the unfused MLP path)
    ("llama", 8, 2, "sdpa", {"mlp_bias": True, "attention_bias": True}),
    ("llama", 4, 4, "eager", {"hidden_act": "gelu", "mlp_bias": True}),
]


@pytest.mark.parametrize("arch,heads,kv,impl,extra", CASES)
@pytest.mark.parametrize("unit", ["head", "kv_group"])
@pytest.mark.parametrize("rate", [0.25, 0.5, 0.75])
def test_current_topk_matches_masked_dense_reference(arch, heads, kv, impl, extra, unit, rate):
    model = tiny_model(arch, heads=heads, kv_heads=kv, attn=impl, **extra)
    ref_model = copy.deepcopy(model)
    data = batch()
    ref = reference_step(ref_model, data, rate, unit)
    cfg = sat_config(omission_rate=rate, schedule="constant", selection="topk", metric="l2",
                     source="current", attn_unit=unit)
    loss, grads, kept = sat_step(model, data, cfg)

    assert kept == ref.kept
    assert abs(loss.item() - ref.loss.item()) <= 1e-5 * abs(ref.loss.item())
    for name, g_ref in ref.grads.items():
        assert rel_err(grads[name], g_ref) <= 1e-5, name

    # Omitted slices get exactly zero gradient.
    assert_omitted_slices_have_no_gradient(model, kept, unit, heads, kv)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_rate_zero_is_bit_identical(arch):
    model = tiny_model(arch)
    ref = copy.deepcopy(model)
    data = batch()
    ref_loss = ref(**data).loss
    ref_loss.backward()
    satlm.apply_sat(model, sat_config(omission_rate=0.0))
    loss = model(**data).loss
    loss.backward()
    assert torch.equal(loss, ref_loss)
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, ref_params[name.replace("base_layer.", "")].grad), name


def test_dense_tail_of_ladder_is_bit_identical():
    """The ladder's last stretch runs dense: identical to the unpatched model."""
    model = tiny_model()
    ref = copy.deepcopy(model)
    data = batch()
    satlm.apply_sat(model, sat_config(omission_rate=0.5, schedule="ladder", dense_tail=0.2))
    assert satlm.set_sat_step(model, 95, 100) == (0.0, 0.0)
    assert torch.equal(model(**data).loss, ref(**data).loss)


@pytest.mark.parametrize("arch,heads,kv,impl,extra", [CASES[0], CASES[3], CASES[4], CASES[5], CASES[6]])
@pytest.mark.parametrize("unit", ["head", "kv_group"])
@pytest.mark.parametrize("rate", [0.25, 0.75])
def test_history_matches_masked_dense_reference(arch, heads, kv, impl, extra, unit, rate):
    """History mode computes only the kept units: the same loss and gradients as masking the rest."""
    model = tiny_model(arch, heads=heads, kv_heads=kv, attn=impl, **extra)
    (loss, grads, kept), ref = history_step_and_reference(model, batch(), batch(seed=3), rate, unit)
    assert any(len(v) < (heads if c == "attn" and unit == "head" else kv if c == "attn" else 96)
               for (_, c), v in kept.items())
    assert abs(loss.item() - ref.loss.item()) <= 1e-5 * abs(ref.loss.item())
    for name, g_ref in ref.grads.items():
        assert rel_err(grads[name], g_ref) <= 1e-5, name


@pytest.mark.parametrize("pad", [False, True], ids=["causal", "padded"])
@pytest.mark.parametrize("unit", ["head", "kv_group"])
@pytest.mark.parametrize("arch,heads,kv", [("llama", 8, 2), ("mistral", 4, 4)])
def test_paper_mode_reuses_the_scoring_pass_attention(monkeypatch, arch, heads, kv, unit, pad):
    """With SDPA on the CPU, paper mode takes the kept heads' attention from its scoring pass: one flash forward
    per layer (over every head), no second attention call, and the flash backward over kept heads only. It
    must still equal the masked dense reference, with and without a padding mask (is_causal=True path)."""
    import satlm.core.ops as ops

    calls = {"flash": 0, "sdpa": 0, "backward_heads": [], "kv_heads": [], "backward_kv_heads": []}
    flash, flash_backward = ops._FLASH_CPU, ops._FLASH_CPU_BACKWARD

    def counting_flash(q, k, *args, **kwargs):
        calls["flash"] += 1
        calls["kv_heads"].append(k.shape[1])
        return flash(q, k, *args, **kwargs)

    def counting_backward(grad, q, k, *args, **kwargs):
        calls["backward_heads"].append(q.shape[1])
        calls["backward_kv_heads"].append(k.shape[1])
        return flash_backward(grad, q, k, *args, **kwargs)

    model = tiny_model(arch, heads=heads, kv_heads=kv, attn="sdpa")
    ref_model = copy.deepcopy(model)
    data = batch(pad=pad)
    ref = reference_step(ref_model, data, 0.5, unit)

    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls["sdpa"] += 1
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(ops, "_FLASH_CPU", counting_flash)
    monkeypatch.setattr(ops, "_FLASH_CPU_BACKWARD", counting_backward)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    cfg = sat_config(omission_rate=0.5, schedule="constant", selection="topk", metric="l2",
                     source="current", attn_unit=unit)
    satlm.apply_sat(model, cfg)
    calls.update(flash=0, sdpa=0, backward_heads=[], kv_heads=[], backward_kv_heads=[])  # not apply_sat's check
    loss, grads, kept = sat_step_applied(model, data)

    layers = model.config.num_hidden_layers
    assert calls["flash"] == layers and calls["sdpa"] == 0
    rep = heads // kv if unit == "kv_group" else 1
    assert calls["backward_heads"] == [len(kept[(i, "attn")]) * rep for i in reversed(range(layers))]
    # the flash kernel takes grouped K/V: the scoring pass gets the model's K/V heads, the kv_group unit's kept
    # heads their kept groups (no copy per query head); the head unit's kept heads one K/V each (irregular groups)
    assert calls["kv_heads"] == [kv] * layers
    assert calls["backward_kv_heads"] == [len(kept[(i, "attn")]) for i in reversed(range(layers))]
    assert kept == ref.kept
    assert abs(loss.item() - ref.loss.item()) <= 1e-5 * abs(ref.loss.item())
    for name, g_ref in ref.grads.items():
        assert rel_err(grads[name], g_ref) <= 1e-5, name


def test_paper_mode_attends_again_where_the_flash_kernel_is_not_used():
    """Eager attention (and the random metric, which runs no scoring pass) attend the kept heads again."""
    import satlm.core.ops as ops

    for attn, metric in (("eager", "l2"), ("sdpa", "random")):
        model = tiny_model(attn=attn)
        satlm.apply_sat(model, sat_config(omission_rate=0.5, schedule="constant", source="current",
                                          metric=metric))
        called = []
        orig = ops._FLASH_CPU
        ops._FLASH_CPU = lambda *a, **k: called.append(1) or orig(*a, **k)
        try:
            model(**batch()).loss.backward()
        finally:
            ops._FLASH_CPU = orig
        assert not called, (attn, metric)
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
