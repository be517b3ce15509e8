"""Parameters and modules SAT cannot index directly are refused with a named error, never trained silently wrong.

Quantized linears (bitsandbytes' classes, an int8 weight: QLoRA is refused), DeepSpeed ZeRO-3 partitioned weights
and tensor-parallel DTensors. (LoRA layers, before or after SAT, are run: tests/test_lora.py.)
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import satlm
from conftest import tiny_model
from satlm import UnsupportedModelError


class Linear4bit(nn.Module):
    """Stands in for bitsandbytes.nn.Linear4bit (same class name; not installed here)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x):
        return nn.functional.linear(x, self.weight, self.bias)


def test_quantized_linear_is_refused_naming_it():
    model = tiny_model()
    attn = model.model.layers[1].self_attn
    attn.v_proj = Linear4bit(attn.v_proj)
    with pytest.raises(UnsupportedModelError, match=r"layers\[1\]\.self_attn\.v_proj is a bitsandbytes 4-bit"):
        satlm.apply_sat(model)
    assert not hasattr(model, "sat_runtime")


def test_integer_weight_is_refused():
    model = tiny_model()
    mlp = model.model.layers[0].mlp
    mlp.up_proj.weight = nn.Parameter(torch.zeros(mlp.up_proj.weight.shape, dtype=torch.int8), requires_grad=False)
    with pytest.raises(UnsupportedModelError, match=r"layers\[0\]\.mlp\.up_proj\.weight is torch\.int8"):
        satlm.apply_sat(model)


def test_deepspeed_zero3_partitioned_weight_is_refused():
    model = tiny_model()
    w = model.model.layers[0].mlp.down_proj.weight
    w.ds_id, w.ds_status = 7, "NOT_AVAILABLE"  # what DeepSpeed's ZeRO-3 sets on the parameters it partitions
    with pytest.raises(UnsupportedModelError, match="ZeRO-3"):
        satlm.apply_sat(model)


def test_tensor_parallel_dtensor_is_refused(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.FileStore(str(tmp_path / "store"), 1))
    try:
        mesh = init_device_mesh("cpu", (1,))
        model = tiny_model()
        q = model.model.layers[0].self_attn.q_proj
        q.weight = nn.Parameter(distribute_tensor(q.weight.detach(), mesh, [Shard(0)]))
        with pytest.raises(UnsupportedModelError, match="DTensor"):
            satlm.apply_sat(model)
    finally:
        dist.destroy_process_group()
