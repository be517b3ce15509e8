"""apply_sat / remove_sat / disable_sat and the model-level state used by the callback and for resume."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn as nn

from ..config import SATConfig, SATConfigError, check_layers
from ..core.ops import vocab_rows_linear
from ..distributed import reduce_scores
from ..errors import GradientCheckpointingError
from ..schedules import kept_count
from .attention import SATAttention
from .base import _SATModule
from .families import Layout, UnsupportedModelError, decoder_layers, get_path, layout_for
from .mlp import SATMLP
from .omitted import check_skip_supported
from .proj import Proj
from .runtime import SATRuntime
from .selfcheck import check_structure, self_check


def _unwrap(model: nn.Module) -> nn.Module:
    """The HF model inside DDP/accelerate wrappers (module.module...), torch.compile's OptimizedModule (_orig_mod)
    and peft's PeftModel (base_model.model)."""
    while True:
        if "sat_runtime" in vars(model):
            return model
        inner = vars(model).get("_modules", {})
        if isinstance(inner.get("module"), nn.Module):
            model = inner["module"]
        elif isinstance(inner.get("_orig_mod"), nn.Module):
            model = inner["_orig_mod"]
        elif hasattr(model, "peft_config") and isinstance(inner.get("base_model"), nn.Module) and isinstance(
                getattr(inner["base_model"], "model", None), nn.Module):
            model = inner["base_model"].model
        else:
            return model


def _runtime(model: nn.Module) -> SATRuntime:
    model = _unwrap(model)
    rt = getattr(model, "sat_runtime", None)
    if rt is None:
        raise ValueError(f"{type(model).__name__} has no SAT applied; call satlm.apply_sat(model, config) first")
    return rt


def _sat_modules(model: nn.Module) -> list[_SATModule]:
    return [m for m in _unwrap(model).modules() if isinstance(m, _SATModule)]


def _checked(module: nn.Module | None, names: tuple[str, ...], known: set[str], where: str, layout: Layout):
    """The module if SAT can wrap it: every projection the layout names is there and a plain Linear, and no
    child module is unknown. A missing module (a layer without attention, say) is None."""
    if module is None:
        return None
    for name in names:
        try:
            sub = get_path(module, name)
        except AttributeError:
            raise UnsupportedModelError(f"{where} ({type(module).__name__}) has no {name!r}, which satlm's "
                                        f"{layout.family} layout expects") from None
        Proj(sub, f"{where}.{name}")  # a plain Linear, or peft's LoRA around one
    check_structure(module, known, where, layout.family)
    return module


def _dense_mlp(mlp: nn.Module | None, layout: Layout) -> bool:
    """A dense MLP with the layout's projections (in a MoE family, the experts are not)."""
    return mlp is not None and all(isinstance(getattr(mlp, n, None), nn.Linear) for n in layout.mlp_projections())


def _as_config(config) -> SATConfig:
    if config is None:
        config = SATConfig()
    elif isinstance(config, dict):
        config = SATConfig.from_dict(config)
    elif not isinstance(config, SATConfig):
        raise TypeError(f"apply_sat expects a SATConfig or dict, got {type(config).__name__}")
    return config.validate()


def _plan(model: nn.Module, layout: Layout, config: SATConfig) -> list[tuple]:
    """(index, layer, attention or None, MLP or None) of every chosen layer, each module checked (nothing is
    changed yet)."""
    layers = decoder_layers(model, layout)
    plan = []
    for i in check_layers(config.layers, len(layers)):
        layer = layers[i]
        attn = _checked(getattr(layer, layout.attn, None), layout.attn_projections(), layout.known_attn_children(),
                        f"layers[{i}].{layout.attn}", layout)
        mlp = getattr(layer, layout.mlp, None)
        if layout.moe and not _dense_mlp(mlp, layout):
            mlp = None  # experts: left as they are
        mlp = _checked(mlp, layout.mlp_projections(), layout.known_mlp_children(), f"layers[{i}].{layout.mlp}", layout)
        if attn is not None:
            cfg = attn.config
            heads, kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
            if heads % kv:
                raise UnsupportedModelError(f"layers[{i}].{layout.attn}: {heads} query heads do not split into {kv} "
                                            "KV groups")
        plan.append((i, layer, attn, mlp))
    return plan


def _set_layer_factors(runtime: SATRuntime, config: SATConfig, n_layers: int, chosen: list[int]) -> None:
    """layer_rates given as a list: one factor per decoder layer, each leaving a rate below 1."""
    factors = config.layer_rates
    if factors is None or factors == "auto":
        return
    if len(factors) != n_layers:
        raise SATConfigError(f"SATConfig.layer_rates has {len(factors)} factors; the model has {n_layers} decoder "
                             "layers: give one factor per layer (the layers SAT skips are ignored)")
    top = max(config.max_attn_rate, config.max_mlp_rate, config.layer_drop_rate)
    for i in chosen:
        if top * factors[i] >= 1.0:
            raise SATConfigError(f"SATConfig.layer_rates[{i}]={factors[i]:g} times the rate {top:g} omits every unit "
                                 f"of layer {i}; each factor must keep rate x factor below 1")
    runtime.layer_factors = {i: factors[i] for i in chosen}


def _skippable_forward(layer: nn.Module, forward, runtime: SATRuntime, index: int):
    """The decoder layer's forward with whole-layer backward skipping (layer_drop_rate): in a forward that drew
    this layer, its output is computed without autograd and its gradient passes to the input unchanged
    (y + (x - x.detach()): the value is y exactly, the input gradient the residual stream's)."""

    def skippable(*args, **kwargs):
        if not (index in runtime.dropped and layer.training and runtime.enabled and torch.is_grad_enabled()):
            return forward(*args, **kwargs)
        if torch.compiler.is_compiling():
            raise SATConfigError("SATConfig.layer_drop_rate with torch.compile: the skipped layers change every "
                                 "forward, so the graph would recompile; set layer_drop_rate=0 to compile")
        x = args[0] if args else kwargs["hidden_states"]
        with torch.no_grad():
            out = forward(*args, **kwargs)
        y = out[0] if isinstance(out, tuple) else out
        y = y + (x - x.detach())
        return (y, *out[1:]) if isinstance(out, tuple) else y

    skippable.sat_original = forward
    return skippable


def _install_layer_drop(runtime: SATRuntime, plan: list[tuple]) -> None:
    if not runtime.config.layer_drop_rate:
        return
    for i, layer, _, _ in plan:
        layer.forward = _skippable_forward(layer, layer.forward, runtime, i)  # an instance attribute: remove_sat
    runtime.drop_layers = [i for i, *_ in plan]


def _vocab_forward(head: nn.Linear, forward, runtime: SATRuntime):
    """The output layer's forward with vocab_omission_rate: in a training forward with a rate above 0, the logits
    come from ops.vocab_rows_linear (the same values; the weight gradient over the kept vocabulary rows only)."""
    n_rows = head.weight.shape[0]

    @torch.compiler.disable  # the rate moves with the schedule and the selection is made in the backward
    def vocab_omitting(x):
        rate = runtime.vocab_rate() if (head.training and runtime.enabled and torch.is_grad_enabled()) else 0.0
        k = kept_count(n_rows, rate)
        input_kept = runtime.config.vocab_omission_input_grad
        if k >= n_rows or not (head.weight.requires_grad or input_kept):
            return forward(x)
        return vocab_rows_linear(x, head.weight, head.bias, k, reduce_scores, input_kept)

    vocab_omitting.sat_original = forward
    return vocab_omitting


def _install_vocab_omission(model: nn.Module, runtime: SATRuntime) -> None:
    """vocab_omission_rate: the output layer's forward replaced by one whose backward keeps the weight gradient of
    the vocabulary rows that matter (an instance attribute: remove_sat deletes it). Refused for an output layer
    that is not a plain Linear (a LoRA-wrapped or quantized head, a custom projection)."""
    if not runtime.config.vocab_omission_rate:
        return
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear:
        raise UnsupportedModelError(f"SATConfig.vocab_omission_rate={runtime.config.vocab_omission_rate:g} needs the "
                                    "model's output layer (get_output_embeddings()) to be a plain torch.nn.Linear; "
                                    f"got {type(head).__name__}. Set vocab_omission_rate=0 for this model")
    head.forward = _vocab_forward(head, head.forward, runtime)


def _install_label_hook(model: nn.Module, runtime: SATRuntime) -> None:
    """loss_tokens_dense: the outer model's forward gets the labels (the inner model, whose pre-hook begins the
    forward, does not): keep them for begin_forward."""
    if not runtime.config.loss_tokens_dense:
        return

    @torch.compiler.disable
    def _labels(module, args, kwargs):
        if module.training:
            runtime.pending_labels = kwargs.get("labels")

    model.sat_label_hook = model.register_forward_pre_hook(_labels, with_kwargs=True)


def _install_hooks(model: nn.Module, runtime: SATRuntime) -> None:
    """The model's forward hooks: a training forward begins (token mask, selectors reset, noise drawn) and ends
    (waiting for its backward). They run eagerly, outside any torch.compile region: they count forwards and draw
    selection noise (a generator and a Python counter would break or re-specialize a compiled graph)."""
    owner = getattr(model, "base_model", model)

    @torch.compiler.disable
    def _begin_forward(module, args, kwargs):
        if module.training:
            if runtime.awaiting_backward and torch.is_grad_enabled() and _checkpointing(model):
                raise GradientCheckpointingError(
                    "a second training forward before the backward of the first, with gradient checkpointing "
                    "on: the first forward's layers would be recomputed with the second's kept units (SAT keeps "
                    "one selection per layer). Call backward after each forward, or turn gradient "
                    "checkpointing off for this")
            mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
            runtime.begin_forward(mask, _input_device(module, args, kwargs))

    @torch.compiler.disable
    def _end_forward(module, args, kwargs, output):
        logits = None  # what the backward reaches right after the loss: the owner's first output
        for name in ("logits", "last_hidden_state"):
            if logits is None:
                logits = getattr(output, name, None)
        if logits is None and isinstance(output, (tuple, list)) and output:
            logits = output[0]
        if module.training and isinstance(logits, torch.Tensor) and logits.requires_grad:
            runtime.awaiting_backward = True

            def _backward_started(grad):
                runtime.awaiting_backward = False

            logits.register_hook(_backward_started)

    model.sat_hook = owner.register_forward_pre_hook(_begin_forward, with_kwargs=True)
    model.sat_end_hook = owner.register_forward_hook(_end_forward, with_kwargs=True)


def apply_sat(model: nn.Module, config: SATConfig | dict | None = None) -> nn.Module:
    """Wrap the attention and MLP of each chosen decoder layer in place; return the model.

    The original modules are kept as `base_layer` and swapped through their parent layer, so that `remove_sat`
    puts the very same objects back. Raises UnsupportedModelError (nothing changed) for a model, module or
    parameter SAT cannot train exactly, including when the self-check (modeling/selfcheck.py) finds that SAT's
    path with every unit kept does not reproduce a module.
    """
    config = _as_config(config)
    outer, model = model, _unwrap(model)  # a PeftModel: the HF model inside, with its LoRA layers
    if getattr(model, "sat_runtime", None) is not None:
        raise ValueError("SAT is already applied to this model; call satlm.remove_sat(model) first")
    layout = layout_for(model)
    plan = _plan(model, layout, config)
    runtime = SATRuntime(config, layout)
    _set_layer_factors(runtime, config, len(decoder_layers(model, layout)), [p[0] for p in plan])
    wrapped: list[_SATModule] = []
    for i, layer, attn, mlp in plan:
        if attn is not None:
            setattr(layer, layout.attn, SATAttention(attn, runtime, i))
            wrapped.append(getattr(layer, layout.attn))
        if mlp is not None:
            setattr(layer, layout.mlp, SATMLP(mlp, runtime, i))
            wrapped.append(getattr(layer, layout.mlp))
    model.sat_runtime = runtime
    _install_hooks(model, runtime)
    _install_label_hook(model, runtime)
    _install_layer_drop(runtime, plan)
    try:
        _install_vocab_omission(model, runtime)
        if config.omitted_update == "skip":
            check_skip_supported(wrapped)
        self_check(model, wrapped, layout)
    except BaseException:
        remove_sat(model)
        raise
    runtime.awaiting_backward = False
    return outer


def remove_sat(model: nn.Module) -> nn.Module:
    """Put the original attention and MLP modules back and remove every SAT attribute and hook."""
    model = _unwrap(model)
    rt = _runtime(model)
    for layer in decoder_layers(model, rt.layout):
        for name in (rt.layout.attn, rt.layout.mlp):
            wrapped = getattr(layer, name, None)
            if isinstance(wrapped, _SATModule):
                setattr(layer, name, wrapped.base_layer)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for layer in [*decoder_layers(model, rt.layout), *([head] if isinstance(head, nn.Module) else [])]:
        forward = vars(layer).get("forward")
        if forward is not None and hasattr(forward, "sat_original"):
            del layer.forward  # the class's forward again
    model.sat_hook.remove()
    model.sat_end_hook.remove()
    if getattr(model, "sat_label_hook", None) is not None:
        model.sat_label_hook.remove()
    for attr in [a for a in vars(model) if a.startswith("sat_")]:
        delattr(model, attr)
    return model


def _input_device(module: nn.Module, args, kwargs) -> torch.device:
    """The device a forward computes on: its input ids' (or embeddings'), else its first parameter's."""
    for t in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), args[0] if args else None):
        if isinstance(t, torch.Tensor):
            return t.device
    return next(module.parameters()).device


def _checkpointing(model: nn.Module) -> bool:
    """Whether any module of the model recomputes its forward in the backward (transformers' flag)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


@contextlib.contextmanager
def disable_sat(model: nn.Module) -> Iterator[nn.Module]:
    """A dense stretch: inside the block every layer runs its base module."""
    rt = _runtime(model)
    previous, rt.enabled = rt.enabled, False
    try:
        yield model
    finally:
        rt.enabled = previous


def set_sat_step(model: nn.Module, step: int, total_steps: int | None = None) -> tuple[float, float]:
    """Tell the schedule where training is (optimizer step of total_steps); returns (attn_rate, mlp_rate)."""
    rt = _runtime(model)
    rt.set_step(step, total_steps)
    return rt.attn_rate, rt.mlp_rate


def set_sat_lr_profile(model: nn.Module, lrs) -> None:
    """The learning rate of every optimizer step (rung_placement: lr places the ladder's rungs by it). SATCallback
    sets it from the Trainer's LR scheduler; a plain training loop sets it once, before the first step."""
    rt = _runtime(model)
    rt.lr_profile = [float(v) for v in lrs]
    rt.set_step(rt.step, rt.total_steps)


def sat_state(model: nn.Module) -> dict[str, Any]:
    """Schedule position and, per wrapped layer, the rate, kept count and kept indices of the last step.

    Reads device tensors back to the host: call it for logging, not inside the training step.
    """
    rt = _runtime(model)
    per_layer: dict[int, dict[str, Any]] = {}
    for m in _sat_modules(model):
        kept = m.sat_last_kept.tolist() if m.sat_last_kept is not None else None
        entry = {
            "rate": m._rate(),
            "n_units": m.sat_n_units,
            "kept": kept,
            "kept_count": len(kept) if kept is not None else None,
        }
        if m.sat_last_scores is not None:
            entry["scores"] = m.sat_last_scores.float().cpu().tolist()
        per_layer.setdefault(m.sat_layer_idx, {"layer": m.sat_layer_idx})[m.component] = entry
    return {
        "enabled": rt.enabled,
        "step": rt.step,
        "total_steps": rt.total_steps,
        "attn_omission_rate": rt.attn_rate,
        "mlp_omission_rate": rt.mlp_rate,
        "config": rt.config.to_dict(),
        "layers": [per_layer[i] for i in sorted(per_layer)],
    }


def sat_state_dict(model: nn.Module) -> dict[str, Any]:
    """Everything needed to resume SAT exactly: schedule position, selection RNG states, history statistics."""
    rt = _runtime(model)
    modules = {f"{m.sat_layer_idx}.{m.component}": m.sat_selector.state_dict() for m in _sat_modules(model)}
    return {"step": rt.step, "total_steps": rt.total_steps, "forward_id": rt.forward_id,
            "config": rt.config.to_dict(), "modules": modules, "lr_profile": rt.lr_profile,
            "layer_factors": {str(i): f for i, f in rt.layer_factors.items()}, "sensitivity": rt.sensitivity,
            "drop_generator": rt.drop_generator.get_state()}


def load_sat_state_dict(model: nn.Module, state: dict[str, Any]) -> None:
    rt = _runtime(model)
    if state.get("lr_profile") is not None:
        rt.lr_profile = list(state["lr_profile"])
    if state.get("layer_factors"):
        rt.layer_factors = {int(i): float(f) for i, f in state["layer_factors"].items()}
        rt.sensitivity = state.get("sensitivity")
    if state.get("drop_generator") is not None:
        rt.drop_generator.set_state(state["drop_generator"])
    rt.set_step(state["step"], state["total_steps"])
    rt.forward_id = state.get("forward_id", rt.forward_id)
    for m in _sat_modules(model):
        s = state["modules"].get(f"{m.sat_layer_idx}.{m.component}")
        if s is not None:
            m.sat_selector.load_state_dict(s, m.base_layer_device())
