"""What every wrapped module shares: the original module as `base_layer`, the plain architecture's state-dict
names, the runtime and the unit selector. The first branch of every forward is the dense path (the base layer
itself, untouched); the sparse path runs only in training, while SAT is enabled and the scheduled rate omits at
least one unit."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..schedules import kept_count
from .runtime import SATRuntime
from .selector import UnitSelector

BASE_PREFIX = "base_layer."


def _strip_base_prefix(module, state_dict, prefix, local_metadata):
    # Checkpoints of a patched model keep the plain architecture's names.
    for key in [k for k in state_dict if k.startswith(prefix + BASE_PREFIX)]:
        state_dict[prefix + key[len(prefix) + len(BASE_PREFIX):]] = state_dict.pop(key)


def _add_base_prefix(module, state_dict, prefix, *args):
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + BASE_PREFIX)]:
        state_dict[prefix + BASE_PREFIX + key[len(prefix):]] = state_dict.pop(key)


class _SATModule(nn.Module):
    component = ""  # "attn" or "mlp"

    def __init__(self, base_layer: nn.Module, runtime: SATRuntime, layer_idx: int, n_units: int):
        super().__init__()
        self.base_layer = base_layer
        self.sat_runtime = runtime
        self.sat_layer_idx = layer_idx
        self.sat_n_units = n_units
        salt = 0 if self.component == "attn" else 1
        seed = (runtime.config.seed * 1_000_003 + layer_idx * 2 + salt) % (2**63)
        self.sat_selector = UnitSelector(runtime, n_units, seed)
        self.register_state_dict_post_hook(_strip_base_prefix)
        self.register_load_state_dict_pre_hook(_add_base_prefix)

    def _fqn_modifiers(self) -> dict[str, str]:
        """State-dict names of the base layer's members skip `base_layer.`: torch.distributed.checkpoint
        (FSDP2 state dicts, as accelerate saves them) maps such names back to modules through this hook."""
        base = self.base_layer
        names = [n for n, _ in base.named_children()] + [n for n, _ in base.named_parameters(recurse=False)]
        names += [n for n, _ in base.named_buffers(recurse=False)]
        return {name: "base_layer" for name in names}

    # -- the selector's state, under the names of satlm 0.1 -------------------------------------------------
    @property
    def sat_last_kept(self) -> torch.Tensor | None:
        return self.sat_selector.last_kept

    @property
    def sat_last_scores(self) -> torch.Tensor | None:
        return self.sat_selector.last_scores

    @property
    def sat_history(self) -> torch.Tensor | None:
        return self.sat_selector.history

    @property
    def sat_age(self) -> torch.Tensor | None:
        return self.sat_selector.age

    # -- shared machinery -------------------------------------------------------------------------------
    def base_layer_device(self) -> torch.device:
        return next(self.base_layer.parameters()).device

    def _rate(self) -> float:
        rt = self.sat_runtime
        return rt.attn_rate if self.component == "attn" else rt.mlp_rate

    def _kept_k(self) -> int | None:
        """Number of kept units when this forward runs sparse, else None (dense)."""
        rt = self.sat_runtime
        if not (self.training and rt.enabled):
            return None
        if rt.keep_all:  # the self-check: the sparse path with every unit kept
            return self.sat_n_units
        k = kept_count(self.sat_n_units, self._rate())
        if k >= self.sat_n_units:
            self.sat_selector.forget_last()
            return None
        return k

    def _select(self, k: int, scores: torch.Tensor | None, device) -> torch.Tensor:
        return self.sat_selector.choose(k, scores, device)
