"""SAT's side of the comparisons with the masked dense reference (benchmarks/reference.py): one training step's
loss, every parameter's gradient under its plain name, and the kept units as satlm.sat_state reports them."""

from __future__ import annotations

from reference import grads_of, reference_step

import satlm
from conftest import sat_config


def kept_of(model) -> dict:
    """(layer, "mlp" | "attn") -> the units kept in the last step, as sat_state lists them (every unit where the
    layer ran dense)."""
    kept = {}
    for entry in satlm.sat_state(model)["layers"]:
        for comp in ("mlp", "attn"):
            e = entry[comp]  # None: the layer ran dense, every unit kept
            kept[(entry["layer"], comp)] = e["kept"] if e["kept"] is not None else list(range(e["n_units"]))
    return kept


def sat_step_applied(model, data):
    """One forward and backward of a model SAT is applied to: (loss, grads, kept)."""
    loss = model(**data).loss
    loss.backward()
    return loss.detach(), grads_of(model), kept_of(model)


def sat_step(model, data, config):
    """apply_sat(model, config), then one step: (loss, grads, kept). Leaves SAT applied."""
    satlm.apply_sat(model, config)
    return sat_step_applied(model, data)


def history_step_and_reference(model, data, seed_data, rate: float, unit: str):
    """(SAT loss, grads, kept) of a history-mode step after one seeding step, and the masked dense reference's Step
    with the same kept sets. Leaves the model unpatched."""
    satlm.apply_sat(model, sat_config(omission_rate=rate, schedule="constant", source="history",
                                      attn_unit=unit))
    model(**seed_data).loss.backward()  # the first step observes every unit, to seed the statistics
    model.zero_grad(set_to_none=True)
    loss, grads, kept = sat_step_applied(model, data)
    satlm.remove_sat(model)
    model.zero_grad(set_to_none=True)
    return (loss, grads, kept), reference_step(model, data, kept=kept, unit=unit)


def assert_omitted_slices_have_no_gradient(model, kept: dict, unit: str, n_heads: int, n_kv: int) -> None:
    """Every omitted unit's slices have exactly zero gradient: an MLP channel's gate/up rows (and bias entries) and
    down column, a query head's q rows (and bias) and o columns, and the k/v rows of a KV group no kept head uses."""
    hd = model.config.hidden_size // n_heads
    rep = n_heads // n_kv
    for i, layer in enumerate(model.model.layers):
        mlp = layer.mlp.base_layer
        off = sorted(set(range(mlp.gate_proj.out_features)) - set(kept[(i, "mlp")]))
        assert off and mlp.gate_proj.weight.grad[off].abs().max() == 0
        assert mlp.up_proj.weight.grad[off].abs().max() == 0
        assert mlp.down_proj.weight.grad[:, off].abs().max() == 0
        assert mlp.down_proj.weight.grad.abs().max() > 0  # and the kept ones have some
        if mlp.gate_proj.bias is not None:
            assert mlp.gate_proj.bias.grad[off].abs().max() == 0 and mlp.up_proj.bias.grad[off].abs().max() == 0
        attn = layer.self_attn.base_layer
        units = kept[(i, "attn")]
        heads = [g * rep + j for g in units for j in range(rep)] if unit == "kv_group" else units
        cols = [h * hd + j for h in sorted(set(range(n_heads)) - set(heads)) for j in range(hd)]
        assert attn.q_proj.weight.grad[cols].abs().sum() == 0
        assert attn.o_proj.weight.grad[:, cols].abs().sum() == 0
        if attn.q_proj.bias is not None:
            assert attn.q_proj.bias.grad[cols].abs().sum() == 0
        live = {h // rep for h in heads}
        dead = [g * hd + j for g in range(n_kv) if g not in live for j in range(hd)]
        if dead:
            assert attn.k_proj.weight.grad[dead].abs().sum() == 0
            assert attn.v_proj.weight.grad[dead].abs().sum() == 0
