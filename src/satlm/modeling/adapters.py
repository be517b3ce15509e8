"""One entry per supported architecture: where the decoder layers are and what their projections are called."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn

from ..errors import SATLMError


class UnsupportedModelError(SATLMError, TypeError):
    """The model's class has no SAT adapter."""


@dataclass(frozen=True)
class SATAdapter:
    layers: str  # dotted path from the model to the ModuleList of decoder layers
    attn: str = "self_attn"
    mlp: str = "mlp"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    # Extra keyword arguments the architecture passes to its attention function.
    attn_kwargs: Callable[[nn.Module], dict] = field(default=lambda attn: {})


def _sliding_window_from_config(attn: nn.Module) -> dict:
    return {"sliding_window": getattr(attn.config, "sliding_window", None)}


def _sliding_window_from_module(attn: nn.Module) -> dict:
    return {"sliding_window": getattr(attn, "sliding_window", None)}


_LLAMA = SATAdapter(layers="model.layers")
_MISTRAL = SATAdapter(layers="model.layers", attn_kwargs=_sliding_window_from_config)
_QWEN2 = SATAdapter(layers="model.layers", attn_kwargs=_sliding_window_from_module)

ADAPTERS: dict[str, SATAdapter] = {
    "LlamaForCausalLM": _LLAMA,
    "LlamaModel": SATAdapter(layers="layers"),
    "MistralForCausalLM": _MISTRAL,
    "MistralModel": SATAdapter(layers="layers", attn_kwargs=_sliding_window_from_config),
    "Qwen2ForCausalLM": _QWEN2,
    "Qwen2Model": SATAdapter(layers="layers", attn_kwargs=_sliding_window_from_module),
}


def adapter_for(model: nn.Module) -> SATAdapter:
    name = type(model).__name__
    if name not in ADAPTERS:
        raise UnsupportedModelError(
            f"satlm does not support {name}; supported model classes: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[name]


def get_path(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def model_module_function(module: nn.Module, name: str, default=None):
    """A function defined beside the module's class (e.g. apply_rotary_pos_emb, eager_attention_forward)."""
    return getattr(sys.modules[type(module).__module__], name, default)
