"""apply_sat / remove_sat / disable_sat and the model-level state used by the callback and for resume."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn as nn

from ..config import SATConfig, SATConfigError
from .adapters import UnsupportedModelError, adapter_for, get_path
from .layers import SATAttention, SATMLP, SATRuntime, _SATModule


def _unwrap(model: nn.Module) -> nn.Module:
    """The HF model inside DDP/accelerate wrappers (module.module...)."""
    while hasattr(model, "module") and isinstance(getattr(model, "module"), nn.Module) and not hasattr(
        model, "sat_runtime"
    ):
        model = model.module
    return model


def _runtime(model: nn.Module) -> SATRuntime:
    model = _unwrap(model)
    rt = getattr(model, "sat_runtime", None)
    if rt is None:
        raise ValueError(f"{type(model).__name__} has no SAT applied; call satlm.apply_sat(model, config) first")
    return rt


def _sat_modules(model: nn.Module) -> list[_SATModule]:
    return [m for m in _unwrap(model).modules() if isinstance(m, _SATModule)]


def _resolve_layers(config: SATConfig, n_layers: int) -> list[int]:
    if config.layers is None:
        return list(range(n_layers))
    allowed = f"the model has {n_layers} decoder layers: 0..{n_layers - 1}, or -{n_layers}..-1 from the end"
    out: dict[int, int] = {}  # resolved index -> as given
    for i in config.layers:
        if not -n_layers <= i < n_layers:
            raise SATConfigError(f"SATConfig.layers={config.layers!r}: layer {i} does not exist ({allowed})")
        if i % n_layers in out:  # 1 and -1 of a 2-layer model are one layer
            raise SATConfigError(f"SATConfig.layers={config.layers!r}: {out[i % n_layers]} and {i} are the same "
                                 f"layer ({allowed}); list each layer once")
        out[i % n_layers] = i
    return sorted(out)


def _check_linear(module: nn.Module, where: str) -> None:
    if type(module) is not nn.Linear:
        raise UnsupportedModelError(
            f"{where} is a {type(module).__name__}; SAT slices plain torch.nn.Linear weights only "
            "(apply SAT before adapters or quantization wrappers)"
        )


def apply_sat(model: nn.Module, config: SATConfig | dict | None = None) -> nn.Module:
    """Wrap the attention and MLP of each chosen decoder layer in place; return the model.

    The original modules are kept as `base_layer` and swapped through their parent layer, so that
    `remove_sat` puts the very same objects back.
    """
    if config is None:
        config = SATConfig()
    elif isinstance(config, dict):
        config = SATConfig.from_dict(config)
    elif not isinstance(config, SATConfig):
        raise TypeError(f"apply_sat expects a SATConfig or dict, got {type(config).__name__}")
    config.validate()
    if getattr(model, "sat_runtime", None) is not None:
        raise ValueError("SAT is already applied to this model; call satlm.remove_sat(model) first")
    adapter = adapter_for(model)
    layers = get_path(model, adapter.layers)
    chosen = _resolve_layers(config, len(layers))
    for i in chosen:
        attn, mlp = get_path(layers[i], adapter.attn), get_path(layers[i], adapter.mlp)
        for name in (adapter.q, adapter.k, adapter.v, adapter.o):
            _check_linear(get_path(attn, name), f"layers[{i}].{adapter.attn}.{name}")
        for name in (adapter.gate, adapter.up, adapter.down):
            _check_linear(get_path(mlp, name), f"layers[{i}].{adapter.mlp}.{name}")

    runtime = SATRuntime(config, adapter)
    for i in chosen:
        layer = layers[i]
        setattr(layer, adapter.attn, SATAttention(get_path(layer, adapter.attn), runtime, i))
        setattr(layer, adapter.mlp, SATMLP(get_path(layer, adapter.mlp), runtime, i))

    owner_path = adapter.layers.rpartition(".")[0]
    owner = get_path(model, owner_path) if owner_path else model

    def _begin_forward(module, args, kwargs):
        if module.training:
            mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
            runtime.begin_forward(mask)

    model.sat_runtime = runtime
    model.sat_hook = owner.register_forward_pre_hook(_begin_forward, with_kwargs=True)
    model.sat_config = config
    return model


def remove_sat(model: nn.Module) -> nn.Module:
    """Put the original attention and MLP modules back and remove every SAT attribute and hook."""
    model = _unwrap(model)
    rt = _runtime(model)
    layers = get_path(model, rt.adapter.layers)
    for layer in layers:
        for name in (rt.adapter.attn, rt.adapter.mlp):
            wrapped = get_path(layer, name)
            if isinstance(wrapped, _SATModule):
                setattr(layer, name, wrapped.base_layer)
    model.sat_hook.remove()
    for attr in [a for a in vars(model) if a.startswith("sat_")]:
        delattr(model, attr)
    return model


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
    modules = {}
    for m in _sat_modules(model):
        modules[f"{m.sat_layer_idx}.{m.component}"] = {
            "generator": m._generator.get_state() if m._generator is not None else None,
            "generator_device": str(m._generator.device) if m._generator is not None else None,
            "history": m.sat_history.cpu() if m.sat_history is not None else None,
            "age": m.sat_age.cpu() if m.sat_age is not None else None,
        }
    return {"step": rt.step, "total_steps": rt.total_steps, "forward_id": rt.forward_id,
            "config": rt.config.to_dict(), "modules": modules}


def load_sat_state_dict(model: nn.Module, state: dict[str, Any]) -> None:
    rt = _runtime(model)
    rt.set_step(state["step"], state["total_steps"])
    rt.forward_id = state.get("forward_id", rt.forward_id)
    for m in _sat_modules(model):
        s = state["modules"].get(f"{m.sat_layer_idx}.{m.component}")
        if s is None:
            continue
        device = m.base_layer_device()
        if s["generator"] is not None:
            m._generator = torch.Generator(device=device)
            m._generator.set_state(s["generator"])
        if s["history"] is not None:
            m.sat_history = s["history"].to(device)
            m.sat_age = s["age"].to(device)
