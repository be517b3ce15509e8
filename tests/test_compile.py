"""torch.compile with SAT: no graph break inside SAT's modules, compiled loss and gradients equal to
eager, and recompiles bounded by the number of distinct kept counts (the schedule's rates).

What makes it traceable: selection noise is drawn before the forward (UnitSelector.begin_forward, in the model's
forward pre-hook, which runs outside the compiled region), the per-forward state is reset there instead of being
keyed on a forward counter, kept counts are int attributes of the wrapped modules set when the rates move (never
a traced float), and each autograd Function receives each tensor once. The only graph breaks are the two SAT
hooks at the model's boundary."""

from __future__ import annotations

import pytest
import torch

import satlm
from conftest import batch, sat_config, tiny_model

torch._dynamo.config.cache_size_limit = 64  # many tests compile the same code objects; no test relies on the limit

HOOKS = ("_begin_forward", "_end_forward")


def _sat(source="current", forward="dense", selection="topk", attn="sdpa", **kw):
    model = tiny_model(attn=attn)
    kw.setdefault("schedule", "constant")
    satlm.apply_sat(model, sat_config(source=source, forward=forward, selection=selection, omission_rate=0.5, **kw))
    return model


def _steps(model, call, data, steps=3, schedule=None):
    """Loss and every gradient of `steps` training steps (no optimizer: the same weights each step, so that
    history statistics and selection noise move on while the gradients stay comparable)."""
    out = []
    for i in range(steps):
        if schedule is not None:
            satlm.set_sat_step(model, i, schedule)
        model.zero_grad(set_to_none=True)
        loss = call(**data).loss
        loss.backward()
        out.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                    [m.sat_last_kept for m in satlm.modeling.patch._sat_modules(model)]))
    return out


def _assert_same(ref, got, tol):
    for (l1, g1, k1), (l2, g2, k2) in zip(ref, got):
        assert torch.allclose(l1, l2, rtol=tol, atol=tol), (l1, l2)
        assert set(g1) == set(g2)
        for n in g1:
            scale = g1[n].abs().max().clamp_min(1e-12)
            assert ((g1[n] - g2[n]).abs().max() / scale) <= tol, n
        for a, b in zip(k1, k2):
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b))


def _breaks_outside_hooks() -> list[str]:
    from torch._dynamo.utils import counters

    return [reason for reason in counters["graph_break"] if not any(h in reason for h in HOOKS)]


CASES = {
    "current-dense-sdpa-padded-topk": dict(pad=True),
    "current-sparse-sdpa-padded-sample": dict(forward="sparse", selection="sample", pad=True),
    "current-sparse-eager-unpadded-sample": dict(forward="sparse", selection="sample", attn="eager", pad=False),
    "current-dense-eager-padded-kv_group": dict(attn="eager", attn_unit="kv_group", pad=True),
    "history-sparse-sdpa-padded-sample": dict(source="history", forward="sparse", selection="sample", pad=True),
    "history-sparse-eager-unpadded-random-metric": dict(source="history", forward="sparse", metric="random",
                                                        attn="eager", pad=False),
    # fused scoring (its own torch.compile) inside a compiled model: traced with the model, no graph break
    "current-sparse-sdpa-padded-fused-scoring": dict(forward="sparse", pad=True, fused_scoring="on"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_equals_eager_without_graph_breaks_inside_sat(case):
    kw = dict(CASES[case])
    pad = kw.pop("pad")
    data = batch(pad=pad)
    if not pad:
        data.pop("attention_mask")  # an unpadded batch: SDPA runs is_causal, eager builds its own mask
    eager, compiled = _sat(**kw), _sat(**kw)
    ref = _steps(eager, eager, data)
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    got = _steps(compiled, torch.compile(compiled, backend="aot_eager"), data)
    assert _breaks_outside_hooks() == []
    assert counters["stats"]["unique_graphs"] >= 1  # it did compile
    _assert_same(ref, got, 1e-5)


@pytest.mark.integration
@pytest.mark.parametrize("case", ["current-dense-sdpa-padded-topk", "history-sparse-sdpa-padded-sample"])
def test_inductor_equals_eager(case):
    kw = dict(CASES[case])
    data = batch(pad=kw.pop("pad"))
    eager, compiled = _sat(**kw), _sat(**kw)
    ref = _steps(eager, eager, data)
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    got = _steps(compiled, torch.compile(compiled), data)  # inductor, C++ kernels on the CPU
    assert _breaks_outside_hooks() == []
    _assert_same(ref, got, 1e-4)


def test_recompiles_are_bounded_by_the_distinct_kept_counts():
    """A ladder of 4 rungs and a dense tail over 10 steps: 5 distinct kept counts (the dense tail runs the base
    modules). Each count is compiled once; returning to an earlier count reuses its graph."""
    from torch._dynamo.utils import counters

    data = batch()
    total = 10
    model = _sat(schedule="ladder", rungs=4, dense_tail=0.2)
    eager = _sat(schedule="ladder", rungs=4, dense_tail=0.2)
    counts = set()
    for i in range(total):
        satlm.set_sat_step(eager, i, total)
        counts.add(tuple(m.sat_kept if m._rate() > 0 else None for m in satlm.modeling.patch._sat_modules(eager)))
    assert len(counts) == 5
    ref = _steps(eager, eager, data, steps=total, schedule=total)

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="aot_eager")
    got = _steps(model, compiled, data, steps=total, schedule=total)
    _assert_same(ref, got, 1e-5)
    graphs = counters["stats"]["unique_graphs"]
    # again, from the top: every count has its graph already
    got = _steps(model, compiled, data, steps=total, schedule=total)
    assert counters["stats"]["unique_graphs"] == graphs
    # One graph per count for the model's body; the hooks split off at most one more graph each.
    assert graphs <= len(counts) + 2, graphs


def test_trainer_torch_compile_with_sat_callback(tmp_path):
    """transformers' Trainer with torch_compile=True and SATCallback: the losses of eager training."""
    from transformers import Trainer, TrainingArguments

    data = batch(b=4, pad=False)
    rows = [{k: v[i] for k, v in data.items() if k != "attention_mask"} for i in range(4)]

    def losses(compile_: bool):
        model = tiny_model(attn="sdpa")
        args = TrainingArguments(output_dir=str(tmp_path / str(compile_)), max_steps=4, per_device_train_batch_size=2,
                                 learning_rate=1e-3, report_to="none", use_cpu=True, logging_steps=1,
                                 save_strategy="no", torch_compile=compile_, torch_compile_backend="aot_eager",
                                 disable_tqdm=True, seed=0, data_seed=0)
        cb = satlm.SATCallback(config=sat_config(omission_rate=0.5, forward="dense", selection="topk"))
        trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[cb])
        trainer.train()
        return [r["loss"] for r in trainer.state.log_history if "loss" in r]

    from torch._dynamo.utils import counters

    eager = losses(False)
    torch._dynamo.reset()
    counters.clear()
    compiled = losses(True)
    assert counters["stats"]["unique_graphs"] >= 1  # the Trainer compiled the model
    assert len(eager) == 4 and compiled == pytest.approx(eager, rel=1e-5)
    assert _breaks_outside_hooks() == []
