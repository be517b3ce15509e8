"""Package data: the embedded base model (`base/`), made by `satlm pretrain-base` (satlm.app.pretrain_base)."""

from pathlib import Path


def base_model_path() -> Path:
    """Directory of the shipped base model and tokenizer; load it with `from_pretrained(base_model_path())`."""
    return Path(__file__).parent / "base"
