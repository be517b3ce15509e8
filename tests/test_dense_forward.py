"""forward=dense against a reference written here, independently of satlm's code.

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
import math

import pytest
import torch
import torch.nn.functional as F

import satlm
from conftest import batch, sat_config, tiny_model
from test_sparse_reference import grads_of


def keep(n: int, rate: float) -> int:
    return max(1, math.floor((1 - rate) * n + 0.5))


def _split_linear(module, h, m):
    """module(h) in value, with the gradient of module(h * m): cut to the kept input features m (1 kept, 0 omitted).
    (For a plain Linear that is linear(h * m) + linear(h * (1 - m)) with the second term detached; for a LoRA
    layer the same for its base and adapter together.) Both calls draw the dropout mask (peft's LoRA dropout)
    that the module's own forward drew: the random state is rewound to before it (see _rng_before)."""
    state = module._rng_before
    torch.set_rng_state(state)
    kept = module.forward(h * m)
    torch.set_rng_state(state)
    return kept + (module.forward(h) - kept).detach()


def _rng_before(module, args):
    module._rng_before = torch.get_rng_state()


def reference_step(model, data, rate: float, unit: str, attn_rate: float | None = None):
    """Loss, grads and kept sets of the dense-forward reference (top-k by L2 over non-padding tokens)."""
    attn_rate = rate if attn_rate is None else attn_rate
    token_mask = data["attention_mask"].to(torch.float64)
    kept: dict = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        cfg = layer.self_attn.config
        n_h, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads

        def mlp_hook(mod, args, output, i=i):
            (h,) = args  # (B, T, f), the dense activations
            score = ((h.detach().double() ** 2) * token_mask[..., None]).sum((0, 1)).sqrt()
            units = sorted(score.topk(keep(h.shape[-1], rate)).indices.tolist())
            kept[(i, "mlp")] = units
            m = torch.zeros(h.shape[-1], dtype=h.dtype)
            m[units] = 1
            return _split_linear(mod, h, m)

        def attn_hook(mod, args, output, i=i, n_h=n_h, n_kv=n_kv):
            (o,) = args  # (B, T, H*hd)
            oh = o.view(*o.shape[:2], n_h, -1)
            score = ((oh.detach().double() ** 2) * token_mask[..., None, None]).sum((0, 1, 3)).sqrt()
            if unit == "kv_group":
                score = score.view(n_kv, -1).sum(1)
            units = sorted(score.topk(keep(score.shape[0], attn_rate)).indices.tolist())
            kept[(i, "attn")] = units
            rep = n_h // n_kv
            heads = [g * rep + j for g in units for j in range(rep)] if unit == "kv_group" else units
            m = torch.zeros(n_h, oh.shape[-1], dtype=o.dtype)
            m[heads] = 1
            return _split_linear(mod, o, m.reshape(-1))

        for mod, hook in ((layer.mlp.down_proj, mlp_hook), (layer.self_attn.o_proj, attn_hook)):
            hooks.append(mod.register_forward_pre_hook(_rng_before))
            hooks.append(mod.register_forward_hook(hook))
    loss = model(**data).loss
    loss.backward()
    for h in hooks:
        h.remove()
    return loss.detach(), grads_of(model), kept


def sat_step(model, data, config):
    satlm.apply_sat(model, config)
    loss = model(**data).loss
    loss.backward()
    grads = grads_of(model)
    kept = {}
    for entry in satlm.sat_state(model)["layers"]:
        for comp in ("mlp", "attn"):
            e = entry[comp]
            kept[(entry["layer"], comp)] = e["kept"] if e["kept"] is not None else list(range(e["n_units"]))
    return loss.detach(), grads, kept


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


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
    ref_loss, ref_grads, ref_kept = reference_step(ref_model, data, rate, unit)
    cfg = sat_config(omission_rate=rate, schedule="constant", selection="topk", metric="l2",
                     source="current", attn_unit=unit, forward="dense")
    loss, grads, kept = sat_step(model, data, cfg)

    assert kept == ref_kept
    # The step's loss is the dense model's, and the reference's (which is dense too).
    assert abs(loss.item() - dense_loss.item()) <= 1e-6 * abs(dense_loss.item())
    assert abs(ref_loss.item() - dense_loss.item()) <= 1e-6 * abs(dense_loss.item())
    for name, g_ref in ref_grads.items():
        assert rel_err(grads[name], g_ref) <= 1e-5, name

    n_h, n_kv = heads, kv
    hd = model.config.hidden_size // n_h
    for i, layer in enumerate(model.model.layers):
        mlp = layer.mlp.base_layer
        off = sorted(set(range(mlp.gate_proj.out_features)) - set(kept[(i, "mlp")]))
        assert off and mlp.gate_proj.weight.grad[off].abs().max() == 0
        assert mlp.up_proj.weight.grad[off].abs().max() == 0
        assert mlp.down_proj.weight.grad[:, off].abs().max() == 0
        assert mlp.down_proj.weight.grad.abs().max() > 0
        attn = layer.self_attn.base_layer
        kept_heads = ([g * (n_h // n_kv) + j for g in kept[(i, "attn")] for j in range(n_h // n_kv)]
                      if unit == "kv_group" else kept[(i, "attn")])
        cols = [h * hd + j for h in sorted(set(range(n_h)) - set(kept_heads)) for j in range(hd)]
        assert attn.q_proj.weight.grad[cols].abs().sum() == 0
        assert attn.o_proj.weight.grad[:, cols].abs().sum() == 0
        if attn.q_proj.bias is not None:
            assert attn.q_proj.bias.grad[cols].abs().sum() == 0


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
    ref_loss, ref_grads, ref_kept = reference_step(ref_model, data, 0.5, "head", attn_rate=0.0)
    cfg = sat_config(omission_rate=0.5, attn_omission_rate=0.0, schedule="constant", selection="topk",
                     forward="dense")
    loss, grads, kept = sat_step(model, data, cfg)
    assert kept == ref_kept
    assert abs(loss.item() - ref_loss.item()) <= 1e-6 * abs(ref_loss.item())
    for name, g_ref in ref_grads.items():
        assert rel_err(grads[name], g_ref) <= 1e-5, name


def test_dense_forward_under_gradient_checkpointing_matches_reference():
    """The recomputation in the backward (same kept units) gives the same gradients."""
    model = tiny_model(attn="sdpa")
    ref_model = copy.deepcopy(model)
    data = batch()
    ref_loss, ref_grads, _ = reference_step(ref_model, data, 0.5, "head")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    cfg = sat_config(omission_rate=0.5, schedule="constant", selection="topk", forward="dense")
    loss, grads, _ = sat_step(model, data, cfg)
    assert abs(loss.item() - ref_loss.item()) <= 1e-6 * abs(ref_loss.item())
    for name, g_ref in ref_grads.items():
        assert rel_err(grads[name], g_ref) <= 1e-5, name


def test_history_with_dense_forward_is_refused():
    with pytest.raises(satlm.SATConfigError, match="forward='dense' needs source='current'"):
        satlm.SATConfig(source="history", forward="dense")
    with pytest.raises(satlm.SATConfigError, match="forward"):
        satlm.SATConfig(forward="both")
