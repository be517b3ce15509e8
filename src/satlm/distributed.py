"""Data-parallel helpers: every rank must keep the same units. They do nothing in a single process."""

from __future__ import annotations

import torch


def world_size() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def reduce_scores(scores: torch.Tensor) -> torch.Tensor:
    """Sum a (small) score vector over data-parallel ranks so that all ranks rank units alike."""
    if world_size() == 1:
        return scores
    import torch.distributed as dist

    scores = scores.contiguous()
    dist.all_reduce(scores, op=dist.ReduceOp.SUM)
    return scores
