"""Partial freezing: any subset of projection weights and biases with requires_grad=False.

The trainable rest must get the masked dense reference's gradients (both sources, both forwards), and the
frozen ones none at all, and no FLOPs are spent on them. (An off-by-one in the fused MLP's needs_input_grad
once gave down_proj no gradient whenever up_proj was frozen, silently.)
"""

from __future__ import annotations

import copy

import pytest
from torch.utils.flop_counter import FlopCounterMode

from reference import reference_step, rel_err

import satlm
from conftest import batch, sat_config, tiny_model
from sat_steps import history_step_and_reference, sat_step

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FROZEN_SETS = [
    ("up_proj",), ("gate_proj",), ("down_proj",), ("gate_proj", "up_proj"), ("gate_proj", "up_proj", "down_proj"),
    ("q_proj",), ("k_proj", "v_proj"), ("o_proj",), ("q_proj", "k_proj", "v_proj", "o_proj"),
    ("up_proj", "v_proj"), ("gate_proj.bias",), ("down_proj.weight", "up_proj.bias", "k_proj.bias"),
    PROJ,
]


def freeze(model, names) -> None:
    for n, p in model.named_parameters():
        plain = n.replace("base_layer.", "")
        if any(f".{name}." in plain or plain.endswith(f".{name}") for name in names):
            p.requires_grad_(False)


def biased_model():
    return tiny_model(attention_bias=True, mlp_bias=True, attn="sdpa")


def check(grads: dict, ref_grads: dict, frozen_names: set) -> None:
    """The trainable parameters' gradients equal the reference's; the frozen ones have none."""
    assert set(grads) == set(ref_grads)
    for name, g_ref in ref_grads.items():
        if name in frozen_names:
            assert grads[name] is None and g_ref is None, f"{name} is frozen but got a gradient"
        else:
            assert grads[name] is not None, f"{name} is trainable but got no gradient"
            assert rel_err(grads[name], g_ref) <= 1e-5, name


@pytest.mark.parametrize("frozen", FROZEN_SETS, ids=lambda f: "+".join(f))
@pytest.mark.parametrize("mode", ["current", "history", "current-dense"])
def test_frozen_subset_matches_reference(frozen, mode):
    model = biased_model()
    freeze(model, frozen)
    frozen_names = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen_names
    data = batch()
    if mode == "history":
        (loss, grads, _), ref = history_step_and_reference(model, data, batch(seed=3), 0.5, "head")
    else:
        forward = "dense" if mode == "current-dense" else "sparse"
        ref = reference_step(copy.deepcopy(model), data, 0.5, "head", forward)
        cfg = sat_config(omission_rate=0.5, schedule="constant", selection="topk", forward=forward)
        loss, grads, kept = sat_step(model, data, cfg)
        assert kept == ref.kept
    assert abs(loss.item() - ref.loss.item()) <= 1e-5 * abs(ref.loss.item())
    check(grads, ref.grads, frozen_names)


def test_history_frozen_gets_no_gradient():
    """history: frozen parameters stay without a gradient (the reference helper above compares the rest)."""
    model = biased_model()
    freeze(model, ("up_proj", "o_proj.weight"))
    satlm.apply_sat(model, sat_config(omission_rate=0.5, schedule="constant", source="history"))
    for seed in (3, 4):
        model(**batch(seed=seed)).loss.backward()
    for n, p in model.named_parameters():
        if "up_proj" in n or "o_proj.weight" in n:
            assert p.grad is None, n
        elif "layers" in n:
            assert p.grad is not None, n


@pytest.mark.parametrize("mode", ["current", "history", "current-dense"])
def test_frozen_projections_cost_no_weight_gradient_flops(mode):
    """A frozen weight gets no weight-gradient GEMM: freezing all of the MLP's weights takes exactly their
    weight-gradient FLOPs (2 N d k each for gate, up and down) out of the step."""
    source, forward = mode.split("-")[0], "dense" if mode.endswith("dense") else "sparse"

    def step_flops(frozen):
        model = tiny_model(attn="eager")
        freeze(model, frozen)
        satlm.apply_sat(model, sat_config(omission_rate=0.5, schedule="constant", source=source,
                                          forward=forward, seed=1))
        data = batch(pad=False)
        if source == "history":
            model(**data).loss.backward()
            model.zero_grad(set_to_none=True)
        with FlopCounterMode(display=False) as counter:
            model(**data).loss.backward()
        kept = [len(e["mlp"]["kept"]) for e in satlm.sat_state(model)["layers"]]
        return counter.get_total_flops(), kept

    full, kept = step_flops(())
    frozen, kept_f = step_flops(("gate_proj.weight", "up_proj.weight", "down_proj.weight"))
    assert kept == kept_f
    d, n = 64, 3 * 16
    expected = sum(3 * 2 * n * d * k for k in kept)
    assert full - frozen == expected, (full, frozen, expected)
