"""Tiny random models of every family in satlm's table, built from configs (no download), and a masked dense
reference that finds each layer's attention output projection and MLP down projection by name, independently
of satlm's layouts."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# model_type -> extra config fields of its tiny model (biases on where the family has the flag)
FAMILY_CONFIGS: dict[str, dict] = {
    "llama": {"attention_bias": True, "mlp_bias": True},
    "mistral": {"sliding_window": 6},
    "ministral": {"sliding_window": 6, "layer_types": ["sliding_attention", "full_attention"]},
    "qwen2": {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1},
    "qwen3": {"attention_bias": True},
    "gemma": {"attention_bias": True},
    "gemma2": {"attn_logit_softcapping": 1.0, "sliding_window": 6, "query_pre_attn_scalar": 8},
    "gemma3_text": {"sliding_window": 6, "layer_types": ["sliding_attention", "full_attention"],
                    "query_pre_attn_scalar": 8},
    "phi3": {"partial_rotary_factor": 0.5},
    "olmo2": {"attention_bias": True},
    "olmo3": {"sliding_window": 6, "layer_types": ["sliding_attention", "full_attention"]},
    "smollm3": {"no_rope_layer_interval": 2, "attention_bias": True, "mlp_bias": True},
    "granite": {"attention_multiplier": 0.05, "residual_multiplier": 0.5, "embedding_multiplier": 2.0,
                "logits_scaling": 2.0, "attention_bias": True},
    "glm4": {"attention_bias": True},
    "starcoder2": {"use_bias": True},
    "cohere2": {"sliding_window": 6, "layer_types": ["sliding_attention", "full_attention"]},
    "mixtral": {"num_local_experts": 2, "num_experts_per_tok": 2},
    "qwen3_moe": {"num_experts": 2, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "mlp_only_layers": [1],
                  "decoder_sparse_step": 1},
}
DOWN_NAME = {"starcoder2": "c_proj"}  # the MLP's output projection, where it is not down_proj
EAGER_ONLY = {"gemma2"}  # soft-capping: SDPA refuses it
# Families tested in fp32: their kernels take no float64 (grouped-mm experts) or their eager mask overflows in it
# (Gemma2's plain model gives NaN in float64); and the tolerance of each dtype.
FP32_FAMILIES = {"gemma2", "mixtral", "qwen3_moe"}
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5}
# Gemma3's RMSNorm computes in fp32 whatever the model's dtype: its q/k norm weights' gradients round at ~1e-7.
FAMILY_TOLERANCE = {"gemma3_text": 1e-6}


def family_dtype(model_type: str) -> torch.dtype:
    return torch.float32 if model_type in FP32_FAMILIES else torch.float64


def family_model(model_type: str, heads: int = 4, kv_heads: int = 2, attn: str = "sdpa", layers: int = 2,
                 seed: int = 0, bare: bool = False, dtype: torch.dtype | None = None, **extra):
    """float64 by default: the reference then matches to rounding of 1e-12, so that a real difference of any
    size shows (in fp32, the backward of OLMo-2's full-width q/k norm alone loses ~5e-5 relative)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    dtype = dtype or family_dtype(model_type)
    fields = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=64 // heads,
                  max_position_embeddings=128, use_cache=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  tie_word_embeddings=False)
    fields.update(FAMILY_CONFIGS[model_type])
    fields.update(extra)
    cfg = AutoConfig.for_model(model_type, **fields)
    cfg._attn_implementation = "eager" if model_type in EAGER_ONLY else attn
    torch.manual_seed(seed)
    model = (AutoModel if bare else AutoModelForCausalLM).from_config(cfg, dtype=dtype)
    # Break the symmetry of the small-std init so that importance scores are well separated; biases and norm
    # weights get values, so that one dropped or applied twice shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(torch.empty(p.shape[0], 1).uniform_(0.2, 3.0))
            elif name.endswith(".bias"):
                p.uniform_(-0.1, 0.1)
            elif p.dim() == 1:
                p.add_(torch.empty_like(p).uniform_(-0.2, 0.2))
    return model.train()


def layers_of(model):
    return getattr(model, "base_model", model).layers


def keep(n: int, rate: float) -> int:
    return max(1, math.floor((1 - rate) * n + 0.5))


def _has_dense_mlp(layer, down: str) -> bool:
    return isinstance(getattr(getattr(layer, "mlp", None), down, None), nn.Linear)


def masked_step(model, data, model_type: str, unit: str, choose, dense_forward: bool = False):
    """Loss and grads of the plain model with the omitted units cut at the input of the attention's o_proj and
    the MLP's down projection: zeroed (sparse forward), or detached and multiplied by a detached weight (dense
    forward: exact forward, no gradient through omitted units). choose(layer, comp, activation) -> kept units."""
    down = DOWN_NAME.get(model_type, "down_proj")
    hooks = []

    def cut(linear, a, m):
        if not dense_forward:
            return F.linear(a * m, linear.weight, linear.bias)
        return F.linear(a * m, linear.weight, linear.bias) + F.linear((a * (1 - m)).detach(), linear.weight.detach())

    for i, layer in enumerate(layers_of(model)):
        cfg = layer.self_attn.config
        n_h, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads

        def attn_hook(mod, args, output, i=i, n_h=n_h, n_kv=n_kv):
            (o,) = args  # (B, T, H*hd)
            oh = o.view(*o.shape[:2], n_h, -1)
            units = choose(i, "attn", oh)
            rep = n_h // n_kv
            heads = [g * rep + j for g in units for j in range(rep)] if unit == "kv_group" else units
            m = torch.zeros(n_h, oh.shape[-1], dtype=o.dtype, device=o.device)
            m[heads] = 1
            return cut(mod, o, m.reshape(-1))

        hooks.append(layer.self_attn.o_proj.register_forward_hook(attn_hook))
        if _has_dense_mlp(layer, down):
            def mlp_hook(mod, args, output, i=i):
                (h,) = args  # (B, T, f)
                m = torch.zeros(h.shape[-1], dtype=h.dtype, device=h.device)
                m[choose(i, "mlp", h)] = 1
                return cut(mod, h, m)

            hooks.append(getattr(layer.mlp, down).register_forward_hook(mlp_hook))
    try:
        out = model(**data)
        loss = out.loss if hasattr(out, "loss") and out.loss is not None else out.last_hidden_state.square().mean()
        loss.backward()
    finally:
        for h in hooks:
            h.remove()
    grads = {n: p.grad.clone() if p.grad is not None else None for n, p in model.named_parameters()}
    return loss.detach(), grads


def topk_chooser(data, rate: float, unit: str, n_kv: int, kept: dict):
    """choose() of the reference: top-k by L2 over the batch's non-padding tokens; records what it kept."""
    token_mask = data["attention_mask"].to(torch.float64)

    def choose(i, comp, a):
        if comp == "mlp":  # (B, T, f)
            score = ((a.detach().double() ** 2) * token_mask[..., None]).sum((0, 1)).sqrt()
        else:  # (B, T, H, hd)
            score = ((a.detach().double() ** 2) * token_mask[..., None, None]).sum((0, 1, 3)).sqrt()
            if unit == "kv_group":
                score = score.view(n_kv, -1).sum(1)
        units = sorted(score.topk(keep(score.shape[0], rate)).indices.tolist())
        kept[(i, comp)] = units
        return units

    return choose


def fixed_chooser(kept: dict):
    return lambda i, comp, a: kept[(i, comp)]
