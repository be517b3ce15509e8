"""The one table of supported model families, keyed by `config.model_type`.

A `Layout` says where a family's decoder layers are, what its attention and MLP projections are called (a
fused projection is one weight with row offsets), which activation and q/k norm it has, and the few
per-family differences as small hooks: whether a layer applies RoPE, which extra arguments its attention
function takes (sliding window, soft-capping), a dropout after the output projection. `*ForCausalLM` and the
bare `*Model` of a family are one entry: the layers are reached through `base_model`.

Every entry is checked when SAT is applied (modeling/selfcheck.py): with every unit kept, SAT's path must
reproduce each wrapped module's output and gradients, or the model is refused. Families that are not in the
table are refused (`UnsupportedModelError`), naming what is missing.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn

from ..errors import SATLMError


class UnsupportedModelError(SATLMError, TypeError):
    """A model (or one of its modules or parameters) that SAT cannot train exactly; the message says what."""


def _none(module: nn.Module) -> dict:
    return {}


def _always(module: nn.Module) -> bool:
    return True


def _window_of_config(attn: nn.Module) -> dict:  # one window for every layer (Mistral, Phi-3, Starcoder2)
    return {"sliding_window": getattr(attn.config, "sliding_window", None)}


def _window_of_module(attn: nn.Module) -> dict:  # per layer: None on full-attention layers
    return {"sliding_window": getattr(attn, "sliding_window", None)}


def _gemma2_kwargs(attn: nn.Module) -> dict:
    return {"sliding_window": getattr(attn, "sliding_window", None),
            "softcap": getattr(attn, "attn_logit_softcapping", None)}


@dataclass(frozen=True)
class Layout:
    """Where a family keeps its units, and how its layers differ from Llama's."""

    family: str
    """The README's name for the family."""
    classes: tuple[str, ...]
    """Its *ForCausalLM and bare *Model class names."""
    layers: str = "layers"
    """The ModuleList of decoder layers, from model.base_model."""
    attn: str = "self_attn"
    mlp: str = "mlp"
    q: str | None = "q_proj"
    k: str | None = "k_proj"
    v: str | None = "v_proj"
    qkv: str | None = None
    """A fused projection whose rows are [Q (heads x hd) | K (kv x hd) | V (kv x hd)] (Phi-3); q/k/v are then None."""
    o: str = "o_proj"
    gate: str | None = "gate_proj"
    up: str | None = "up_proj"
    gate_up: str | None = None
    """A fused projection whose rows are [gate (f) | up (f)] (Phi-3, GLM-4); gate/up are then None."""
    fc: str | None = None
    """A non-gated MLP's input projection (Starcoder2's c_fc): h = act(fc(x)); gate/up are then None."""
    down: str = "down_proj"
    act: str = "act_fn"
    qk_norm: str = "none"
    """none; head: a norm over each head's features (head_dim), which slices with the heads exactly (Qwen3,
    Gemma3); full: a norm over the whole q and k projections, which couples the heads (OLMo-2/3): q and k are
    then projected and normed at full width (their backward is dense), and v, o and the attention core run
    over kept heads."""
    q_norm: str = "q_norm"
    k_norm: str = "k_norm"
    uses_rope: Callable[[nn.Module], bool] = _always
    """Whether this attention layer applies RoPE (SmolLM3 and Cohere2 have layers without it)."""
    attn_kwargs: Callable[[nn.Module], dict] = _none
    """Extra keyword arguments the family passes to its attention function."""
    o_dropout: str | None = None
    """Attribute holding the dropout probability the attention applies after o (Starcoder2)."""
    mlp_dropout: str | None = None
    """Attribute holding the dropout probability the MLP applies after down (Starcoder2)."""
    moe: bool = False
    """MoE family: attention heads of every layer; only layers whose MLP is dense are sparsified, experts and
    routers are left as they are."""
    notes: str = ""
    """Restrictions, for the README and error messages."""
    attn_children: frozenset[str] = field(default_factory=frozenset)
    """Child modules of the attention, besides projections and norms, that SAT may leave alone (none so far)."""

    # -- derived -----------------------------------------------------------------------------------------
    @property
    def gated(self) -> bool:
        return self.fc is None

    def attn_projections(self) -> tuple[str, ...]:
        return tuple(n for n in (self.q, self.k, self.v, self.qkv, self.o) if n)

    def mlp_projections(self) -> tuple[str, ...]:
        return tuple(n for n in (self.gate, self.up, self.gate_up, self.fc, self.down) if n)

    def known_attn_children(self) -> set[str]:
        names = set(self.attn_projections()) | set(self.attn_children)
        if self.qk_norm != "none":
            names |= {self.q_norm, self.k_norm}
        return names

    def known_mlp_children(self) -> set[str]:
        return set(self.mlp_projections()) | {self.act}


_SW_MODULE = {"attn_kwargs": _window_of_module}

FAMILIES: dict[str, Layout] = {
    "llama": Layout("Llama", ("LlamaForCausalLM", "LlamaModel")),
    "mistral": Layout("Mistral", ("MistralForCausalLM", "MistralModel"), attn_kwargs=_window_of_config),
    "ministral": Layout("Ministral", ("MinistralForCausalLM", "MinistralModel"), **_SW_MODULE),
    "qwen2": Layout("Qwen2", ("Qwen2ForCausalLM", "Qwen2Model"), **_SW_MODULE),
    "qwen3": Layout("Qwen3", ("Qwen3ForCausalLM", "Qwen3Model"), qk_norm="head", **_SW_MODULE),
    "gemma": Layout("Gemma", ("GemmaForCausalLM", "GemmaModel")),
    "gemma2": Layout("Gemma2", ("Gemma2ForCausalLM", "Gemma2Model"), attn_kwargs=_gemma2_kwargs,
                     notes="attention logit soft-capping: eager attention (the kept heads are attended again)"),
    "gemma3_text": Layout("Gemma3 (text)", ("Gemma3ForCausalLM", "Gemma3TextModel"), qk_norm="head", **_SW_MODULE),
    "phi3": Layout("Phi-3", ("Phi3ForCausalLM", "Phi3Model"), q=None, k=None, v=None, qkv="qkv_proj", gate=None,
                   up=None, gate_up="gate_up_proj", act="activation_fn", attn_kwargs=_window_of_config),
    "olmo2": Layout("OLMo-2", ("Olmo2ForCausalLM", "Olmo2Model"), qk_norm="full",
                    notes="q/k norm spans every head: q and k projections train dense"),
    "olmo3": Layout("OLMo-3", ("Olmo3ForCausalLM", "Olmo3Model"), qk_norm="full", **_SW_MODULE,
                    notes="q/k norm spans every head: q and k projections train dense"),
    "smollm3": Layout("SmolLM3", ("SmolLM3ForCausalLM", "SmolLM3Model"), **_SW_MODULE,
                      uses_rope=lambda attn: bool(getattr(attn, "use_rope", True))),
    "granite": Layout("Granite", ("GraniteForCausalLM", "GraniteModel")),
    "glm4": Layout("GLM-4", ("Glm4ForCausalLM", "Glm4Model"), gate=None, up=None, gate_up="gate_up_proj",
                   act="activation_fn"),
    "starcoder2": Layout("Starcoder2", ("Starcoder2ForCausalLM", "Starcoder2Model"), gate=None, up=None, fc="c_fc",
                         down="c_proj", act="act", attn_kwargs=_window_of_config, o_dropout="residual_dropout",
                         mlp_dropout="residual_dropout"),
    "cohere2": Layout("Cohere2", ("Cohere2ForCausalLM", "Cohere2Model"), **_SW_MODULE,
                      uses_rope=lambda attn: getattr(attn, "sliding_window", None) is not None),
    "mixtral": Layout("Mixtral (MoE)", ("MixtralForCausalLM", "MixtralModel"), attn_kwargs=_window_of_config,
                      moe=True, notes="attention heads only: every MLP is a mixture of experts, left dense"),
    "qwen3_moe": Layout("Qwen3-MoE", ("Qwen3MoeForCausalLM", "Qwen3MoeModel"), qk_norm="head", moe=True,
                        **_SW_MODULE, notes="attention heads, and MLP channels of its dense (non-expert) layers"),
}

# Each supported model class name -> its family's Layout (satlm.ADAPTERS).
ADAPTERS: dict[str, Layout] = {cls: layout for layout in FAMILIES.values() for cls in layout.classes}

# Families that are decoders but that SAT refuses, with the reason.
REFUSED: dict[str, str] = {
    "ministral3": "its attention scales q by a position-dependent factor after RoPE (llama-4 scaling), which satlm's "
                  "layout does not reproduce",
    "olmoe": "its attention clamps q, k and v in place after the q/k norms (clip_qkv), which satlm's layout does not "
             "reproduce, and every MLP is a mixture of experts",
    "qwen3_next": "its q projection interleaves an output gate per head and most layers are linear attention",
    "lfm2": "a hybrid of convolution and attention layers that satlm's layout does not describe",
}


def supported_classes() -> list[str]:
    return sorted(c for layout in FAMILIES.values() for c in layout.classes)


def model_type_of(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def check_model_type(model_type: str | None, name: str, where: str = "") -> Layout:
    """The one support check: the Layout of the family `model_type`, or UnsupportedModelError naming the model
    (`name`, its class; `where`, e.g. ' from PATH') and why. From a config alone (satlm train checks a model folder
    before it loads the weights) or from a model (layout_for)."""
    if model_type in REFUSED:
        raise UnsupportedModelError(f"satlm does not support {name} (model_type {model_type!r}){where}: "
                                    f"{REFUSED[model_type]}")
    if model_type not in FAMILIES:
        raise UnsupportedModelError(f"satlm does not support {name} (model_type {model_type!r} has no satlm layout)"
                                    f"{where}; supported model classes: {', '.join(supported_classes())}")
    return FAMILIES[model_type]


def layout_for(model: nn.Module) -> Layout:
    """The family's Layout, or UnsupportedModelError naming the class and what is missing (check_model_type; the
    model's class must also be one of the family's)."""
    name = type(model).__name__
    layout = check_model_type(model_type_of(model), name)
    if name not in layout.classes:
        raise UnsupportedModelError(f"satlm does not support {name} ({name} is not one of "
                                    f"{', '.join(layout.classes)}); supported model classes: "
                                    f"{', '.join(supported_classes())}")
    return layout


def get_path(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def decoder_layers(model: nn.Module, layout: Layout) -> nn.ModuleList:
    base = getattr(model, "base_model", model)
    return get_path(base, layout.layers)


def model_module_function(module: nn.Module, name: str, default=None):
    """A function defined beside the module's class (apply_rotary_pos_emb, eager_attention_forward)."""
    return getattr(sys.modules[type(module).__module__], name, default)
