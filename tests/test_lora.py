"""SAT on a peft LoRA model: the sparse path runs base + LoRA over the kept units, exactly.

For q/k/v/gate/up the kept output features are rows of the base weight and of B; for o/down the kept input
features are columns of the base weight and of A. Every trainable gradient (LoRA A/B, modules_to_save, any
unfrozen base parameter) and the loss must equal the masked dense reference of the same peft model (float64,
GQA, padding), in paper mode with both forwards and in history mode, with peft applied before or after SAT,
and with LoRA dropout against the same dropout masks.
"""

from __future__ import annotations

import copy

import pytest
import torch

from reference import grads_of, reference_step, rel_err

import satlm
from conftest import batch, sat_config, tiny_model
from sat_steps import kept_of
from satlm import UnsupportedModelError

peft = pytest.importorskip("peft")

TARGETS = {
    "all-linear": "all-linear",
    "qv": ["q_proj", "v_proj"],
    "o-down": ["o_proj", "down_proj"],
    "gate-up": ["gate_proj", "up_proj"],
}


def lora_model(target="all-linear", r=4, alpha=8, dropout=0.0, rslora=False, modules_to_save=None, sat=None,
               b_std=0.3):
    """A float64 tiny Llama (GQA 8/2, biases) with LoRA; B initialised away from zero so that LoRA counts.
    sat: a SATConfig applied before peft (the other order), else None."""
    base = tiny_model(attn="sdpa", attention_bias=True, mlp_bias=True).double()
    if sat is not None:
        satlm.apply_sat(base, sat)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS.get(target, target), lora_dropout=dropout,
                          use_rslora=rslora, modules_to_save=modules_to_save)
    torch.manual_seed(0)
    model = peft.get_peft_model(base, cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n and b_std:
                p.normal_(0, b_std)
    return model


def hf(model):
    return model.base_model.model


def check(loss, grads, ref_loss, ref_grads, tol=1e-10):
    assert abs(loss.item() - ref_loss.item()) <= tol * abs(ref_loss.item())
    trained = [n for n, g in ref_grads.items() if g is not None]
    assert any("lora_A" in n for n in trained) and any("lora_B" in n for n in trained)
    for name, g_ref in ref_grads.items():
        g = grads[name]
        if g_ref is None:
            assert g is None, f"{name} is frozen but got a gradient"
            continue
        assert g is not None, f"{name} got no gradient"
        assert (g - g_ref).norm() <= tol * g_ref.norm() + 1e-14, (name, rel_err(g, g_ref))


def step(model, data, seed=5):
    torch.manual_seed(seed)  # the LoRA dropout masks
    loss = model(**data).loss
    loss.backward()
    return loss.detach(), grads_of(hf(model))


def run(mode: str, target: str = "all-linear", order: str = "peft-first", dropout: float = 0.0, unit="head",
        **lora):
    source, forward = mode.split("-")
    cfg = sat_config(omission_rate=0.5, schedule="constant", selection="topk", source=source, forward=forward,
                     attn_unit=unit)
    model = lora_model(target, dropout=dropout, sat=cfg if order == "sat-first" else None, **lora)
    data = batch()
    if source == "current":
        ref_model = copy.deepcopy(model)
        if order == "sat-first":
            satlm.remove_sat(ref_model)
        torch.manual_seed(5)
        ref = reference_step(hf(ref_model), data, 0.5, unit, forward)
        if order == "peft-first":
            satlm.apply_sat(model, cfg)
        loss, grads = step(model, data)
        assert kept_of(model) == ref.kept
    else:
        if order == "peft-first":
            satlm.apply_sat(model, cfg)
        step(model, batch(seed=3))  # seeds the history statistics
        model.zero_grad(set_to_none=True)
        loss, grads = step(model, data)
        kept = kept_of(model)
        satlm.remove_sat(model)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        ref = reference_step(hf(model), data, unit=unit, kept=kept)
    check(loss, grads, ref.loss, ref.grads)


@pytest.mark.parametrize("target", sorted(TARGETS))
@pytest.mark.parametrize("mode", ["current-sparse", "current-dense", "history-sparse"])
def test_lora_matches_masked_reference(mode, target):
    run(mode, target)


@pytest.mark.parametrize("mode", ["current-sparse", "current-dense", "history-sparse"])
def test_lora_applied_after_sat_works_the_same(mode):
    run(mode, "all-linear", order="sat-first")


@pytest.mark.parametrize("mode", ["current-sparse", "current-dense", "history-sparse"])
def test_lora_dropout_against_the_same_masks(mode):
    run(mode, "all-linear", dropout=0.2)


def test_rslora_alpha_kv_group_and_modules_to_save():
    run("current-sparse", "all-linear", unit="kv_group", rslora=True, alpha=32, r=8, modules_to_save=["lm_head"])


def lora_flops(n, r, projections) -> int:
    """FLOPs of the LoRA terms of one SAT step (current, sparse forward; docs/method.md, LoRA terms).
    projections: (kind, in features, out features, kept) with kind row (kept outputs) or col (kept inputs)."""
    total = 0
    for kind, d_in, d_out, k in projections:
        if kind == "row":  # t = x A^T once; B over every output (scoring) and its kept rows; backward over kept rows
            total += n * (2 * r * d_in + 2 * r * d_out + 2 * r * k) + n * (4 * r * k + 4 * r * d_in)
        else:  # kept input columns of A, all of B; backward the same
            total += n * (2 * r * k + 2 * r * d_out) + n * (4 * r * d_out + 4 * r * k)
    return total


def test_frozen_base_weights_cost_no_weight_gradient_flops():
    """With LoRA on every projection the base weights are frozen: the step's FLOPs are those of the same SAT step
    of a model with frozen layers, plus the LoRA GEMMs of the formula: no weight-gradient GEMM of a base weight."""
    from torch.utils.flop_counter import FlopCounterMode

    def flops(model):
        with FlopCounterMode(display=False) as counter:
            model(**batch(pad=False)).loss.backward()
        return counter.get_total_flops()

    cfg = sat_config(omission_rate=0.5, schedule="constant", selection="topk")
    with_lora = lora_model("all-linear", r=4, b_std=0)  # B = 0 (peft's init): the same activations, the same units
    hf(with_lora).model.embed_tokens.weight.requires_grad_(True)  # so that layer 0 computes its input gradient
    satlm.apply_sat(with_lora, cfg)
    plain = tiny_model(attn="sdpa", attention_bias=True, mlp_bias=True).double()
    for name, p in plain.named_parameters():
        p.requires_grad_("embed_tokens" in name)
    satlm.apply_sat(plain, cfg)
    f_lora, f_plain = flops(with_lora), flops(plain)
    assert kept_of(with_lora) == kept_of(plain)
    n, r, d, f, hd, heads, kv = 48, 4, 64, 96, 8, 8, 2
    projections = []
    for entry in satlm.sat_state(plain)["layers"]:
        kh, km = len(entry["attn"]["kept"]), len(entry["mlp"]["kept"])
        kg = kv  # every K/V group is projected (no host sync to count the used ones)
        projections += [("row", d, heads * hd, kh * hd), ("row", d, kv * hd, kg * hd), ("row", d, kv * hd, kg * hd),
                        ("col", heads * hd, d, kh * hd), ("row", d, f, km), ("row", d, f, km), ("col", f, d, km)]
    assert f_lora - f_plain == lora_flops(n, r, projections), (f_lora - f_plain, lora_flops(n, r, projections))


def test_dora_and_quantized_bases_are_refused():
    model = peft.get_peft_model(tiny_model(), peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(UnsupportedModelError, match="DoRA"):
        satlm.apply_sat(model)
