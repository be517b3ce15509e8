"""The quality levers (schedule by LR, per-layer rates, whole-layer backward skipping, loss tokens dense, skipped
updates of omitted units) against references from the plain HF model, and their FLOPs.

The references use only the plain model and hooks. Channel omission is checked against the masked dense reference
(benchmarks/reference.py), on the MLPs only: at a layer's down projection the kept channels are the top-k by the
L2 norm of the activations over the tokens that count; `dense` keeps the projection's value over every channel
and cuts its gradient to the kept ones (f(h m) + (f(h) - f(h m)).detach()), `sparse` returns f(h m). Layer
dropping is checked against a reference written here.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from reference import grads_of, keep, reference_step
from torch.utils.flop_counter import FlopCounterMode

import satlm
from conftest import batch, tiny_model
from satlm.config import SATConfigError
from satlm.schedules import mean_rate, scheduled_rates, stair_index

D, FF, H, KV, T, B, V, L = 64, 96, 4, 2, 16, 3, 128, 3


def trained(grads: dict) -> dict:
    """The gradients that exist (a layer whose backward was skipped has none)."""
    return {n: g for n, g in grads.items() if g is not None}


def assert_same_grads(got: dict, ref: dict, tol: float = 1e-5):
    assert set(got) == set(ref), set(got) ^ set(ref)
    for name in ref:
        err = ((got[name] - ref[name]).norm() / ref[name].norm().clamp_min(1e-30)).item()
        assert err <= tol or ref[name].abs().max() < 1e-12 and got[name].abs().max() < 1e-12, (name, err)


def model_and_data(layers: int = L, attn: str = "eager", seed: int = 0):
    model = tiny_model("llama", hidden=D, inter=FF, heads=H, kv_heads=KV, layers=layers, vocab=V, attn=attn,
                       seed=seed)
    return model, batch(vocab=V, b=B, t=T)


def mlp_rate(rate_of_layer):
    """The reference's rate for the MLPs only (rate_of_layer(layer)); the attention left as it is."""
    return lambda i, comp: rate_of_layer(i) if comp == "mlp" else None


def sat_step(model, data, **config):
    satlm.apply_sat(model, satlm.SATConfig(schedule="constant", **config))
    loss = model(**data).loss
    loss.backward()
    return loss.detach(), trained(grads_of(model))


def step_flops(model, data) -> int:
    with FlopCounterMode(display=False) as counter:
        model(**data).loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


# -- a. the schedule sees the LR --------------------------------------------------------------------------
def test_dense_start_runs_the_first_steps_dense_for_every_schedule():
    for schedule in ("constant", "ladder", "linear"):
        cfg = satlm.SATConfig(schedule=schedule, dense_start=0.1, rungs=2)
        rates = [scheduled_rates(cfg, t, 100)[1] for t in range(100)]
        assert rates[:10] == [0.0] * 10 and rates[10] == 0.5, schedule
    ladder = [scheduled_rates(satlm.SATConfig(dense_start=0.1, rungs=2, dense_tail=0.1), t, 100)[1]
              for t in range(100)]
    assert ladder[10:50] == [0.5] * 40 and ladder[50:90] == [0.25] * 40 and ladder[90:] == [0.0] * 10
    with pytest.raises(SATConfigError, match="dense_start"):
        satlm.SATConfig(dense_start=0.5, dense_tail=0.5)


def _cosine(steps: int, warmup: int = 0) -> list[float]:
    return [t / warmup if t < warmup else 0.5 * (1 + math.cos(math.pi * (t - warmup) / (steps - warmup)))
            for t in range(steps)]


def test_rungs_placed_by_lr_carry_equal_lr_shares():
    steps, rungs = 120, 4
    lrs = _cosine(steps, warmup=6)
    cfg = satlm.SATConfig(rungs=rungs, dense_tail=0.1, rung_placement="lr")
    stage = [stair_index(cfg, t, steps, lrs) for t in range(steps)]
    span = [t for t in range(steps) if stage[t] is not None]
    assert span == list(range(108))  # the dense tail is the last 10% of the steps, as with steps placement
    total = sum(lrs[t] for t in span)
    shares = [sum(lrs[t] for t in span if stage[t] == r) / total for r in range(rungs)]
    biggest = max(lrs[t] for t in span) / total
    assert all(abs(s - 1 / rungs) <= biggest for s in shares), shares
    by_steps = satlm.SATConfig(rungs=rungs, dense_tail=0.1)
    step_shares = [sum(lrs[t] for t in span if stair_index(by_steps, t, steps) == r) / total for r in range(rungs)]
    assert step_shares[0] > 0.3 and step_shares[-1] < 0.1  # equal steps: the first rungs carry most of the LR
    # monotone: the rate never rises
    rates = [scheduled_rates(cfg, t, steps, lrs)[1] for t in range(steps)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))


def test_rungs_by_lr_without_a_profile_is_a_clear_error():
    model, _ = model_and_data(layers=1)
    satlm.apply_sat(model, satlm.SATConfig(rung_placement="lr"))
    with pytest.raises(SATConfigError, match="set_sat_lr_profile"):
        satlm.set_sat_step(model, 0, 10)
    satlm.set_sat_lr_profile(model, _cosine(10))
    assert satlm.set_sat_step(model, 0, 10) == (0.0, 0.5)


def test_the_callback_reads_the_trainers_lr_schedule(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_model("llama", hidden=D, inter=FF, heads=H, kv_heads=KV, layers=1, vocab=V)
    satlm.apply_sat(model, satlm.SATConfig(rungs=4, dense_tail=0.1, rung_placement="lr", dense_start=0.1))
    data = [{k: v[0] for k, v in batch(vocab=V, b=1, t=T, pad=False, seed=s).items()} for s in range(4)]
    steps = 20
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=2,
                             logging_steps=1, report_to="none", use_cpu=True, disable_tqdm=True,
                             lr_scheduler_type="cosine", warmup_steps=2, save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[satlm.SATCallback()])
    trainer.train()
    profile = model.sat_runtime.lr_profile
    expected = [5e-5 * v for v in _cosine(steps, warmup=2)]  # transformers' cosine with warm-up, written out
    assert profile == pytest.approx(expected, rel=1e-9, abs=1e-15)
    logged = [h["mlp_omission_rate"] for h in trainer.state.log_history if "loss" in h]
    cfg = model.sat_runtime.config
    assert logged == pytest.approx([scheduled_rates(cfg, t, steps, expected)[1] for t in range(steps)])
    assert logged[:2] == [0.0, 0.0]  # dense_start


def test_mean_rate_of_a_ladder_and_its_flop_matched_constant():
    ladder = satlm.SATConfig(rungs=4, dense_tail=0.1)
    assert mean_rate(ladder, 120)[1] == pytest.approx(0.28125, abs=0.005)
    constant = satlm.SATConfig(schedule="constant", omission_rate=0.28125, dense_tail=0.0)
    assert mean_rate(constant, 120)[1] == pytest.approx(mean_rate(ladder, 120)[1], abs=0.005)


# -- b. per-layer rates -----------------------------------------------------------------------------------
@pytest.mark.parametrize("forward", ["dense", "sparse"])
def test_layer_rates_match_the_reference(forward):
    factors = [0.0, 1.5, 0.5]
    model, data = model_and_data()
    plain = copy.deepcopy(model)
    loss, grads = sat_step(model, data, omission_rate=0.5, forward=forward, layer_rates=factors)
    ref = reference_step(plain, data, mlp_rate(lambda i: 0.5 * factors[i]), forward=forward)
    assert torch.allclose(loss, ref.loss, rtol=1e-10)
    assert_same_grads(grads, trained(ref.grads))
    kept = [e["mlp"]["kept_count"] for e in satlm.sat_state(model)["layers"]]
    assert kept == [None, keep(FF, 0.75), keep(FF, 0.25)]  # layer 0 dense (factor 0)


def test_layer_rates_flops_follow_the_factors():
    factors = [0.0, 1.5, 0.5]
    model, data = model_and_data()
    dense = step_flops(model, data)
    satlm.apply_sat(model, satlm.SATConfig(schedule="constant", omission_rate=0.5, layer_rates=factors))
    n = B * T
    saved = sum(12 * D * FF * n * (1 - keep(FF, 0.5 * f) / FF) for f in factors)  # MLP backward over kept channels
    expected = dense - saved
    assert abs(step_flops(model, data) - expected) / expected < 0.02


def test_layer_rates_are_checked_against_the_model():
    model, _ = model_and_data()
    with pytest.raises(SATConfigError, match="3 decoder layers"):
        satlm.apply_sat(model, satlm.SATConfig(layer_rates=[1.0, 1.0]))
    with pytest.raises(SATConfigError, match=r"layer_rates\[1\]"):
        satlm.apply_sat(model, satlm.SATConfig(layer_rates=[1.0, 2.0, 1.0]))
    with pytest.raises(SATConfigError, match="layer_rates"):
        satlm.SATConfig(layer_rates="some")


def _thinned_loss(model, data, layer: int, rate: float) -> float:
    """The reference's loss with only `layer`'s lowest-L2 channels omitted from the forward."""
    return float(reference_step(model, data, mlp_rate(lambda i: rate if i == layer else None)).loss)


def test_auto_layer_rates_measure_each_layers_loss_increase_and_spend_the_rate_where_it_costs_least():
    from satlm.modeling.sensitivity import factors_from_sensitivity

    model, data = model_and_data()
    ref = copy.deepcopy(model)
    satlm.apply_sat(model, satlm.SATConfig(schedule="constant", omission_rate=0.5, layer_rates="auto"))
    factors = satlm.measure_layer_rates(model, [data])
    with torch.no_grad():
        dense = float(ref(**data).loss)
    found = model.sat_runtime.sensitivity["loss_increase"]
    for i in range(L):
        assert found[str(i)] == pytest.approx(_thinned_loss(ref, data, i, 0.5) - dense, rel=1e-8, abs=1e-12)
    assert sum(factors.values()) / L == pytest.approx(1.0)
    a = {i: max(1e-4, found[str(i)]) for i in range(L)}
    uncapped = [i for i in range(L) if factors[i] < 0.9 / 0.5 - 1e-9]
    for i in uncapped:  # inversely proportional to the damage where no cap applies
        for j in uncapped:
            assert factors[i] * a[i] == pytest.approx(factors[j] * a[j], rel=1e-9)
    assert all(0.5 * f <= 0.9 + 1e-12 for f in factors.values())
    # the cap spreads what it removes: a huge spread of sensitivities still gives factors of mean 1, none above it
    capped = factors_from_sensitivity({0: 1.0, 1: 1e-3, 2: 1e-3, 3: 1.0}, 0.5)
    assert capped[1] == capped[2] == pytest.approx(1.8) and sum(capped.values()) == pytest.approx(4.0)


def test_measuring_leaves_training_as_it_would_have_been():
    """A step after the measurement equals a step of a model given the same factors by hand."""
    model, data = model_and_data()
    twin = copy.deepcopy(model)
    satlm.apply_sat(model, satlm.SATConfig(schedule="constant", layer_rates="auto", selection="sample", seed=4))
    factors = satlm.measure_layer_rates(model, [data])
    loss = model(**data).loss
    loss.backward()
    satlm.apply_sat(twin, satlm.SATConfig(schedule="constant", layer_rates=[factors[i] for i in range(L)],
                                          selection="sample", seed=4))
    twin_loss = twin(**data).loss
    twin_loss.backward()
    assert loss.item() == twin_loss.item()
    assert_same_grads(trained(grads_of(model)), trained(grads_of(twin)), tol=0.0)


# -- c. whole-layer backward skipping ---------------------------------------------------------------------
def drop_reference(model, data, dropped: set[int]):
    hooks = []
    for i, layer in enumerate(model.model.layers):
        if i in dropped:
            def hook(mod, args, kwargs, output):
                x = args[0] if args else kwargs["hidden_states"]
                y = output[0] if isinstance(output, tuple) else output
                y = y.detach() + (x - x.detach())
                return (y, *output[1:]) if isinstance(output, tuple) else y

            hooks.append(layer.register_forward_hook(hook, with_kwargs=True))
    loss = model(**data).loss
    loss.backward()
    for h in hooks:
        h.remove()
    return loss.detach(), trained(grads_of(model))


def test_layer_drop_skips_whole_layers_backward_as_the_reference():
    model, data = model_and_data(layers=4)
    ref = copy.deepcopy(model)
    loss, grads = sat_step(model, data, omission_rate=0.0, layer_drop_rate=0.5, seed=1)
    dropped = set(model.sat_runtime.dropped)
    assert 0 < len(dropped) < 4, dropped
    ref_loss, ref_grads = drop_reference(ref, data, dropped)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)  # the forward is unchanged
    for name in ref_grads:  # the dropped layers' parameters get no gradient
        assert not any(f"layers.{i}." in name for i in dropped), name
    assert_same_grads(grads, ref_grads)


def test_layer_drop_with_channel_omission_and_the_schedule():
    model, data = model_and_data(layers=4)
    satlm.apply_sat(model, satlm.SATConfig(layer_drop_rate=0.5, rungs=2, dense_tail=0.5, seed=2))
    draws = []
    for step in (0, 6):  # the first rung (probability 0.5), then the dense tail (0)
        satlm.set_sat_step(model, step, 8)
        for _ in range(8):
            model(**data).loss.backward()
            draws.append(len(model.sat_runtime.dropped))
    assert sum(draws[:8]) > 0 and sum(draws[8:]) == 0
    satlm.remove_sat(model)
    assert "forward" not in vars(model.model.layers[0])  # the class's forward again


def test_layer_drop_flops_leave_out_the_dropped_layers_backward():
    model, data = model_and_data(layers=4)
    dense = step_flops(model, data)
    satlm.apply_sat(model, satlm.SATConfig(schedule="constant", omission_rate=0.0, layer_drop_rate=0.5, seed=1))
    torch.manual_seed(0)
    measured = step_flops(model, data)
    dropped = len(model.sat_runtime.dropped)
    n, dkv = B * T, D // H * KV
    layer_forward = n * (6 * D * FF + 2 * D * (2 * D + 2 * dkv)) + 4 * n * T * D  # projections, MLP, eager core
    expected = dense - dropped * 2 * layer_forward
    assert 0 < dropped and abs(measured - expected) / expected < 0.02, (measured, expected, dropped)


def test_layer_drop_resumes_exactly():
    model, data = model_and_data(layers=4)
    satlm.apply_sat(model, satlm.SATConfig(schedule="constant", layer_drop_rate=0.5, seed=5))
    model(**data).loss.backward()
    state = satlm.sat_state_dict(model)
    after = []
    for _ in range(4):
        model(**data).loss.backward()
        after.append(sorted(model.sat_runtime.dropped))
    twin, _ = model_and_data(layers=4)
    satlm.apply_sat(twin, satlm.SATConfig(schedule="constant", layer_drop_rate=0.5, seed=5))
    satlm.load_sat_state_dict(twin, state)
    again = []
    for _ in range(4):
        twin(**data).loss.backward()
        again.append(sorted(twin.sat_runtime.dropped))
    assert after == again


# -- d. loss tokens dense ---------------------------------------------------------------------------------
def sft_batch():
    data = batch(vocab=V, b=B, t=T, pad=True)
    labels = data["labels"].clone()
    labels[:, : T // 2] = -100  # a prompt: its tokens carry no loss
    data["labels"] = labels
    return data


def _loss_rows(data):
    rows = torch.zeros(data["labels"].shape, dtype=torch.float64)
    rows[:, :-1] = (data["labels"][:, 1:] != -100).to(torch.float64)
    return rows


@pytest.mark.parametrize("forward", ["dense", "sparse"])
@pytest.mark.parametrize("unfused", [False, True])
def test_loss_tokens_dense_matches_the_reference(forward, unfused):
    extra = {"hidden_act": "gelu"} if unfused else {}
    model = tiny_model("llama", hidden=D, inter=FF, heads=H, kv_heads=KV, layers=2, vocab=V, **extra)
    data = sft_batch()
    plain = copy.deepcopy(model)
    loss, grads = sat_step(model, data, omission_rate=0.5, forward=forward, loss_tokens_dense=True)
    other = 1 - _loss_rows(data)  # omission applies to the rows that carry no loss
    ref = reference_step(plain, data, mlp_rate(lambda i: 0.5), forward=forward, rows=other)
    assert torch.allclose(loss, ref.loss, rtol=1e-10)
    assert_same_grads(grads, trained(ref.grads))


def test_loss_tokens_dense_flops():
    model, _ = model_and_data(layers=2)
    data = sft_batch()
    dense = step_flops(model, data)
    satlm.apply_sat(model, satlm.SATConfig(schedule="constant", omission_rate=0.5, loss_tokens_dense=True))
    n_loss = int(_loss_rows(data).sum())
    n_other = B * T - n_loss
    k = keep(FF, 0.5)
    expected = dense - 2 * 12 * D * (FF - k) * n_other  # the MLP backward over kept channels in the other rows
    measured = step_flops(model, data)
    assert abs(measured - expected) / expected < 0.02, (measured, expected)


def test_loss_tokens_dense_refusals():
    with pytest.raises(SATConfigError, match="attn_omission_rate=0"):
        satlm.SATConfig(loss_tokens_dense=True, attn_omission_rate=0.5)
    model, data = model_and_data(layers=1)
    satlm.apply_sat(model, satlm.SATConfig(loss_tokens_dense=True))
    data.pop("labels")
    with pytest.raises(SATConfigError, match="labels"):
        model(**data)


# -- e. omitted units and the optimizer -------------------------------------------------------------------
@pytest.mark.parametrize("attn_rate,unit", [(0.0, "head"), (0.5, "head"), (0.5, "kv_group")])
def test_skip_leaves_omitted_units_and_their_adam_state_untouched(attn_rate, unit):
    from satlm.modeling.omitted import OmittedUpdate

    model, data = model_and_data(layers=2)
    satlm.apply_sat(model, satlm.SATConfig(schedule="constant", omission_rate=0.5, attn_omission_rate=attn_rate,
                                           attn_unit=unit, omitted_update="skip"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model(**data).loss.backward()
    opt.step()  # a first step: every parameter has Adam moments now
    opt.zero_grad()
    twin, twin_opt = copy.deepcopy(model), None
    skip = OmittedUpdate()
    skip.begin_step(model.sat_runtime.modules)
    model(**data).loss.backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    state_before = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters()}
    # the reference: a plain AdamW step with the same gradients on a copy
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.1)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # (load_state_dict shares same-device tensors)
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        q.grad = None if p.grad is None else p.grad.clone()
    skip.save(model.sat_runtime.modules, opt)
    opt.step()
    skip.restore()
    twin_opt.step()
    params = dict(model.named_parameters())
    ref = dict(twin.named_parameters())
    omitted_rows = 0
    for layer in range(2):
        mlp = model.model.layers[layer].mlp
        kept = mlp.sat_last_kept
        out = torch.ones(FF, dtype=torch.bool)
        out[kept] = False
        omitted_rows += int(out.sum())
        for name, dim in ((f"model.layers.{layer}.mlp.gate_proj.weight", 0), (f"model.layers.{layer}.mlp.up_proj.weight", 0),
                          (f"model.layers.{layer}.mlp.down_proj.weight", 1)):
            got, was, plain = params[name].detach(), before[name], ref[name].detach()
            sl = (lambda t, m: t[m]) if dim == 0 else (lambda t, m: t[:, m])
            assert torch.equal(sl(got, out), sl(was, out)), name  # omitted: as before the step
            assert torch.equal(sl(got, ~out), sl(plain, ~out)), name  # kept: AdamW's step
            p = params[name]
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(sl(opt.state[p][key], out), sl(state_before[name][key], out)), (name, key)
    assert omitted_rows == 2 * (FF - keep(FF, 0.5))
    # everything outside the MLPs (and the attention when heads are kept) took AdamW's step
    name = "model.embed_tokens.weight"
    assert torch.equal(params[name].detach(), ref[name].detach())
    if attn_rate == 0.0:
        name = "model.layers.0.self_attn.q_proj.weight"
        assert torch.equal(params[name].detach(), ref[name].detach())
    else:  # an omitted head's q rows (or a group's) are as they were
        attn = model.model.layers[0].self_attn
        kept_units = attn.sat_last_kept.tolist()
        hd = D // H
        heads = [h for h in range(H) if (h // (H // KV) if unit == "kv_group" else h) not in kept_units]
        rows = [r for h in heads for r in range(h * hd, (h + 1) * hd)]
        name = "model.layers.0.self_attn.q_proj.weight"
        assert rows and torch.equal(params[name].detach()[rows], before[name][rows])


def test_skip_is_refused_where_it_cannot_be_exact():
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    model, _ = model_and_data(layers=1)
    model = get_peft_model(model.float(), LoraConfig(r=2, target_modules=["gate_proj", "up_proj", "down_proj"]))
    with pytest.raises(satlm.UnsupportedModelError, match="LoRA"):
        satlm.apply_sat(model, satlm.SATConfig(omitted_update="skip"))
    with pytest.raises(SATConfigError, match="omitted_update"):
        satlm.SATConfig(omitted_update="lazy")


# -- f. unbiased sampling ---------------------------------------------------------------------------------
def capped_probabilities(scores: torch.Tensor, k: int) -> torch.Tensor:
    """p_i = min(1, c s_i), sum p = k, by repeated capping (written here, independently of satlm's)."""
    s = [max(float(v), float(scores.max()) * 1e-12) for v in scores]
    capped: set[int] = set()
    while True:
        free = [i for i in range(len(s)) if i not in capped]
        c = (k - len(capped)) / sum(s[i] for i in free)
        over = [i for i in free if c * s[i] > 1.0]
        if not over:
            return torch.tensor([1.0 if i in capped else c * s[i] for i in range(len(s))], dtype=torch.float64)
        capped.update(over)


def test_unbiased_selection_includes_each_unit_with_its_probability():
    from satlm.core.selection import inclusion_probabilities, select_unbiased

    g = torch.Generator().manual_seed(0)
    scores = torch.rand(24, generator=g) ** 4
    scores[[3, 7]] = 50.0  # two units above the cap
    scores[5] = 0.0  # a dead unit keeps a (tiny) chance
    k = 9
    p = inclusion_probabilities(scores, k)
    assert torch.allclose(p, capped_probabilities(scores, k), rtol=1e-9, atol=1e-15)
    assert p[3] == 1.0 and p[7] == 1.0 and 0 < p[5] < 1e-9
    draws, counts = 20000, torch.zeros(24, dtype=torch.float64)
    for _ in range(draws):
        idx, w = select_unbiased(scores, k, torch.rand(24, generator=g))
        assert idx.numel() == k and torch.equal(idx, torch.unique(idx))  # k distinct units, ascending
        assert torch.allclose(w.double(), 1.0 / p[idx], rtol=1e-6)
        counts[idx] += 1
    freq = counts / draws
    sd = (p * (1 - p) / draws).sqrt()
    assert ((freq - p).abs() <= 5 * sd + 1e-12).all(), (freq - p).abs().max()


@pytest.mark.parametrize("unfused", [False, True])
def test_unbiased_matches_the_weighted_reference(unfused):
    extra = {"hidden_act": "gelu"} if unfused else {}
    model = tiny_model("llama", hidden=D, inter=FF, heads=H, kv_heads=KV, layers=2, vocab=V, **extra)
    data = batch(vocab=V, b=B, t=T, pad=True)
    plain = copy.deepcopy(model)
    loss, grads = sat_step(model, data, omission_rate=0.5, selection="unbiased", seed=3)
    kept = {}
    for layer in range(2):
        kept[(layer, "mlp")] = model.model.layers[layer].mlp.sat_last_kept.tolist()
        kept[(layer, "attn")] = list(range(H))
    k = keep(FF, 0.5)
    ref = reference_step(plain, data, forward="dense", kept=kept,
                         weights=lambda i, s: 1.0 / capped_probabilities(s, k))
    assert torch.allclose(loss, ref.loss, rtol=1e-10)  # the forward is the dense model's
    assert_same_grads(grads, trained(ref.grads))
    # and not the unweighted top-k step (the weights matter)
    flat = reference_step(copy.deepcopy(plain), data, forward="dense", kept=kept)
    name = "model.layers.0.mlp.down_proj.weight"
    assert (grads[name] - flat.grads[name]).norm() > 0.1 * flat.grads[name].norm()


def test_unbiased_gradient_averages_to_the_dense_gradient():
    model, data = model_and_data(layers=1)
    dense = copy.deepcopy(model)
    dense(**data).loss.backward()
    satlm.apply_sat(model, satlm.SATConfig(schedule="constant", omission_rate=0.5, selection="unbiased", seed=0))
    draws = 400
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for _ in range(draws):  # every forward draws a new selection; the weights do not move
        model.zero_grad(set_to_none=True)
        model(**data).loss.backward()
        for n, p in model.named_parameters():
            total[n] += p.grad
    got = {n: t / draws for n, t in total.items()}
    want = dict(grads_of(dense))
    for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.gate_proj.weight",
                 "model.embed_tokens.weight"):
        err = (got[name] - want[name]).norm()
        assert err / want[name].norm() < 0.06, (name, (err / want[name].norm()).item())  # 0.013-0.043 measured
    # top-k's gradient is biased: the omitted channels never get one
    model_topk, _ = model_and_data(layers=1)
    _, topk = sat_step(model_topk, data, omission_rate=0.5)
    name = "model.layers.0.mlp.down_proj.weight"
    assert (topk[name] - want[name]).norm() / want[name].norm() > 0.12  # 0.18 measured


def test_unbiased_flops_are_top_k_flops():
    model, data = model_and_data(layers=2)
    dense = step_flops(model, data)
    satlm.apply_sat(model, satlm.SATConfig(schedule="constant", omission_rate=0.5, selection="unbiased"))
    n_tokens = int(data["attention_mask"].sum())
    k = keep(FF, 0.5)
    expected = dense - 2 * 12 * D * (FF - k) * B * T  # the MLP backward over kept channels (every row, padded too)
    measured = step_flops(model, data)
    assert abs(measured - expected) / expected < 0.02, (measured, expected, n_tokens)


def test_unbiased_is_refused_where_it_is_not_exact():
    for kw in ({"attn_omission_rate": 0.5}, {"forward": "sparse"}, {"source": "history"}):
        with pytest.raises(SATConfigError, match="unbiased"):
            satlm.SATConfig(selection="unbiased", **kw)
    with pytest.raises(SATConfigError, match="selection"):
        satlm.SATConfig(selection="vcas")


# -- g. vocabulary rows of the output layer ---------------------------------------------------------------
def vocab_reference(model, data, rate: float, input_kept: bool = False):
    """The dense step's gradients with the output layer's weight gradient kept in the rows whose logits' gradients
    have the largest norms over the tokens (round((1 - rate) V) rows), written from the plain model: the logits'
    gradient and the head's input are read by hooks, the head's own weight gradient G^T H is formed here and
    taken away from the omitted rows (with tied embeddings the input embedding's part stays). input_kept: the
    head's input gradient G W loses the omitted rows' share G[:, omitted] W[omitted] too, by a hook on the input."""
    seen = {}
    weight = model.lm_head.weight

    def cut(grad):  # the head's input gradient G W, less the omitted rows' share
        g, omitted = seen["g"], seen["omitted"]
        return grad - (g[:, omitted] @ weight.detach().double()[omitted]).reshape(grad.shape).to(grad.dtype)

    def hook(mod, args, out):
        seen["h"] = args[0].detach().double()
        if input_kept:
            args[0].register_hook(cut)
        out.register_hook(lambda grad: seen.update(g=grad.double().reshape(-1, V),
                                                   omitted=torch.argsort((grad.double().reshape(-1, V) ** 2).sum(0),
                                                                         descending=True)[round((1 - rate) * V):]))

    handle = model.lm_head.register_forward_hook(hook)
    loss = model(**data).loss
    loss.backward()
    handle.remove()
    g, omitted = seen["g"], seen["omitted"]
    h = seen["h"].reshape(-1, D)
    grads = trained(grads_of(model))
    head = g.t() @ h  # (V, D): the output layer's own weight gradient
    name = "model.embed_tokens.weight" if model.config.tie_word_embeddings else "lm_head.weight"
    w = grads[name].double()
    w[omitted] -= head[omitted]
    grads[name] = w.float()
    return loss.detach(), grads, omitted


@pytest.mark.parametrize("tie,input_kept", [(False, False), (True, False), (False, True), (True, True)])
def test_vocab_rows_match_the_reference(tie, input_kept):
    model = tiny_model("llama", hidden=D, inter=FF, heads=H, kv_heads=KV, layers=2, vocab=V, tie=tie)
    data = batch(vocab=V, b=B, t=T, pad=True)
    plain = copy.deepcopy(model)
    dense = copy.deepcopy(model)
    loss, grads = sat_step(model, data, omission_rate=0.0, vocab_omission_rate=0.75,
                           vocab_omission_input_grad=input_kept)
    ref_loss, ref_grads, omitted = vocab_reference(plain, data, 0.75, input_kept)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)  # the forward is unchanged
    assert_same_grads(grads, ref_grads)
    if not tie:  # the omitted rows get no gradient at all; the others get the dense one
        assert grads["lm_head.weight"][omitted].abs().max() == 0
    dense(**data).loss.backward()
    decoder = "model.layers.0.mlp.down_proj.weight"  # the input gradient: exact, or not, as asked
    err = ((grads[decoder] - grads_of(dense)[decoder]).norm() / grads_of(dense)[decoder].norm()).item()
    assert (err > 1e-4) if input_kept else (err < 1e-5), err


def test_vocab_rows_follow_the_schedule_and_come_off():
    model, data = model_and_data(layers=1)
    plain = copy.deepcopy(model)
    satlm.apply_sat(model, satlm.SATConfig(omission_rate=0.5, vocab_omission_rate=0.8, rungs=2, dense_tail=0.5))
    rt = model.sat_runtime
    satlm.set_sat_step(model, 0, 8)
    assert rt.vocab_rate() == pytest.approx(0.8)
    satlm.set_sat_step(model, 2, 8)  # the second rung: half the rate
    assert rt.vocab_rate() == pytest.approx(0.4)
    satlm.set_sat_step(model, 6, 8)  # the dense tail: the dense step
    model(**data).loss.backward()
    plain(**data).loss.backward()
    assert_same_grads(trained(grads_of(model)), trained(grads_of(plain)), tol=1e-6)
    satlm.remove_sat(model)
    assert "forward" not in vars(model.lm_head)


def test_vocab_rows_flops():
    model, data = model_and_data(layers=2)
    dense = step_flops(model, data)
    satlm.apply_sat(model, satlm.SATConfig(schedule="constant", omission_rate=0.0, vocab_omission_rate=0.75))
    k = keep(V, 0.75)
    assert k == V // 4
    n, n_grad = B * T, loss_positions(data)  # the head's backward runs over the N' positions with a next label
    assert 0 < n_grad < n
    # the head's weight gradient over the kept rows only, both of its gradients over the N' positions only
    assert dense - step_flops(model, data) == 2 * D * (2 * n * V - n_grad * (V + k))
    satlm.remove_sat(model)
    satlm.apply_sat(model, satlm.SATConfig(schedule="constant", omission_rate=0.0, vocab_omission_rate=0.75,
                                           vocab_omission_input_grad=True))
    assert dense - step_flops(model, data) == 2 * D * (2 * n * V - 2 * n_grad * k)  # and its input gradient


def loss_positions(data) -> int:
    """The positions whose logits get a gradient: those with a next label that is not -100 (the model's loss
    shifts the labels by one)."""
    return int((data["labels"][:, 1:] != -100).sum())


@pytest.mark.parametrize("tie", [False, True])
def test_vocab_rows_skip_the_tokens_without_loss_exactly(tie):
    # SFT: the prompt's labels are -100, so its logits' gradient rows are zero; the head's backward skips them
    model = tiny_model("llama", hidden=D, inter=FF, heads=H, kv_heads=KV, layers=2, vocab=V, tie=tie)
    data = batch(vocab=V, b=B, t=T, pad=True)
    data["labels"][:, : T - 4] = -100  # 3 answer tokens a sequence at most
    plain, dense = copy.deepcopy(model), copy.deepcopy(model)
    flops_dense = step_flops(copy.deepcopy(model), data)
    loss, grads = sat_step(model, data, omission_rate=0.0, vocab_omission_rate=0.75)
    ref_loss, ref_grads, _ = vocab_reference(plain, data, 0.75)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    assert_same_grads(grads, ref_grads)
    dense(**data).loss.backward()
    decoder = "model.layers.0.mlp.down_proj.weight"  # the input gradient reaching the decoder is the dense one
    torch.testing.assert_close(grads[decoder], grads_of(dense)[decoder], rtol=1e-5, atol=1e-7)
    n, n_grad, k = B * T, loss_positions(data), keep(V, 0.75)
    assert flops_dense - step_flops(model, data) == 2 * D * (2 * n * V - n_grad * (V + k))


def test_gradient_rows_find_every_row_with_a_nonzero_entry():
    from satlm.core.ops import gradient_rows

    g = torch.zeros(6, 50)
    g[1, 7] = 1e-30  # its square underflows in float32: a norm would call the row zero
    g[3, 0] = float("nan")
    g[4] = torch.randn(50)
    g[5, 9] = -2.0  # negative entries only
    assert gradient_rows(g).tolist() == [1, 3, 4, 5]
    assert gradient_rows(torch.ones(3, 5)) is None  # every row: no gather
    assert gradient_rows(torch.zeros(2, 5)).tolist() == []
    few = torch.ones(32, 5)
    few[0] = 0  # 1 zero row in 32: below the 1/16 worth gathering for
    assert gradient_rows(few) is None
    few[1] = 0  # 2 in 32: gathered
    assert gradient_rows(few).tolist() == list(range(2, 32))


def test_vocab_rows_refusals():
    with pytest.raises(SATConfigError, match="omitted_update"):
        satlm.SATConfig(vocab_omission_rate=0.5, omitted_update="skip")
    with pytest.raises(SATConfigError, match="vocab_omission_rate"):
        satlm.SATConfig(vocab_omission_rate=1.0)
    with pytest.raises(SATConfigError, match="needs vocab_omission_rate"):
        satlm.SATConfig(vocab_omission_input_grad=True)

    class Projection(torch.nn.Linear):
        pass

    model, _ = model_and_data(layers=1)
    model.lm_head = Projection(D, V, bias=False)
    with pytest.raises(satlm.UnsupportedModelError, match="plain torch.nn.Linear"):
        satlm.apply_sat(model, satlm.SATConfig(vocab_omission_rate=0.5))
    assert not hasattr(model, "sat_runtime") and "forward" not in vars(model.lm_head)  # nothing changed


@pytest.mark.parametrize("n", [1, 63, 64, 65, 200])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_column_norms_read_in_row_blocks_equal_the_norm_over_dim_0(n, dtype):
    # the vocabulary lever's scores: blocks of rows (and the last, partial block) all counted, in float32
    from satlm.core.importance import column_norms

    a = torch.randn(n, 301, generator=torch.Generator().manual_seed(n)).to(dtype)
    got = column_norms(a)
    assert got.dtype == torch.float32 and got.shape == (301,)
    torch.testing.assert_close(got, torch.linalg.vector_norm(a.double(), dim=0).float(), rtol=1e-5, atol=1e-6)
