"""layer_rates: auto. How much each layer's omission costs, measured on the first batches, and the per-layer
factors that spend the same omission where it costs least.

The measure: with every other layer dense, layer i alone runs the thinned forward (its lowest-importance units
omitted at the configuration's maximum rates, as `forward: sparse` with top-k would), forward only, on the first
batches of the run; its sensitivity a_i is the increase of the mean loss over the dense model's. (On SmolLM2-135M
at r = 0.5 this ranged 27x between layers: +0.249 nats for layer 0, 0.009-0.031 for layers 3-28.)

The factors: if omitting a fraction r of a layer's units costs about a_i (r / r_max)^2 (damage grows faster than
the rate: the next unit omitted is always more important than the last), the rates r_i that minimise the summed
damage at a fixed mean rate (the same FLOPs) satisfy a_i r_i = constant, so r_i is proportional to 1 / a_i. The
factors f_i = r_i / r_max have mean 1 over the layers SAT applies to, and are capped so that no layer omits more
than MAX_RATE; what a cap removes is spread over the other layers in proportion to their 1 / a_i.
"""

from __future__ import annotations

import dataclasses
import time

import torch
import torch.nn as nn

from ..distributed import all_mean

BATCHES = 2  # batches of the run the sensitivity is measured on
MAX_RATE = 0.9  # a factor never makes a layer omit more than this
FLOOR = 1e-4  # nats: a layer whose omission costs less than this is treated as costing this much


def factors_from_sensitivity(sensitivity: dict[int, float], max_rate: float, cap: float = MAX_RATE) -> dict[int, float]:
    """Per-layer factors of mean 1, proportional to 1 / sensitivity, no layer above cap / max_rate (module doc)."""
    if max_rate <= 0:
        return {i: 1.0 for i in sensitivity}
    inv = {i: 1.0 / max(FLOOR, a) for i, a in sensitivity.items()}
    limit = max(1.0, cap / max_rate)
    n = len(inv)
    fixed: dict[int, float] = {}
    while True:  # water-filling: cap the largest, share what they lose among the rest
        free = {i: v for i, v in inv.items() if i not in fixed}
        budget = n - sum(fixed.values())
        scale = budget / sum(free.values()) if free else 0.0
        over = {i for i, v in free.items() if v * scale > limit}
        if not over:
            return {**fixed, **{i: v * scale for i, v in free.items()}}
        fixed.update({i: limit for i in over})


@torch.no_grad()
def _mean_loss(model: nn.Module, batches: list[dict]) -> float:
    total = 0.0
    for batch in batches:
        total += float(model(**batch).loss)
    return total / len(batches)


def measure_sensitivity(model: nn.Module, batches: list[dict]) -> dict[int, float]:
    """{layer: loss increase with that layer's units omitted in a thinned forward} (module doc). The model's SAT
    state (selectors, schedule, forward count) is as it was afterwards, so training reproduces exactly."""
    from .patch import _runtime, _sat_modules

    rt = _runtime(model)
    modules = _sat_modules(model)
    layers = sorted({m.sat_layer_idx for m in modules})
    saved = (rt.config, rt.enabled, rt.forward_id, rt.layer_factors, rt.dropped, rt.step, rt.total_steps)
    selectors = [(m.sat_selector, dict(vars(m.sat_selector)),
                  m.sat_selector.generator_.get_state() if m.sat_selector.generator_ is not None else None)
                 for m in modules]
    training = model.training
    try:
        model.train()
        rt.enabled = False
        dense = _mean_loss(model, batches)
        rt.enabled = True
        rt.config = dataclasses.replace(rt.config, source="current", forward="sparse", selection="topk",
                                        schedule="constant",
                                        steps=None, layer_rates=None, layer_drop_rate=0.0, loss_tokens_dense=False,
                                        dense_start=0.0, rung_placement="steps")
        out = {}
        for i in layers:
            rt.layer_factors = {j: (1.0 if j == i else 0.0) for j in layers}  # layer i alone omits
            rt.set_step(0, None)
            out[i] = _mean_loss(model, batches) - dense
        return out
    finally:
        rt.config, rt.enabled, rt.forward_id, rt.layer_factors, rt.dropped = saved[:5]
        rt.set_step(saved[5], saved[6])
        for sel, state, generator in selectors:
            vars(sel).clear()
            vars(sel).update(state)
            if generator is not None:
                sel.generator_.set_state(generator)
        model.train(training)


def measure_layer_rates(model: nn.Module, batches: list[dict]) -> dict[int, float]:
    """layer_rates: auto: measure each layer's sensitivity on `batches` and set the model's per-layer factors from
    it (averaged over data-parallel ranks, so that every rank omits alike); returns the factors. The measurement
    and its duration are kept in the model's SAT state (sat_state_dict) for the logs and for exact resume."""
    from .patch import _runtime

    rt = _runtime(model)
    start = time.perf_counter()
    sensitivity = measure_sensitivity(model, batches)
    layers = sorted(sensitivity)
    mean = all_mean(torch.tensor([sensitivity[i] for i in layers], dtype=torch.float64))
    sensitivity = dict(zip(layers, mean.tolist()))
    top = max(rt.config.max_attn_rate, rt.config.max_mlp_rate, rt.config.layer_drop_rate)
    factors = factors_from_sensitivity(sensitivity, top)
    rt.layer_factors = factors
    rt.sensitivity = {"loss_increase": {str(i): a for i, a in sensitivity.items()}, "batches": len(batches),
                      "seconds": time.perf_counter() - start}
    rt.set_step(rt.step, rt.total_steps)
    return factors
