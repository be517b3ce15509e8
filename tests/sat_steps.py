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
