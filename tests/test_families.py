"""Every family in satlm's table against a masked dense reference that does not use satlm's layouts.

A tiny random model of each family (GQA, padding, sliding windows shorter than the sequence, biases and norm
weights set) takes one SAT step: paper mode with both forwards and history mode, both attention units; the loss
and every parameter's gradient must equal the masked dense reference's, which cuts omitted units at
the input of the attention's o_proj and the MLP's down projection, found by name (benchmarks/reference.py).
"""

from __future__ import annotations

import copy

import pytest
import torch
from reference import decoder_layers, reference_step, rel_err

import satlm
from conftest import sat_config
from family_models import FAMILY_CONFIGS, FAMILY_TOLERANCE, TOLERANCE, family_dtype, family_model
from satlm.modeling.families import FAMILIES, UnsupportedModelError

FAMILY_TYPES = sorted(FAMILY_CONFIGS)
MODES = ["current-sparse", "current-dense", "history-sparse"]


def batch(b: int = 3, t: int = 12, bare: bool = False):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    mask[2, -2:] = 0  # right padding
    data = {"input_ids": ids, "attention_mask": mask}
    if not bare:
        data["labels"] = ids.masked_fill(mask == 0, -100)
    return data


def sat_step(model, data, bare: bool):
    out = model(**data)
    loss = out.last_hidden_state.square().mean() if bare else out.loss
    loss.backward()
    grads = {n.replace("base_layer.", ""): p.grad.clone() if p.grad is not None else None
             for n, p in model.named_parameters()}
    kept = {}
    for entry in satlm.sat_state(model)["layers"]:
        for comp in ("mlp", "attn"):
            if comp in entry:
                e = entry[comp]
                kept[(entry["layer"], comp)] = e["kept"] if e["kept"] is not None else list(range(e["n_units"]))
    return loss.detach(), grads, kept


def assert_same(loss, grads, ref_loss, ref_grads, tol=1e-9):
    assert abs(loss.item() - ref_loss.item()) <= tol * abs(ref_loss.item()), (loss.item(), ref_loss.item())
    assert set(grads) == set(ref_grads)
    for name, g_ref in ref_grads.items():
        if g_ref is None:
            assert grads[name] is None or grads[name].abs().max() == 0, name
            continue
        assert grads[name] is not None, name
        # (relative, with a floor: a gradient that is zero in exact arithmetic is rounding noise here)
        assert (grads[name] - g_ref).norm() <= tol * g_ref.norm() + tol * 1e-4, (name, rel_err(grads[name], g_ref))


def run_case(model_type: str, mode: str, unit: str, rate: float = 0.5, bare: bool = False):
    model = family_model(model_type, bare=bare)
    source, forward = mode.split("-")
    data, seed_data = batch(bare=bare), batch(bare=bare, t=10)
    n_kv = model.config.num_key_value_heads
    cfg = sat_config(omission_rate=rate, schedule="constant", selection="topk", source=source,
                     forward=forward, attn_unit=unit)
    if source == "current":
        ref = reference_step(copy.deepcopy(model), data, rate, unit, forward)
        satlm.apply_sat(model, cfg)
        loss, grads, kept = sat_step(model, data, bare)
        assert kept == ref.kept
    else:
        satlm.apply_sat(model, cfg)
        sat_step(model, seed_data, bare)  # seeds the history statistics
        model.zero_grad(set_to_none=True)
        loss, grads, kept = sat_step(model, data, bare)
        satlm.remove_sat(model)
        model.zero_grad(set_to_none=True)
        ref = reference_step(model, data, unit=unit, kept=kept)
    assert any(len(v) < (model.config.num_attention_heads if c == "attn" and unit == "head" else n_kv
                         if c == "attn" else 96) for (_, c), v in kept.items())
    tol = FAMILY_TOLERANCE.get(model_type, TOLERANCE[family_dtype(model_type)])
    assert_same(loss, grads, ref.loss, ref.grads, tol)
    return model, kept


@pytest.mark.parametrize("unit", ["head", "kv_group"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_family_matches_masked_dense_reference(model_type, mode, unit):
    run_case(model_type, mode, unit)


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "phi3", "starcoder2", "gemma3_text"])
def test_bare_model_is_the_same_entry(model_type):
    """The bare *Model of a family (no LM head) is wrapped through the same layout."""
    run_case(model_type, "current-sparse", "head", bare=True)


def test_table_covers_every_tested_family_and_each_class_builds():
    for model_type in FAMILY_TYPES:
        assert model_type in FAMILIES, model_type
        layout = FAMILIES[model_type]
        causal, bare = family_model(model_type), family_model(model_type, bare=True)
        assert {type(causal).__name__, type(bare).__name__} == set(layout.classes), model_type


def test_mixture_of_experts_keeps_experts_dense():
    """Mixtral: attention heads are sparsified, every (expert) MLP is left alone; Qwen3-MoE: its dense layer's MLP
    (mlp_only_layers) is wrapped too."""
    mixtral = satlm.apply_sat(family_model("mixtral"), sat_config(omission_rate=0.5))
    assert all(type(layer.mlp).__name__ == "MixtralSparseMoeBlock" for layer in decoder_layers(mixtral))
    assert all(isinstance(layer.self_attn, satlm.SATAttention) for layer in decoder_layers(mixtral))
    qwen = satlm.apply_sat(family_model("qwen3_moe"), sat_config(omission_rate=0.5))
    kinds = [type(layer.mlp).__name__ for layer in decoder_layers(qwen)]
    assert kinds == ["Qwen3MoeSparseMoeBlock", "SATMLP"]


def test_unknown_and_refused_families_name_what_is_missing():
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel.*model_type 'gpt2' has no satlm layout"):
        satlm.apply_sat(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)))
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("olmoe", vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=2, num_experts=2, num_experts_per_tok=1,
                               pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with pytest.raises(UnsupportedModelError, match="clip_qkv"):
        satlm.apply_sat(AutoModelForCausalLM.from_config(cfg))


def test_self_check_refuses_an_unhandled_submodule():
    """A norm the layout does not know, added to an attention, is refused before anything is wrapped."""
    model = family_model("llama")
    decoder_layers(model)[1].self_attn.extra_norm = torch.nn.LayerNorm(16)
    with pytest.raises(UnsupportedModelError, match=r"layers\[1\]\.self_attn.*extra_norm"):
        satlm.apply_sat(model, sat_config(omission_rate=0.5))
    assert not hasattr(model, "sat_runtime")
    assert all(type(layer.self_attn).__name__ == "LlamaAttention" for layer in decoder_layers(model))


def test_self_check_refuses_a_module_whose_computation_the_layout_misses(monkeypatch):
    """A family's attention that does something the layout does not describe (here: its output scaled) fails
    the every-unit-kept check, naming the module and the path; nothing stays wrapped."""
    from transformers.models.llama import modeling_llama

    original = modeling_llama.LlamaAttention.forward

    def scaled(self, *args, **kwargs):
        out, w = original(self, *args, **kwargs)
        return out * 1.5, w

    model = family_model("llama")
    monkeypatch.setattr(modeling_llama.LlamaAttention, "forward", scaled)
    with pytest.raises(UnsupportedModelError, match=r"self-check: layers\[0\]\.self_attn.*current/sparse.*output"):
        satlm.apply_sat(model, sat_config(omission_rate=0.5))
    assert not hasattr(model, "sat_runtime")


def test_self_check_leaves_no_trace():
    """apply_sat's check consumes no selection randomness and leaves no statistics: the first step selects as
    it would without the check."""
    from satlm.modeling import patch

    a, b = family_model("qwen3"), family_model("qwen3")
    cfg = sat_config(omission_rate=0.5, source="history", selection="sample", metric="random")
    satlm.apply_sat(a, cfg)
    original = patch.self_check
    patch.self_check = lambda *args, **kwargs: None
    try:
        satlm.apply_sat(b, cfg)
    finally:
        patch.self_check = original
    data = batch()
    for model in (a, b):
        model(**data).loss.backward()
    assert satlm.sat_state(a)["layers"] == satlm.sat_state(b)["layers"]
    assert a.sat_runtime.forward_id == b.sat_runtime.forward_id
