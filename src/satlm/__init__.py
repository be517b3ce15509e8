"""satlm: Sparsity-Accelerated Training for Hugging Face decoder LLMs."""

from .config import SATConfig, SATConfigError
from .errors import GradientCheckpointingError
from .modeling.attention import SATAttention
from .modeling.families import ADAPTERS, FAMILIES, UnsupportedModelError
from .modeling.mlp import SATMLP
from .modeling.patch import (
    apply_sat,
    disable_sat,
    load_sat_state_dict,
    remove_sat,
    sat_state,
    sat_state_dict,
    set_sat_lr_profile,
    set_sat_step,
)
from .modeling.sensitivity import measure_layer_rates

__version__ = "0.1.0"

__all__ = [
    "ADAPTERS",
    "FAMILIES",
    "GradientCheckpointingError",
    "SATAttention",
    "SATConfig",
    "SATConfigError",
    "SATMLP",
    "UnsupportedModelError",
    "apply_sat",
    "disable_sat",
    "load_sat_state_dict",
    "measure_layer_rates",
    "remove_sat",
    "sat_state",
    "sat_state_dict",
    "set_sat_lr_profile",
    "set_sat_step",
]


def __getattr__(name):
    # The Trainer callback imports transformers' Trainer machinery: load it only when asked for.
    if name == "SATCallback":
        from .integrations.hf_trainer import SATCallback

        return SATCallback
    raise AttributeError(f"module 'satlm' has no attribute {name!r}")
