"""Row projections as SAT sees them: one or more outputs of one input, each a block of rows of a Linear.

q, k and v are three Linears, or one fused Linear (Phi-3's qkv_proj) with rows [Q | K | V]; gate and up are two,
or one (gate_up_proj) with rows [gate | up]. A `Rows` hides which: its parts are (linear, first row, size), and
kept features of a part are rows `first + idx` of its Linear, so a fused projection is one weight with row offsets
and its kept rows are gathered, and their gradient scattered, once.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.ops import row_linears
from .families import UnsupportedModelError, get_path


def plain_linear(module: nn.Module, where: str) -> nn.Linear:
    """The module, if it is a plain torch.nn.Linear that SAT can slice; else UnsupportedModelError saying what
    it is (LoRA, a quantized linear, a tensor-parallel or ZeRO-3-partitioned weight)."""
    kind = type(module).__name__
    if type(module) is not nn.Linear:
        what = {"Linear4bit": "a bitsandbytes 4-bit linear (QLoRA)", "Linear8bitLt": "a bitsandbytes 8-bit linear"}
        hint = what.get(kind, f"a {kind}")
        if hasattr(module, "lora_A"):
            hint = f"a peft LoRA layer ({kind})"
        raise UnsupportedModelError(f"{where} is {hint}; SAT slices plain torch.nn.Linear weights only (apply SAT "
                                    "before LoRA or quantization, and use neither: SAT does not run them yet)")
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


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without distributed
        return False
    return isinstance(t, DTensor)


class Rows:
    """parts[j] = (index into linears, first row, rows): output j of the projection is those rows."""

    def __init__(self, linears: list[nn.Linear], parts: list[tuple[int, int, int]], names: list[str] | None = None):
        self.linears, self.parts = linears, parts
        self.names = names or [f"[{i}]" for i in range(len(linears))]

    @classmethod
    def of(cls, module: nn.Module, names: list[str | None], fused: str | None, sizes: list[int]) -> "Rows":
        """Separate Linears `names` (sizes rows each), or one fused Linear whose rows are the parts in order."""
        if fused is not None:
            lin = get_path(module, fused)
            starts = [sum(sizes[:j]) for j in range(len(sizes))]
            return cls([lin], [(0, s, n) for s, n in zip(starts, sizes)], [fused])
        return cls([get_path(module, n) for n in names], [(j, 0, n) for j, n in enumerate(sizes)], list(names))

    def check(self, where: str) -> None:
        for lin, name in zip(self.linears, self.names):
            plain_linear(lin, f"{where}.{name}")

    def full(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every part over all of its features (for scoring, without autograd): [(..., size_j)]."""
        if len(self.linears) == 1 and len(self.parts) > 1:
            out = self.linears[0](x)
            return list(out.split([p[2] for p in self.parts], dim=-1))
        return [self.linears[p[0]](x) for p in self.parts]

    def full_t(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every part computed features-first, (size_j, N) row blocks: kept features are then row copies."""
        x2 = x.reshape(-1, x.shape[-1]).t()
        if len(self.linears) == 1 and len(self.parts) > 1:
            lin = self.linears[0]
            out = torch.mm(lin.weight, x2) if lin.bias is None else torch.addmm(lin.bias[:, None], lin.weight, x2)
            return list(out.split([p[2] for p in self.parts], dim=0))
        outs = []
        for p in self.parts:
            lin = self.linears[p[0]]
            outs.append(torch.mm(lin.weight, x2) if lin.bias is None else torch.addmm(lin.bias[:, None], lin.weight, x2))
        return outs

    def spec(self, idxs: list[torch.Tensor]) -> tuple[list, list, list, list[int]]:
        """(weights, row indices, biases, output widths in order) for `row_linears` / `swiglu_mlp`: the kept
        features idxs[j] of each part, rows of a fused Linear gathered in one index."""
        by_linear: dict[int, list[torch.Tensor]] = {}
        for (li, first, _), idx in zip(self.parts, idxs):
            by_linear.setdefault(li, []).append(idx + first if first else idx)
        order = sorted(by_linear)
        weights = [self.linears[i].weight for i in order]
        biases = [self.linears[i].bias for i in order]
        rows = [torch.cat(by_linear[i]) if len(by_linear[i]) > 1 else by_linear[i][0] for i in order]
        return weights, rows, biases, [int(i.shape[0]) for i in idxs]

    def kept(self, x: torch.Tensor, idxs: list[torch.Tensor], outs: list[torch.Tensor] | None = None):
        """Each part restricted to its kept features, with a kept-rows-only backward; outs: the same already
        computed (paper mode), else computed here. [(..., k_j)]"""
        weights, rows, biases, widths = self.spec(idxs)
        if outs is not None and len(weights) != len(idxs):  # fused: one output per Linear
            outs = [torch.cat(outs, dim=-1)]
        res = row_linears(x, weights, rows, biases, outs)
        if len(res) == len(idxs):
            return list(res)
        return list(res[0].split(widths, dim=-1))

    def weight_rows(self, part: int) -> torch.Tensor:
        """Part j's rows of its weight (a view)."""
        li, first, n = self.parts[part]
        return self.linears[li].weight[first:first + n]


def full_linear(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    return F.linear(x, linear.weight, linear.bias)
