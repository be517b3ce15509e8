"""Tiny random models of every family in satlm's table, built from configs (no download), and the tolerance each
is tested to against the masked dense reference (benchmarks/reference.py)."""

from __future__ import annotations

import torch

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
