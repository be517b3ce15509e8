"""What every wrapped module shares: the original module as `base_layer` (its children, parameters and buffers
shared, so that every name is the plain architecture's), the runtime and the unit selector. The first branch of
every forward is the dense path (the base layer itself, untouched); the sparse path runs only in training, while
SAT is enabled and the scheduled rate omits at least one unit."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..schedules import kept_count
from .runtime import SATRuntime
from .selector import UnitSelector

MAX_RATE = 0.99  # a layer factor never makes a module omit more than this (at least one unit is kept anyway)


class _SATModule(nn.Module):
    component = ""  # "attn" or "mlp"

    def __init__(self, base_layer: nn.Module, runtime: SATRuntime, layer_idx: int, n_units: int):
        super().__init__()
        # The wrapper shares the base module's children, parameters and buffers (the very same dicts) instead of
        # holding it as a child: parameter and state-dict names stay the plain architecture's (no `base_layer.`),
        # so checkpoints, FSDP2's names and peft's adapter keys are those of the plain model, and a module that
        # peft (or anyone) sets on the wrapper is set on the base module too.
        self.__dict__["base_layer"] = base_layer
        self._modules = base_layer._modules
        self._parameters = base_layer._parameters
        self._buffers = base_layer._buffers
        self._non_persistent_buffers_set = base_layer._non_persistent_buffers_set
        self.training = base_layer.training
        self.sat_runtime = runtime
        self.sat_layer_idx = layer_idx
        self.sat_n_units = n_units
        salt = 0 if self.component == "attn" else 1
        seed = (runtime.config.seed * 1_000_003 + layer_idx * 2 + salt) % (2**63)
        self.sat_selector = UnitSelector(runtime, n_units, seed)
        runtime.modules.append(self)
        self.update_kept_count()

    def train(self, mode: bool = True):
        super().train(mode)
        self.base_layer.training = mode  # not a child: its flag follows the wrapper's
        return self

    # -- the selector's state (sat_state reads it) -----------------------------------------------------------
    @property
    def sat_last_kept(self) -> torch.Tensor | None:
        return self.sat_selector.last_kept

    @property
    def sat_last_scores(self) -> torch.Tensor | None:
        return self.sat_selector.last_scores

    @property
    def sat_history(self) -> torch.Tensor | None:
        return self.sat_selector.history

    # -- shared machinery -------------------------------------------------------------------------------
    def base_layer_device(self) -> torch.device:
        return next(self.base_layer.parameters()).device

    def _rate(self) -> float:
        """The scheduled rate of this module's component, times its layer's factor (layer_rates)."""
        rt = self.sat_runtime
        rate = rt.attn_rate if self.component == "attn" else rt.mlp_rate
        return min(rate * rt.layer_factor(self.sat_layer_idx), MAX_RATE)

    def update_kept_count(self) -> None:
        """The kept count at the runtime's current rate (SATRuntime.set_step calls this when the rates move). An int
        attribute of a module, computed outside the forward: torch.compile specializes on it, so a compiled
        forward recompiles once per distinct count, and never traces the float rate."""
        self.sat_kept = kept_count(self.sat_n_units, self._rate())

    def _kept_k(self) -> int | None:
        """Number of kept units when this forward runs sparse, else None (dense)."""
        rt = self.sat_runtime
        if not (self.training and rt.enabled):
            return None
        if rt.keep_all:  # the self-check: the sparse path with every unit kept
            return self.sat_n_units
        if self.sat_layer_idx in rt.dropped:  # layer_drop_rate: the layer's backward is skipped (patch.py)
            self.sat_selector.forget_last(dropped=True)
            return None
        k = self.sat_kept
        if k >= self.sat_n_units:
            self.sat_selector.forget_last()
            return None
        return k
