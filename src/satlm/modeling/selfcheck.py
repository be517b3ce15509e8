"""The self-check of `apply_sat`: what SAT cannot reproduce exactly, it refuses.

Two parts. Structure: every child module of a wrapped attention or MLP must be one the family's layout accounts
for (its projections, q/k norms, activation); an unknown norm or an extra projection is refused. Numbers: the
model runs once on a tiny batch (dense, without autograd) to capture what each wrapped module receives; then,
for each distinct kind of layer, SAT's sparse path with every unit kept (paper mode with both forwards, and
history) must give the base module's output, input gradient and parameter gradients; any difference beyond
rounding is an UnsupportedModelError naming the module and what differed. This is what makes one table entry
safe, and what protects users on a transformers version that changes a family.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn as nn

from .base import _SATModule
from .families import Layout, UnsupportedModelError

# (source, forward) paths checked; history starts from statistics of ones (every unit equally good).
PATHS = (("current", "sparse"), ("current", "dense"), ("history", "sparse"))


def check_structure(module: nn.Module, known: set[str], where: str, family: str) -> None:
    unknown = [name for name, _ in module.named_children() if name not in known]
    if unknown:
        raise UnsupportedModelError(
            f"{where} ({type(module).__name__}) has module(s) {', '.join(unknown)} that satlm's {family} layout does "
            f"not account for (it knows {', '.join(sorted(known))}); SAT would skip them, so the model is refused")


def _signature(m: _SATModule) -> tuple:
    """What distinguishes one layer's module from another's: its class and its plain attribute values
    (sliding window, layer type, use of RoPE, ...), and its parameters' shapes."""
    base = m.base_layer
    attrs = tuple(sorted((k, v) for k, v in vars(base).items()
                         if not k.startswith("_") and k != "layer_idx" and isinstance(v, (int, float, str, bool, type(None)))))
    shapes = tuple((n, tuple(p.shape)) for n, p in base.named_parameters())
    return (m.component, type(base).__name__, attrs, shapes)


def _capture(model: nn.Module, modules: list[_SATModule], device) -> dict[int, tuple]:
    """id(module) -> (args, kwargs) it received in a dense forward of a tiny padded batch."""
    config = model.config
    vocab = getattr(config, "vocab_size", None) or getattr(config.get_text_config(), "vocab_size")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 8), generator=g).to(device)
    mask = torch.ones(2, 8, dtype=torch.long, device=device)
    mask[1, :2] = 0  # left padding
    seen: dict[int, tuple] = {}
    hooks = []

    def hook(mod, args, kwargs):
        if id(mod) not in seen:
            seen[id(mod)] = (args, dict(kwargs))

    for m in modules:
        hooks.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        model.train(training)
        for h in hooks:
            h.remove()
    return seen


def _clone(v):
    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    if isinstance(v, tuple):
        return tuple(_clone(x) for x in v)
    if isinstance(v, list):
        return [_clone(x) for x in v]
    return v


def _run(module: nn.Module, args, kwargs, grad_out: torch.Tensor | None, params):
    """Output, input gradient and parameter gradients of module(*args, **kwargs) (hidden states as the input)."""
    args, kwargs = _clone(args), {k: _clone(v) for k, v in kwargs.items() if k not in ("cache", "past_key_values")}
    if args:
        x = args[0].requires_grad_(True)
    else:
        x = kwargs["hidden_states"].requires_grad_(True)
    kwargs.pop("use_cache", None)
    out = module(*args, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    if grad_out is None:
        g = torch.Generator().manual_seed(1)
        grad_out = torch.randn(out.shape, generator=g).to(device=out.device, dtype=out.dtype)
    trainable = [p for p in params if p.requires_grad]
    grads = torch.autograd.grad(out, [x, *trainable], grad_out, allow_unused=True)
    return out.detach(), grads[0], dict(zip([id(p) for p in trainable], grads[1:])), grad_out


def _rel(a, b) -> float:
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


class _NoDropout:
    """Dropout probabilities of a module set to 0 for the check (the paths draw different random numbers)."""

    def __init__(self, module: nn.Module):
        self.module, self.saved = module, {}

    def __enter__(self):
        for k, v in vars(self.module).items():
            if "dropout" in k and isinstance(v, float) and v > 0:
                self.saved[(self.module, k)] = v
        for sub in self.module.modules():  # nn.Dropout inside (peft's lora_dropout)
            if isinstance(sub, nn.Dropout) and sub.p > 0:
                self.saved[(sub, "p")] = sub.p
        for (mod, k) in self.saved:
            setattr(mod, k, 0.0)
        return self

    def __exit__(self, *exc):
        for (mod, k), v in self.saved.items():
            setattr(mod, k, v)


def self_check(model: nn.Module, modules: list[_SATModule], layout: Layout) -> None:
    """Raise UnsupportedModelError if any wrapped module's sparse path with every unit kept is not the module."""
    if not modules:
        return
    first = next(modules[0].base_layer.parameters())
    if first.device.type == "meta":
        return  # weights not materialized yet: nothing to run
    runtime = modules[0].sat_runtime
    captured = _capture(model, modules, first.device)
    tol = 1e-4 if first.dtype == torch.float32 else 3e-2
    groups: dict[tuple, _SATModule] = {}
    for m in modules:
        groups.setdefault(_signature(m), m)
    saved_config, saved_id = runtime.config, runtime.forward_id
    try:
        for m in groups.values():
            if id(m) not in captured:
                continue  # not reached by the model's forward (a layer the model skips)
            args, kwargs = captured[id(m)]
            _check_module(m, args, kwargs, runtime, saved_config, tol, layout)
    finally:
        runtime.config, runtime.forward_id, runtime.keep_all = saved_config, saved_id, False
        runtime.token_mask = None


def _check_module(m: _SATModule, args, kwargs, runtime, config, tol: float, layout: Layout) -> None:
    base = m.base_layer
    params = list(base.parameters())
    training = m.training
    sel_state = copy.copy(vars(m.sat_selector))
    where = f"layers[{m.sat_layer_idx}].{layout.attn if m.component == 'attn' else layout.mlp}"
    try:
        m.train()
        with _NoDropout(base):
            runtime.keep_all = False
            runtime.enabled = True
            ref_out, ref_dx, ref_dp, grad_out = _run(base, args, kwargs, None, params)
            if not (torch.isfinite(ref_out).all() and (ref_dx is None or torch.isfinite(ref_dx).all())):
                return  # the module itself is not finite on this input (fp16 overflow, ...): nothing to compare
            for source, forward in PATHS:
                runtime.config = dataclasses.replace(config, source=source, forward=forward, metric="l2", selection="topk",
                                                     omission_rate=0.5, attn_omission_rate=None,
                                                     mlp_omission_rate=None, schedule="constant", steps=None,
                                                     dense_start=0.0, rung_placement="steps", layer_rates=None,
                                                     layer_drop_rate=0.0, loss_tokens_dense=False,
                                                     omitted_update="zero")
                runtime.keep_all = True
                runtime.begin_forward(None)  # every selector reset, no noise drawn
                sel = m.sat_selector
                sel.history = torch.ones(m.sat_n_units, device=ref_out.device) if source == "history" else None
                sel.age = torch.zeros_like(sel.history) if source == "history" else None
                out, dx, dp, _ = _run(m, args, kwargs, grad_out, params)
                worst = [("output", _rel(out, ref_out)), ("input gradient", _rel(dx, ref_dx))]
                names = {id(p): n for n, p in base.named_parameters()}
                worst += [(f"gradient of {names[i]}", _rel(dp.get(i), ref_dp.get(i))) for i in ref_dp]
                bad = [(what, err) for what, err in worst if not err <= tol]
                if bad:
                    what, err = bad[0]
                    raise UnsupportedModelError(
                        f"self-check: {where} ({type(base).__name__}): with every unit kept, SAT's {source}/{forward} "
                        f"path gives a {what} that differs from the module's own by {err:.2e} (relative; tolerance "
                        f"{tol:g}); satlm's {layout.family} layout does not reproduce this module, so the model is "
                        "refused")
    finally:
        runtime.keep_all = False
        m.train(training)
        vars(m.sat_selector).update(sel_state)
