"""omitted_update: skip. A unit that no forward of an optimizer step kept gets a zero gradient; AdamW would still
decay its moments, move its weights with the momentum left from earlier steps and apply weight decay. With
`skip` the unit's weight slices and their optimizer state are saved before the optimizer step and written back
after it, so that the step leaves them as they were (lazy Adam's update; the step counter, shared by every row of
a parameter, still advances).

A unit's slices: an MLP channel c is row c of gate and up (of the fused gate_up at c and f + c; of fc) with their
bias entries, and column c of down. A query head h is its head_dim rows of q (and bias) and columns of o; a K/V
group is its rows of k and v when no kept head uses it (attn_unit=head) or when it is omitted (kv_group).
Refused where those slices are not all a unit's gradient reaches: LoRA (the adapters' factors are shared by the
units), a q/k norm over every head (q and k train dense), and optimizer state that is not one entry per weight.
"""

from __future__ import annotations

import torch

from ..core.ops import head_columns
from .families import UnsupportedModelError


def _unit_slices(module, omitted: torch.Tensor) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
    """(parameter, dim, indices) of the omitted units' slices of one wrapped module (module doc)."""
    from .attention import SATAttention

    if isinstance(module, SATAttention):
        return _head_slices(module, omitted)
    rows, down, _ = module._parts()
    out = []
    for pi, first, _size in rows.parts:
        proj = rows.projs[pi]
        out.append((proj.weight, 0, omitted + first))
        if proj.bias is not None:
            out.append((proj.bias, 0, omitted + first))
    out.append((down.weight, 1, omitted))
    return out


def _head_slices(module, omitted: torch.Tensor):
    rows, op = module._parts()
    hd, rep = module.head_dim, module.rep
    if module.sat_runtime.config.attn_unit == "kv_group":
        heads = (omitted[:, None] * rep + torch.arange(rep, device=omitted.device)).reshape(-1)
        groups = omitted
    else:
        heads = omitted
        kept_heads = torch.ones(module.n_heads, dtype=torch.bool, device=omitted.device).index_fill_(0, omitted, False)
        groups = (~kept_heads.view(module.n_kv, rep).any(dim=1)).nonzero().squeeze(1)  # groups no kept head uses
    out = []
    for (pi, first, _size), units in zip(rows.parts, (heads, groups, groups)):
        proj, idx = rows.projs[pi], head_columns(units, hd) + first
        out.append((proj.weight, 0, idx))
        if proj.bias is not None:
            out.append((proj.bias, 0, idx))
    out.append((op.weight, 1, head_columns(heads, hd)))
    return out


def check_skip_supported(modules) -> None:
    """UnsupportedModelError where `skip` could not leave an omitted unit untouched exactly (module doc)."""
    for m in modules:
        parts = m._parts()
        rows, out = parts[0], parts[1]
        if rows.has_lora or out.loras:
            raise UnsupportedModelError(f"{m.where}: omitted_update='skip' with LoRA: the adapters' factors are "
                                        "shared by every unit, so an omitted unit's update cannot be skipped alone; "
                                        "use omitted_update='zero'")
        if m.component == "attn" and m.sat_runtime.layout.qk_norm == "full":
            raise UnsupportedModelError(f"{m.where}: omitted_update='skip' with a q/k norm over every head: q and k "
                                        "train dense there; use omitted_update='zero'")


class OmittedUpdate:
    """Save the omitted units' slices (weights and optimizer state) before an optimizer step, restore them after."""

    def __init__(self):
        self.saved: list[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]] = []

    @staticmethod
    def begin_step(modules) -> None:
        for m in modules:
            m.sat_selector.begin_step()

    @torch.no_grad()
    def save(self, modules, optimizer) -> None:
        state = getattr(optimizer, "optimizer", optimizer).state  # accelerate wraps the optimizer
        self.saved = []
        for m in modules:
            omitted = m.sat_selector.step_omitted()
            if omitted is None or omitted.numel() == 0:
                continue
            for param, dim, idx in _unit_slices(m, omitted.to(next(m.base_layer.parameters()).device)):
                tensors = [param] + _state_tensors(state.get(param, {}), param, m.where)
                self.saved += [(t, dim, idx, t.index_select(dim, idx)) for t in tensors]

    @torch.no_grad()
    def restore(self) -> None:
        for t, dim, idx, values in self.saved:
            t.index_copy_(dim, idx, values)
        self.saved = []


def _state_tensors(state: dict, param: torch.Tensor, where: str) -> list[torch.Tensor]:
    """The optimizer's per-weight state of param (AdamW: exp_avg, exp_avg_sq); scalars such as step are left."""
    out = []
    for name, value in state.items():
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            continue
        if value.shape != param.shape:
            raise UnsupportedModelError(f"{where}: omitted_update='skip' needs one optimizer state entry per weight, "
                                        f"but the optimizer's {name!r} is {tuple(value.shape)} for a "
                                        f"{tuple(param.shape)} weight (a factored optimizer such as Adafactor); use "
                                        "omitted_update='zero'")
        out.append(value)
    return out
