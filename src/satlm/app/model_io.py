"""Loading the model and tokenizer a run names, with errors that say what is wrong in one line."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import check_layers
from ..errors import ModelLoadError, RunConfigError
from .run_config import EMBEDDED


def resolve_model_path(spec: str) -> str:
    """A local folder or hub name; `embedded` is satlm's tiny pretrained base model; a name `satlm fetch` knows
    (smollm2-135m) is its converted folder in satlm's cache; a local .gguf file is converted once into it."""
    from .fetch import KNOWN_MODELS, gguf_model_path, known_model_path

    if spec in KNOWN_MODELS:
        return known_model_path(spec)
    if spec.endswith(".gguf"):
        return gguf_model_path(spec)
    if spec != EMBEDDED:
        check_model_exists(spec)
        return spec
    try:
        from ..assets import base_model_path
    except ImportError:
        raise ModelLoadError("the embedded base model is not installed (satlm.assets is missing); "
                             "build it with `satlm pretrain-base` or set model=PATH") from None
    path = Path(base_model_path())
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"the embedded base model is missing from {path}; build it with `satlm pretrain-base`")
    return str(path)


def _looks_like_a_path(spec: str) -> bool:
    """A local path, not a hub name: a hub name is `name` or `org/name` (one slash, no leading . / ~)."""
    return (spec.startswith((".", "/", "~")) or "\\" in spec or spec.count("/") > 1 or spec.endswith("/")
            or Path(spec).suffix in (".safetensors", ".bin", ".pt", ".json"))


def _fetch_hint(spec: str) -> str:
    """'; did you mean ...' naming `satlm fetch` when `spec` looks like a model it can fetch."""
    import difflib

    from .fetch import KNOWN_MODELS

    name = Path(spec.rstrip("/")).name.lower()
    for known in KNOWN_MODELS:
        family = known.split("-")[0]  # smollm2
        if family in name or difflib.get_close_matches(name, [known], n=1, cutoff=0.6):
            return f"; did you mean model: {known} (`satlm fetch {known}` downloads it once)?"
    return ""


def check_model_exists(spec: str) -> None:
    """A model path that does not exist is a ModelLoadError naming it (Hugging Face would answer "Repo id
    must be in the form ..." or try the network). A hub name (`org/name`, or a bare `name`) passes, but for a
    bare name that looks like a model `satlm fetch` knows (`smollm2`): that is a typo, not a hub model."""
    path = Path(spec).expanduser()
    if path.exists():
        return
    hint = _fetch_hint(spec)
    if _looks_like_a_path(spec):
        raise ModelLoadError(f"model {spec!r}: no such model folder ({path.absolute()} does not exist){hint}")
    if hint and "/" not in spec:
        raise ModelLoadError(f"model {spec!r}: no such model folder{hint}")


def _one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def load_model_config(path: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except Exception as e:  # OSError, ValueError, HF's own errors: all mean "not a model here"
        raise ModelLoadError(f"cannot load a model config from {path!r}: {_one_line(e)}") from None


def check_supported(path: str) -> None:
    """UnsupportedModelError before anything is trained, from the config alone (no weights loaded): the
    model_type must be a family of satlm's table (modeling.families.check_model_type; the full checks run when SAT
    is applied)."""
    from ..modeling.families import check_model_type

    config = load_model_config(path)
    name = (list(getattr(config, "architectures", None) or []) or [config.model_type])[0]
    check_model_type(config.model_type, name, f" from {path}")


CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def context_length(config) -> tuple[int | None, str]:
    """(the longest sequence the model has positions for, the config key it came from); (None, '') if unknown."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in CONTEXT_KEYS:
        value = getattr(text, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, key
    return None, ""


def check_run_fits_model(cfg, path: str) -> None:
    """From the model's config alone (no weights): seq_len within its context, sat.layers among its layers.

    seq_len above the context is an error, not a clamp: rotary models would train on positions they never
    saw, and models with learned positions would index past their table.
    """
    config = load_model_config(path)
    limit, key = context_length(config)
    if limit is not None and cfg.seq_len > limit:
        raise RunConfigError(f"seq_len={cfg.seq_len} exceeds the model's context of {limit} tokens ({key} in "
                             f"{path}); set seq_len <= {limit}")
    n_layers = getattr(config.get_text_config() if hasattr(config, "get_text_config") else config,
                       "num_hidden_layers", None)
    if cfg.sat.enabled and isinstance(n_layers, int):
        check_layers(cfg.sat.layers, n_layers, where="sat.layers")


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise ModelLoadError(f"cannot load a tokenizer from {path!r}: {_one_line(e)}") from None


def load_model(path: str, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None):
    """A causal LM with weights in `dtype` (fp32 master weights for mixed-precision training)."""
    from transformers import AutoModelForCausalLM

    load_model_config(path)  # a clear error for a path that is not a model at all
    kwargs = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as e:
        raise ModelLoadError(f"cannot load a causal LM from {path!r}: {_one_line(e)}") from None
