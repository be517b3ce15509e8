"""Projections as SAT runs them: a plain Linear, or a peft LoRA layer around one, and blocks of their rows.

`Proj` is one projection: its base weight and bias (sliced by the sparse ops in core/ops.py, which compute no
gradient for a frozen one) and the active LoRA adapters peft put around it, y = x W^T + b + s (drop(x) A^T) B^T.
Restricted to kept *output* features (q/k/v, gate/up) the LoRA term uses rows of B; restricted to kept *input*
features (o/down) it uses columns of A and the kept columns of the dropped-out input (docs/method.md, LoRA).
The LoRA terms are small (rank r) and run with autograd. Dropout masks are drawn for the full input shape in
the order peft draws them (q, k, v; gate, up; o; down), so a run equals the same peft model's forward.

`Rows` is one or more outputs of one input, each a block of rows of a projection: q, k and v are three, or one
fused Linear (Phi-3's qkv_proj) with rows [Q | K | V]; gate and up are two, or one (gate_up_proj) with rows
[gate | up]. Kept features of a part are rows `first + idx` of its projection, so a fused projection is one
weight with row offsets and its kept rows are gathered, and their gradient scattered, once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.ops import row_linears
from .families import UnsupportedModelError, get_path


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without distributed
        return False
    return isinstance(t, DTensor)


def plain_linear(module: nn.Module, where: str) -> nn.Linear:
    """The module, if it is a plain torch.nn.Linear that SAT can slice; else UnsupportedModelError saying what
    it is (a quantized linear, a tensor-parallel or ZeRO-3-partitioned weight, an unsupported adapter)."""
    kind = type(module).__name__
    if type(module) is not nn.Linear:
        what = {"Linear4bit": "a bitsandbytes 4-bit linear (QLoRA)", "Linear8bitLt": "a bitsandbytes 8-bit linear"}
        hint = what.get(kind, f"a {kind}")
        raise UnsupportedModelError(f"{where} is {hint}; SAT slices plain torch.nn.Linear weights (alone or under "
                                    "a peft LoRA layer) only: a quantized base (QLoRA) is not exact in SAT's sliced "
                                    "GEMMs and is refused; load the model in fp32/bf16/fp16")
    w = module.weight
    if hasattr(w, "ds_id") or hasattr(w, "ds_status"):
        raise UnsupportedModelError(f"{where}.weight is partitioned by DeepSpeed ZeRO-3; SAT needs whole weights "
                                    "(use ZeRO-1/2, DDP or FSDP2)")
    if _is_dtensor(w):
        raise UnsupportedModelError(f"{where}.weight is a DTensor (tensor parallelism); SAT needs whole weights "
                                    "when applied (apply SAT first, then FSDP2's fully_shard)")
    if not (w.dtype.is_floating_point and w.dtype.itemsize >= 2):
        raise UnsupportedModelError(f"{where}.weight is {w.dtype}, a quantized weight; SAT trains floating-point "
                                    "weights (fp32, bf16, fp16)")
    return module


@dataclass
class LoRA:
    """One active adapter of a peft LoRA layer: y += scale * (dropout(x) A^T) B^T."""

    A: nn.Linear  # (r, in)
    B: nn.Linear  # (out, r)
    scale: float
    dropout: nn.Module


def _lora_adapters(module: nn.Module, where: str) -> list[LoRA]:
    if getattr(module, "merged", False) or getattr(module, "disable_adapters", False):
        return []  # merged into the base weight, or switched off: the base layer alone runs
    out = []
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        if name in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(name, False):
            raise UnsupportedModelError(f"{where}: adapter {name!r} is a LoRA variant (DoRA, ...); SAT runs plain "
                                        "LoRA only (use_dora=False)")
        A, B = module.lora_A[name], module.lora_B[name]
        if type(A) is not nn.Linear or type(B) is not nn.Linear or A.bias is not None:
            raise UnsupportedModelError(f"{where}: adapter {name!r} has {type(A).__name__}/{type(B).__name__} "
                                        "factors; SAT runs Linear LoRA factors without an A bias only")
        dropout = module.lora_dropout[name]
        if not isinstance(dropout, (nn.Dropout, nn.Identity)):
            raise UnsupportedModelError(f"{where}: adapter {name!r} has a {type(dropout).__name__} as dropout")
        out.append(LoRA(A, B, float(module.scaling[name]), dropout))
    return out


class Proj:
    """A projection: a plain Linear, or a peft LoRA layer (its base_layer and active adapters)."""

    def __init__(self, module: nn.Module, where: str):
        self.where = where
        if hasattr(module, "lora_A") and hasattr(module, "base_layer"):  # peft's lora.Linear
            if getattr(module, "fan_in_fan_out", False):
                raise UnsupportedModelError(f"{where}: a LoRA layer with fan_in_fan_out (Conv1D weights)")
            self.linear = plain_linear(module.base_layer, f"{where}.base_layer")
            self.loras = _lora_adapters(module, where)
        else:
            self.linear = plain_linear(module, where)
            self.loras = []

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear.bias

    # -- dropout masks, drawn as peft draws them ------------------------------------------------------------
    def masks(self, shape, like: torch.Tensor, training: bool) -> list[torch.Tensor | None]:
        """One scaled dropout mask of `shape` per adapter (None without dropout), in peft's order."""
        out = []
        for lora in self.loras:
            p = lora.dropout.p if isinstance(lora.dropout, nn.Dropout) else 0.0
            if p > 0 and training:
                out.append(F.dropout(torch.ones(shape, dtype=like.dtype, device=like.device), p, True))
            else:
                out.append(None)
        return out

    # -- the LoRA terms ---------------------------------------------------------------------------------
    def prepare(self, x: torch.Tensor, masks) -> None:
        """t = dropout(x) A^T of each adapter (..., r), with autograd, once per forward: the pass over every
        feature (scoring) and the kept rows both use it."""
        self._t = [F.linear(x if m is None else x * m, lora.A.weight) for lora, m in zip(self.loras, masks)]

    def _ts(self, x, masks):
        if getattr(self, "_t", None) is None:
            self.prepare(x, masks)
        return self._t

    def lora_all(self, x: torch.Tensor, masks) -> torch.Tensor | None:
        """Every output feature's LoRA term (..., out), or None without adapters."""
        y = None
        for lora, t in zip(self.loras, self._ts(x, masks)):
            t = F.linear(t, lora.B.weight, lora.B.bias) * lora.scale
            y = t if y is None else y + t
        return y

    def lora_rows(self, x: torch.Tensor, masks, rows: torch.Tensor) -> torch.Tensor | None:
        """The LoRA term of the kept output features `rows` (..., k): rows of B."""
        y = None
        for lora, t in zip(self.loras, self._ts(x, masks)):
            b = lora.B.bias.index_select(0, rows) if lora.B.bias is not None else None
            t = F.linear(t, lora.B.weight.index_select(0, rows), b) * lora.scale
            y = t if y is None else y + t
        return y

    def lora_cols(self, h: torch.Tensor, masks, cols: torch.Tensor) -> torch.Tensor | None:
        """The LoRA term when only the input features `cols` are present (h: (..., k)): columns of A, and the
        kept columns of the full-width dropout mask."""
        y = None
        for lora, m in zip(self.loras, masks):
            hk = h if m is None else h * m.index_select(-1, cols)
            t = F.linear(F.linear(hk, lora.A.weight.index_select(1, cols)), lora.B.weight, lora.B.bias) * lora.scale
            y = t if y is None else y + t
        return y

    def full(self, x: torch.Tensor, masks) -> torch.Tensor:
        """The projection over every feature (the base layer and its adapters), as the input's t were prepared."""
        y = self.linear(x)
        if not self.loras:
            return y
        return y + self.lora_all(x, masks)

    def lora_once(self, x: torch.Tensor, masks) -> torch.Tensor | None:
        """The LoRA term over every feature of an input used once (an o/down input over every feature)."""
        saved, self._t = getattr(self, "_t", None), None
        try:
            return self.lora_all(x, masks)
        finally:
            self._t = saved

    def full_once(self, x: torch.Tensor, masks) -> torch.Tensor:
        y = self.linear(x)
        return y if not self.loras else y + self.lora_once(x, masks)


def parts_key(module: nn.Module, names: list[str]) -> tuple:
    """What a module's built projections (Proj, Rows) depend on: which module object each name holds and, for a
    peft LoRA layer, its adapters' state (active, merged, switched off). A wrapped module builds its parts when
    this changes (at the first sparse forward, after a LoRA injection, inside peft's disable_adapter()), not at
    every forward."""
    key = []
    for name in names:
        m = get_path(module, name)
        if hasattr(m, "lora_A"):
            key.append((id(m), id(getattr(m, "base_layer", None)), bool(getattr(m, "merged", False)),
                        bool(getattr(m, "disable_adapters", False)), tuple(m.active_adapters), tuple(m.lora_A.keys()),
                        tuple(sorted(getattr(m, "scaling", {}).items()))))
        else:
            key.append((id(m),))
    return tuple(key)


def with_value(y: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
    """y whose value already includes `extra`, with extra's gradient added (straight-through value)."""
    return y if extra is None else y + (extra - extra.detach())


class Rows:
    """parts[j] = (index into projs, first row, rows): output j of the projection is those rows."""

    def __init__(self, projs: list[Proj], parts: list[tuple[int, int, int]]):
        self.projs, self.parts = projs, parts

    @classmethod
    def of(cls, module: nn.Module, names: list[str | None], fused: str | None, sizes: list[int], where: str) -> "Rows":
        """Separate projections `names` (sizes rows each), or one fused projection whose rows are the parts."""
        if fused is not None:
            proj = Proj(get_path(module, fused), f"{where}.{fused}")
            starts = [sum(sizes[:j]) for j in range(len(sizes))]
            return cls([proj], [(0, s, n) for s, n in zip(starts, sizes)])
        return cls([Proj(get_path(module, n), f"{where}.{n}") for n in names], [(j, 0, n) for j, n in enumerate(sizes)])

    @property
    def has_lora(self) -> bool:
        return any(p.loras for p in self.projs)

    def prepare(self, x: torch.Tensor, masks) -> None:
        """Each LoRA adapter's dropout(x) A^T, with autograd, once (see Proj.prepare)."""
        for p, m in zip(self.projs, masks):
            if p.loras:
                p.prepare(x, m)

    def masks(self, x: torch.Tensor, training: bool) -> list[list]:
        """Each projection's LoRA dropout masks for input x, drawn in projection order."""
        return [p.masks(x.shape, x, training) for p in self.projs]

    def full(self, x: torch.Tensor, masks=None) -> list[torch.Tensor]:
        """Every part over all of its features, LoRA included (for scoring, without autograd): [(..., size_j)]."""
        masks = masks or [[None] * len(p.loras) for p in self.projs]
        outs = [p.full(x, m) for p, m in zip(self.projs, masks)]
        if len(self.projs) == 1 and len(self.parts) > 1:
            return list(outs[0].split([p[2] for p in self.parts], dim=-1))
        return [outs[p[0]] for p in self.parts]

    def full_t(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every part computed features-first, (size_j, N) row blocks: kept features are then row copies. (Plain
        projections only: the fused SiLU MLP does not run LoRA.)"""
        x2 = x.reshape(-1, x.shape[-1]).t()

        def mm(lin):
            return torch.mm(lin.weight, x2) if lin.bias is None else torch.addmm(lin.bias[:, None], lin.weight, x2)

        if len(self.projs) == 1 and len(self.parts) > 1:
            return list(mm(self.projs[0].linear).split([p[2] for p in self.parts], dim=0))
        return [mm(self.projs[p[0]].linear) for p in self.parts]

    def spec(self, idxs: list[torch.Tensor]) -> tuple[list, list, list, list[int]]:
        """(weights, row indices, biases, output widths in order) for `row_linears` / `swiglu_mlp`: the kept
        features idxs[j] of each part, rows of a fused projection gathered in one index."""
        by_proj: dict[int, list[torch.Tensor]] = {}
        for (pi, first, _), idx in zip(self.parts, idxs):
            by_proj.setdefault(pi, []).append(idx + first if first else idx)
        order = sorted(by_proj)
        weights = [self.projs[i].weight for i in order]
        biases = [self.projs[i].bias for i in order]
        rows = [torch.cat(by_proj[i]) if len(by_proj[i]) > 1 else by_proj[i][0] for i in order]
        return weights, rows, biases, [int(i.shape[0]) for i in idxs]

    def kept(self, x: torch.Tensor, idxs: list[torch.Tensor], outs: list[torch.Tensor] | None = None, masks=None):
        """Each part restricted to its kept features, with a kept-rows-only backward; outs: the same already
        computed (paper mode; LoRA included), else computed here. [(..., k_j)]"""
        weights, rows, biases, widths = self.spec(idxs)
        if outs is not None and len(weights) != len(idxs):  # fused: one output per projection
            outs = [torch.cat(outs, dim=-1)]
        res = list(row_linears(x, weights, rows, biases, outs))
        if self.has_lora:
            masks = masks or [[None] * len(p.loras) for p in self.projs]
            order = sorted({p[0] for p in self.parts})
            for j, pi in enumerate(order):
                lo = self.projs[pi].lora_rows(x, masks[pi], rows[j])
                res[j] = with_value(res[j], lo) if outs is not None else (res[j] if lo is None else res[j] + lo)
        if len(res) == len(idxs):
            return res
        return list(res[0].split(widths, dim=-1))


def col_project(h: torch.Tensor, proj: Proj, cols: torch.Tensor, block_idx: torch.Tensor, block: int,
                masks, out: torch.Tensor | None = None) -> torch.Tensor:
    """proj over the kept input features of h (..., k): the base weight's columns (blocks `block_idx` of `block`
    columns; cols: the same as column indices) and its LoRA over those columns; out: the value over every input
    feature already computed (forward=dense), else the kept features' output is the value."""
    from ..core.ops import col_linear

    y = col_linear(h, proj.weight, block_idx, proj.bias, block, out=out)
    lo = proj.lora_cols(h, masks, cols) if proj.loras else None
    if lo is None:
        return y
    return with_value(y, lo) if out is not None else y + lo
