"""No host syncs in SAT's forward and backward: on a GPU each one stops the host until the device
catches up, in every layer of every step. A dispatch mode sees every aten op of a training step (forward and
backward) and records the ones that read device values back to the host; Tensor.tolist / numpy are watched
too (on the CPU they bypass the dispatcher). SAT's step may sync no more than the same model's dense step does
(transformers' own mask code may sync, in both)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import satlm
from conftest import batch, sat_config, tiny_model

aten = torch.ops.aten
SYNCING = {aten._local_scalar_dense.default, aten.nonzero.default, aten._unique2.default, aten.unique_dim.default,
           aten.unique_consecutive.default, aten.masked_select.default, aten.is_nonzero.default, aten.equal.default,
           aten.repeat_interleave.Tensor, aten.argwhere.default, aten.nonzero_static.default}


class SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNCING and not (func is aten.repeat_interleave.Tensor and kwargs.get("output_size")):
            self.syncs.append(str(func))
        if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
            indices = args[1]
            if any(i is not None and i.dtype == torch.bool for i in indices):
                self.syncs.append(f"{func} with a boolean index")
        return func(*args, **kwargs)


def step_syncs(model, data, monkeypatch) -> list[str]:
    counter = SyncCounter()
    for name in ("tolist", "numpy", "item"):
        original = getattr(torch.Tensor, name)

        def watched(self, *a, _original=original, _name=name, **kw):
            counter.syncs.append(f"Tensor.{_name}")
            return _original(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, watched)
    try:
        with counter:
            model(**data).loss.backward()
    finally:
        monkeypatch.undo()
    model.zero_grad(set_to_none=True)
    return counter.syncs


@pytest.mark.parametrize("source,forward", [("current", "sparse"), ("current", "dense"), ("history", "sparse")])
@pytest.mark.parametrize("unit", ["head", "kv_group"])
@pytest.mark.parametrize("pad", [True, False], ids=["padded", "unpadded"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_a_sat_step_adds_no_host_sync(monkeypatch, source, forward, unit, pad, attn):
    data = batch(vocab=128, b=2, t=16, pad=pad)
    dense = step_syncs(tiny_model("llama", heads=8, kv_heads=2, attn=attn), data, monkeypatch)
    model = tiny_model("llama", heads=8, kv_heads=2, attn=attn)
    satlm.apply_sat(model, sat_config(omission_rate=0.5, schedule="constant", source=source, forward=forward,
                                      attn_unit=unit, seed=3))
    if source == "history":
        step_syncs(model, data, monkeypatch)  # the first step observes every unit; the second selects
    sat = step_syncs(model, data, monkeypatch)
    assert sorted(sat) == sorted(dense), f"SAT added host syncs: {sorted(set(sat) - set(dense)) or sat}"


def test_the_counter_sees_a_sync():
    """The counter can fail: torch.unique (what _expand once called) and .tolist() are caught."""
    counter = SyncCounter()
    with counter:
        torch.unique(torch.tensor([3, 1, 3]))
        torch.ones(3)[torch.tensor([True, False, True])]
    assert len(counter.syncs) == 2
