"""Several training forwards before one backward: without gradient checkpointing each forward's graph
holds its own kept units, so the gradients are those of separate steps; with it, the layers of the first forward
would be recomputed with the second's units, so SAT refuses with a named error instead."""

from __future__ import annotations

import copy

import pytest
import torch

import satlm
from conftest import batch, sat_config, tiny_model


def _cfg(**kw):
    return sat_config(omission_rate=0.5, schedule="constant", selection="topk", **kw)


@pytest.mark.parametrize("forward", ["sparse", "dense"])
def test_two_forwards_then_one_backward_equal_two_steps(forward):
    a, b = batch(seed=1), batch(seed=2)
    together = tiny_model(attn="sdpa")
    apart = copy.deepcopy(together)
    satlm.apply_sat(together, _cfg(forward=forward))
    satlm.apply_sat(apart, _cfg(forward=forward))
    (together(**a).loss + together(**b).loss).backward()
    apart(**a).loss.backward()
    apart(**b).loss.backward()
    for (name, p), q in zip(together.named_parameters(), apart.parameters()):
        if p.grad is not None or q.grad is not None:
            assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7), name


def test_two_forwards_under_gradient_checkpointing_are_refused():
    model = tiny_model(attn="sdpa")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    satlm.apply_sat(model, _cfg())
    a, b = batch(seed=1), batch(seed=2)
    model(**a).loss.backward()  # forward, backward, forward, backward: fine
    model(**b).loss.backward()
    with torch.no_grad():  # a forward that needs no gradient does not count
        model(**a)
    loss = model(**a).loss
    with pytest.raises(satlm.GradientCheckpointingError, match="before the backward of the first"):
        model(**b)
    loss.backward()  # the first forward's backward still runs; then forwards are allowed again
    model(**b).loss.backward()
    model.eval()
    model(**a)
    model(**b)  # eval forwards are dense and recompute nothing


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_thinned_recompute_runs_over_the_kept_units_only(attn):
    """Paper mode with forward=sparse under checkpointing recomputes each layer over its kept units only (its
    selection is known): the backward's extra FLOPs are a kept-only forward of the layers, i.e. a history-mode
    forward at the same rates (FLOPs depend on the kept counts only) less the output head. Recomputing every
    head and channel, as the scoring pass does, would cost about twice that."""
    from satlm.bench.runner import flop_counter

    data = batch()
    plain = tiny_model(attn=attn)
    ckpt, hist = copy.deepcopy(plain), copy.deepcopy(plain)
    satlm.apply_sat(plain, _cfg(forward="sparse"))
    satlm.apply_sat(ckpt, _cfg(forward="sparse"))
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    satlm.apply_sat(hist, _cfg(source="history"))
    hist(**data).loss.backward()  # seeds the statistics: the next forward selects before it runs

    def backward_flops(model):
        loss = model(**data).loss
        with flop_counter() as counter:
            loss.backward()
        return counter.get_total_flops()

    recompute = backward_flops(ckpt) - backward_flops(plain)
    with flop_counter() as counter:
        hist(**data)
    cfg = plain.config
    head = 2 * data["input_ids"].numel() * cfg.hidden_size * cfg.vocab_size
    assert recompute == pytest.approx(counter.get_total_flops() - head, rel=0.01)
