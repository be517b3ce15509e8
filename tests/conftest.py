"""Tiny real HF models built from configs (no downloads), shared by the tests."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

# The masked dense reference the tests compare SAT with is benchmarks/reference.py, the one the GPU check runs
# (from a clone with only PYTHONPATH=src, so it cannot live here): `from reference import reference_step`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

# The tokenized-data cache of the tests' runs goes to a folder of this test session, not ~/.cache/satlm
# (torchrun children inherit it).
os.environ.setdefault("SATLM_TOKENIZED_CACHE", tempfile.mkdtemp(prefix="satlm-tokenized-"))

torch.set_num_threads(2)

ARCHS = ("llama", "mistral", "qwen2")


def sat_config(**kw):
    """A SATConfig for the core tests: unless the test says otherwise, heads follow omission_rate, the forward is
    the thinned one and selection samples, so every unit kind and path is exercised (the shipped defaults, a dense
    forward over channels only with top-k, would leave heads and the thinned forward untested)."""
    import satlm

    kw.setdefault("attn_omission_rate", None)
    kw.setdefault("forward", "sparse")
    kw.setdefault("selection", "sample")
    return satlm.SATConfig(**kw)


def tiny_model(arch: str = "llama", *, heads: int = 8, kv_heads: int = 2, hidden: int = 64, inter: int = 96,
               layers: int = 2, vocab: int = 128, attn: str = "eager", seed: int = 0, tie: bool = False, **extra):
    """A tiny decoder LM of the given architecture, fp32, deterministic weights (extra: more config fields)."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    cls = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
           "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    cfg = cls[0](vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                 num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
                 tie_word_embeddings=tie, use_cache=False, **extra)
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    model = cls[1](cfg)
    # Break the symmetry of HF's small-std init so that importance scores are well separated.
    # Biases (zero at HF's init) get values, so that a bias dropped or doubled anywhere shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(torch.empty(p.shape[0], 1).uniform_(0.2, 3.0))
            elif name.endswith(".bias"):
                p.uniform_(-0.1, 0.1)
    return model.train()


def batch(vocab: int = 128, b: int = 3, t: int = 16, pad: bool = True, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    if pad:
        mask[1 % b, :5] = 0  # left padding
        mask[2 % b, -3:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.fixture
def make_model():
    return tiny_model
