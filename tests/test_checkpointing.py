"""Several training forwards before one backward (issue 15): without gradient checkpointing each forward's graph
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
