"""apply_sat / remove_sat / disable_sat, eval, checkpoints, seeds, autocast and gradient checkpointing."""

from __future__ import annotations

import copy

import pytest
import torch

import satlm
from conftest import batch, sat_config, tiny_model


def grads_of(model):
    return {n.replace("base_layer.", ""): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_eval_is_dense_and_identical():
    model = tiny_model()
    ref = copy.deepcopy(model).eval()
    satlm.apply_sat(model, sat_config(omission_rate=0.75, schedule="constant"))
    model.eval()
    data = batch()
    with torch.no_grad():
        assert torch.equal(model(**data).logits, ref(**data).logits)


def test_disable_sat_is_dense_in_training():
    model = tiny_model()
    ref = copy.deepcopy(model)
    data = batch()
    satlm.apply_sat(model, sat_config(omission_rate=0.5, schedule="constant"))
    with satlm.disable_sat(model):
        assert torch.equal(model(**data).loss, ref(**data).loss)
    assert not torch.equal(model(**data).loss, ref(**data).loss)


def test_remove_sat_restores_the_original_objects():
    model = tiny_model()
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    hooks_before = len(model.model._forward_pre_hooks)
    satlm.apply_sat(model, sat_config(omission_rate=0.5, schedule="constant"))
    assert isinstance(model.model.layers[0].self_attn, satlm.SATAttention)
    model(**batch()).loss.backward()
    satlm.remove_sat(model)
    assert model.model.layers[0].self_attn is attn and model.model.layers[0].mlp is mlp
    assert not [a for a in dir(model) if a.startswith("sat_")]
    assert len(model.model._forward_pre_hooks) == hooks_before
    after = dict(model.named_parameters())
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before)
    satlm.apply_sat(model, satlm.SATConfig())  # can be applied again


def test_apply_twice_and_bad_layers_raise():
    model = tiny_model(layers=2)
    with pytest.raises(ValueError, match="layers"):
        satlm.apply_sat(model, satlm.SATConfig(layers=[0, 5]))
    assert not hasattr(model, "sat_runtime")
    satlm.apply_sat(model, satlm.SATConfig(layers=[-1]))
    assert type(model.model.layers[0].mlp).__name__ == "LlamaMLP"
    assert isinstance(model.model.layers[1].mlp, satlm.SATMLP)
    with pytest.raises(ValueError, match="already"):
        satlm.apply_sat(model, satlm.SATConfig())


def test_unsupported_model_names_class_and_supported_list():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(satlm.UnsupportedModelError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        satlm.apply_sat(model, satlm.SATConfig())


def test_save_pretrained_writes_a_plain_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model()
    satlm.apply_sat(model, sat_config(omission_rate=0.5, schedule="constant"))
    model(**batch()).loss.backward()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert not any("base_layer" in k for k in loaded.state_dict())
    model.eval()
    data = batch()
    with torch.no_grad():
        assert torch.equal(loaded(**data).logits, model(**data).logits)


def test_plain_state_dict_loads_into_patched_model():
    src = tiny_model(seed=5)
    model = tiny_model(seed=6)
    satlm.apply_sat(model, satlm.SATConfig())
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=True), None
    model.eval()
    src.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch()).logits, src(**batch()).logits)


def run_steps(seed: int, n: int = 3, **kw):
    model = tiny_model()
    satlm.apply_sat(model, sat_config(omission_rate=0.5, schedule="constant", seed=seed, **kw))
    kept = []
    for i in range(n):
        model(**batch(seed=i)).loss.backward()
        kept.append([(e["attn"]["kept"], e["mlp"]["kept"]) for e in satlm.sat_state(model)["layers"]])
    return kept


@pytest.mark.parametrize("source", ["current", "history"])
def test_same_seed_same_selections(source):
    assert run_steps(7, source=source) == run_steps(7, source=source)
    assert run_steps(7, source=source) != run_steps(8, source=source)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("source,forward", [("current", "sparse"), ("current", "dense"), ("history", "sparse")])
def test_gradient_checkpointing_reuses_the_selection(source, forward, attn):
    """The recomputed forward must see the same kept units as the first one, so the gradients match a run
    without checkpointing; a fresh draw in the recomputation would give different gradients. (Paper mode's thinned
    forward recomputes over the kept units only, with the flash kernel under SDPA: test_checkpointing.py.)"""
    runs = []
    for ckpt in (False, True):
        model = tiny_model(attn=attn)
        satlm.apply_sat(model, sat_config(omission_rate=0.5, schedule="constant", selection="sample",
                                          source=source, forward=forward, seed=11))
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for i in range(2):  # the second step is a genuine history step
            model.zero_grad()
            loss = model(**batch(seed=i)).loss
            loss.backward()
        runs.append((loss.detach(), grads_of(model), satlm.sat_state(model)["layers"]))
    (l0, g0, s0), (l1, g1, s1) = runs
    assert torch.equal(l0, l1)
    assert s0 == s1
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("source", ["current", "history"])
def test_autocast_bf16_on_cpu(source):
    model = tiny_model()
    ref = copy.deepcopy(model)
    satlm.apply_sat(model, sat_config(omission_rate=0.5, schedule="constant", selection="topk", source=source))
    data = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**data).loss
        ref_loss = ref(**data).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert abs(loss.item() - ref_loss.item()) < 0.5
    for name, p in model.named_parameters():
        assert p.grad is None or (p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()), name
    mlp = model.model.layers[0].mlp
    assert mlp.base_layer.gate_proj.weight.grad.abs().sum(1).gt(0).sum() == len(mlp.sat_last_kept)
