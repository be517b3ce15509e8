"""forward=dense against the masked dense reference (benchmarks/reference.py), written independently of satlm's code.

The reference runs the plain HF model. At each down and output projection it keeps the forward exact and
cuts the backward to the kept units: the projection's output is its value over the whole input H (MLP
channels) or O (heads), with the gradient of the projection of the kept part only (omitted features zeroed),
so that no gradient flows through an omitted unit and omitted columns of the weight get none (and through
them, nor do the gate/up rows or q rows of omitted units, or k/v rows of groups with no kept head).
Units are chosen by L2 importance of the dense activations over non-padding tokens (top-k). SAT must give
the dense model's loss, the same gradient for every parameter and exactly zero on omitted slices.
"""

from __future__ import annotations

import copy

import pytest
from reference import reference_step, rel_err

import satlm
from conftest import batch, sat_config, tiny_model
from sat_steps import assert_omitted_slices_have_no_gradient, sat_step


CASES = [
    # (arch, heads, kv_heads, attention implementation, other config fields)
    ("llama", 8, 2, "eager", {}),
    ("llama", 4, 4, "eager", {}),
    ("llama", 8, 2, "sdpa", {}),  # the CPU flash path: kept heads' attention from the pass over every head
    ("mistral", 8, 2, "sdpa", {}),
    ("qwen2", 8, 4, "eager", {}),  # q/k/v biases
    ("llama", 8, 2, "sdpa", {"mlp_bias": True, "attention_bias": True}),
    ("llama", 4, 4, "eager", {"hidden_act": "gelu", "mlp_bias": True}),  # the unfused MLP path
]


@pytest.mark.parametrize("arch,heads,kv,impl,extra", CASES)
@pytest.mark.parametrize("unit", ["head", "kv_group"])
@pytest.mark.parametrize("rate", [0.25, 0.5, 0.75])
def test_dense_forward_matches_reference(arch, heads, kv, impl, extra, unit, rate):
    model = tiny_model(arch, heads=heads, kv_heads=kv, attn=impl, **extra)
    ref_model, plain = copy.deepcopy(model), copy.deepcopy(model)
    data = batch()
    dense_loss = plain(**data).loss.detach()
    ref = reference_step(ref_model, data, rate, unit, "dense")
    cfg = sat_config(omission_rate=rate, schedule="constant", selection="topk", metric="l2",
                     source="current", attn_unit=unit, forward="dense")
    loss, grads, kept = sat_step(model, data, cfg)

    assert kept == ref.kept
    # The step's loss is the dense model's, and the reference's (which is dense too).
    assert abs(loss.item() - dense_loss.item()) <= 1e-6 * abs(dense_loss.item())
    assert abs(ref.loss.item() - dense_loss.item()) <= 1e-6 * abs(dense_loss.item())
    for name, g_ref in ref.grads.items():
        assert rel_err(grads[name], g_ref) <= 1e-5, name

    assert_omitted_slices_have_no_gradient(model, kept, unit, heads, kv)


@pytest.mark.parametrize("pad", [False, True], ids=["causal", "padded"])
@pytest.mark.parametrize("metric,selection", [("l2", "sample"), ("random", "topk"), ("output", "sample")])
def test_dense_forward_loss_is_the_dense_models_for_every_metric(metric, selection, pad):
    """Whatever is kept, the step's loss (and so what the Trainer logs) is the dense model's; the selections
    that cannot be reproduced by the reference still give gradients only on kept units."""
    model = tiny_model(attn="sdpa")
    plain = copy.deepcopy(model)
    data = batch(pad=pad)
    dense_loss = plain(**data).loss
    satlm.apply_sat(model, sat_config(omission_rate=0.5, schedule="constant", metric=metric,
                                      selection=selection, forward="dense"))
    loss = model(**data).loss
    assert abs(loss.item() - dense_loss.item()) <= 1e-6 * abs(dense_loss.item())
    loss.backward()
    for entry in satlm.sat_state(model)["layers"]:
        mlp = model.model.layers[entry["layer"]].mlp.base_layer
        off = sorted(set(range(mlp.gate_proj.out_features)) - set(entry["mlp"]["kept"]))
        assert mlp.down_proj.weight.grad[:, off].abs().max() == 0
        assert mlp.gate_proj.weight.grad[off].abs().max() == 0


def test_dense_forward_with_separate_rates_and_heads_off():
    """attn_omission_rate 0 keeps every head (dense attention backward); channels still omitted."""
    model = tiny_model()
    ref_model = copy.deepcopy(model)
    data = batch()
    ref = reference_step(ref_model, data, 0.5, "head", "dense", attn_rate=0.0)
    cfg = sat_config(omission_rate=0.5, attn_omission_rate=0.0, schedule="constant", selection="topk",
                     forward="dense")
    loss, grads, kept = sat_step(model, data, cfg)
    assert kept == ref.kept
    assert abs(loss.item() - ref.loss.item()) <= 1e-6 * abs(ref.loss.item())
    for name, g_ref in ref.grads.items():
        assert rel_err(grads[name], g_ref) <= 1e-5, name


def test_dense_forward_under_gradient_checkpointing_matches_reference():
    """The recomputation in the backward (same kept units) gives the same gradients."""
    model = tiny_model(attn="sdpa")
    ref_model = copy.deepcopy(model)
    data = batch()
    ref = reference_step(ref_model, data, 0.5, "head", "dense")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    cfg = sat_config(omission_rate=0.5, schedule="constant", selection="topk", forward="dense")
    loss, grads, _ = sat_step(model, data, cfg)
    assert abs(loss.item() - ref.loss.item()) <= 1e-6 * abs(ref.loss.item())
    for name, g_ref in ref.grads.items():
        assert rel_err(grads[name], g_ref) <= 1e-5, name


def test_history_with_dense_forward_is_refused():
    with pytest.raises(satlm.SATConfigError, match="forward='dense' needs source='current'"):
        satlm.SATConfig(source="history", forward="dense")
    with pytest.raises(satlm.SATConfigError, match="forward"):
        satlm.SATConfig(forward="both")
