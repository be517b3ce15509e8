"""FLOPs of one SAT training step, counted by torch.utils.flop_counter, against docs/method.md's accounting.

The model uses eager attention, whose core (Q K^T and P V matmuls) FlopCounterMode counts. The core is
counted as implemented: in `current` mode it runs once over every head to score them (no autograd) and
once more over the kept heads with autograd (a recomputation), whose backward covers kept heads only;
in `history` mode it runs over kept heads only. (FlopCounterMode alone does not count PyTorch's CPU flash
SDPA kernel, which is why these tests use eager; the last test counts SDPA with satlm's `flop_counter`,
under which paper mode takes the kept heads' attention from its scoring pass and recomputes nothing.)
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import satlm
from conftest import batch, sat_config, tiny_model

D, F, H, KV, T, B, V, L = 128, 352, 8, 2, 32, 2, 256, 2


def model_and_data():
    model = tiny_model("llama", hidden=D, inter=F, heads=H, kv_heads=KV, layers=L, vocab=V, attn="eager")
    return model, batch(vocab=V, b=B, t=T)


def step_flops(model, data) -> int:
    with FlopCounterMode(display=False) as counter:
        model(**data).loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def analytic(source: str | None, kept: list[dict]) -> float:
    """Whole-step FLOPs. kept: per layer {'km': MLP keep ratio, 'kh': query-head ratio, 'kg': KV-group ratio}."""
    n, d, f, dkv = B * T, D, F, D // H * KV
    core = 4 * n * T * d  # eager forward of the attention core over all heads: Q K^T and P V
    total = 2 * n * d * V * 3  # output head: forward 2NdV, backward 4NdV (not sparsified)
    for k in kept:
        km, kh, kg = k.get("km", 1.0), k.get("kh", 1.0), k.get("kg", 1.0)
        if source is None:
            mlp = 6 * d * f + 12 * d * f
            proj = 3 * 2 * d * (2 * d + 2 * dkv)
            total += n * (mlp + proj) + 3 * core
        elif source == "current":
            mlp = 4 * d * f + 2 * d * f * km + 12 * d * f * km
            proj = 2 * d * (d + 2 * dkv) + 2 * d * d * kh + 4 * d * d * kh + 4 * d * d * kh + 8 * d * dkv * kg
            total += n * (mlp + proj) + core + 3 * core * kh  # scoring pass + kept recompute + its backward
        elif source == "current-dense":  # forward=dense: the whole forward, the backward over kept units
            mlp = 6 * d * f + 12 * d * f * km
            proj = 2 * d * (2 * d + 2 * dkv) + 4 * d * d * kh + 4 * d * d * kh + 8 * d * dkv * kg
            total += n * (mlp + proj) + core + 3 * core * kh
        else:
            mlp = 3 * 6 * d * f * km
            proj = 3 * (4 * d * d * kh + 4 * d * dkv * kg)
            total += n * (mlp + proj) + 3 * core * kh
    return total


def kept_ratios(model, unit: str) -> list[dict]:
    out = []
    for entry in satlm.sat_state(model)["layers"]:
        mlp, attn = entry["mlp"], entry["attn"]
        km = len(mlp["kept"]) / F if mlp["kept"] is not None else 1.0
        units = attn["kept"] if attn["kept"] is not None else list(range(attn["n_units"]))
        if unit == "kv_group":
            kh = kg = len(units) / KV
        else:
            kh, kg = len(units) / H, 1.0  # every K/V group is projected (no host sync to count the used ones)
        out.append({"km": km, "kh": kh, "kg": kg})
    return out


def test_dense_step_matches_accounting():
    model, data = model_and_data()
    measured = step_flops(model, data)
    expected = analytic(None, [{}] * L)
    assert abs(measured - expected) / expected < 0.02, (measured, expected)


@pytest.mark.parametrize("source", ["current", "history", "current-dense"])
@pytest.mark.parametrize("unit", ["head", "kv_group"])
@pytest.mark.parametrize("rate", [0.25, 0.5, 0.75])
def test_sat_step_matches_accounting(source, unit, rate):
    model, data = model_and_data()
    dense = step_flops(model, data)
    sat_source, forward = source.split("-")[0], "dense" if source.endswith("-dense") else "sparse"
    satlm.apply_sat(model, sat_config(omission_rate=rate, schedule="constant", source=sat_source,
                                      attn_unit=unit, seed=3, forward=forward))
    if source == "history":
        step_flops(model, data)  # the first history step observes every unit to seed the statistics
    measured = step_flops(model, data)
    ratios = kept_ratios(model, unit)
    expected = analytic(source, ratios)
    assert abs(measured - expected) / expected < 0.02, (measured, expected, ratios)
    assert measured < dense


@pytest.mark.parametrize("source,unit", [(None, "head"), ("current", "head"), ("current", "kv_group"),
                                         ("history", "head"), ("history", "kv_group"), ("current-dense", "head")])
def test_sdpa_step_counts_the_attention_core_as_run(source, unit):
    """With SDPA on the CPU (the kernels `satlm bench` times), satlm's flop_counter counts PyTorch's CPU flash
    kernels: forward Q K^T and P V (as eager), backward five such matmuls (it recomputes the scores), i.e. the
    core's backward is 2.5x its forward instead of eager's 2x. Paper mode takes the kept heads' attention from
    its scoring pass, so its core is one forward over every head plus the kept heads' backward."""
    from satlm.bench.runner import flop_counter

    model = tiny_model("llama", hidden=D, inter=F, heads=H, kv_heads=KV, layers=L, vocab=V, attn="sdpa")
    data = batch(vocab=V, b=B, t=T, pad=False)
    if source is not None:
        satlm.apply_sat(model, sat_config(omission_rate=0.5, schedule="constant", source=source.split("-")[0],
                                          attn_unit=unit, seed=3,
                                          forward="dense" if source.endswith("-dense") else "sparse"))
        if source == "history":
            model(**data).loss.backward()
            model.zero_grad(set_to_none=True)
    with flop_counter() as counter:
        model(**data).loss.backward()
    measured = counter.get_total_flops()
    ratios = kept_ratios(model, unit) if source else [{}] * L
    core = 4 * B * T * T * D
    eager_core = {None: 3 * core, "current": core + 3 * core * 0.5, "history": 3 * core * 0.5,
                  "current-dense": core + 3 * core * 0.5}[source]
    sdpa_core = {None: 3.5 * core, "current": core + 2.5 * core * 0.5, "history": 3.5 * core * 0.5,
                 "current-dense": core + 2.5 * core * 0.5}[source]
    for r in ratios:
        assert r.get("kh", 1.0) == (1.0 if source is None else 0.5)
    expected = analytic(source, ratios) + L * (sdpa_core - eager_core)
    assert abs(measured - expected) / expected < 0.02, (measured, expected)


def test_sdpa_formulas_match_pytorch_and_take_grouped_kv():
    """satlm's SDPA formulas equal PyTorch's for per-head K/V, and grouped K/V (GQA, what transformers passes
    SDPA with enable_gqa) count as K/V copied per query head. PyTorch 2.11's own formulas refuse grouped K/V,
    which stopped `satlm bench` on the GPU image's PyTorch; satlm's mapping covers every SDPA kernel."""
    from torch.utils import flop_counter as fc

    from satlm.bench.runner import flop_counter, sdpa_backward_flops, sdpa_flop_mapping, sdpa_flops

    q, kv, kv_grouped = (2, 8, 16, 32), (2, 8, 24, 32), (2, 2, 24, 32)
    assert sdpa_flops(q, kv, kv) == fc.sdpa_flop_count(q, kv, kv) == 2 * (2 * 8 * 16 * 24 * 32) * 2
    assert sdpa_backward_flops(q, q, kv, kv) == fc.sdpa_backward_flop_count(q, q, kv, kv)
    assert sdpa_flops(q, kv_grouped, kv_grouped) == sdpa_flops(q, kv, kv)
    assert sdpa_backward_flops(q, q, kv_grouped, kv_grouped) == sdpa_backward_flops(q, q, kv, kv)
    with pytest.raises(ValueError):
        sdpa_flops(q, (2, 3, 24, 32), (2, 3, 24, 32))  # 3 K/V heads do not divide 8 query heads
    names = {str(op) for op in sdpa_flop_mapping()}
    assert {"aten._scaled_dot_product_flash_attention", "aten._scaled_dot_product_efficient_attention_backward"} \
        <= names

    torch.manual_seed(0)
    qt = torch.randn(q, requires_grad=True)
    kt, vt = torch.randn(kv_grouped, requires_grad=True), torch.randn(kv_grouped, requires_grad=True)
    counts = []
    for grouped in (True, False):
        with flop_counter() as counter:
            k_, v_ = (kt, vt) if grouped else (kt.repeat_interleave(4, 1), vt.repeat_interleave(4, 1))
            out = torch.nn.functional.scaled_dot_product_attention(qt, k_, v_, is_causal=True, enable_gqa=grouped)
            out.sum().backward()
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] == sdpa_flops(q, kv, kv) + sdpa_backward_flops(q, q, kv, kv)
