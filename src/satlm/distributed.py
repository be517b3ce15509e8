"""Data-parallel helpers: every rank must keep the same units. They do nothing in a single process."""

from __future__ import annotations

import torch


def world_size() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def reduce_scores(scores: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    """Combine a (small) score vector over data-parallel ranks so that all ranks rank units alike.

    Norm-based scores (l2, output) combine as the norm over the union of the ranks' tokens:
    sqrt(sum of squares), so that N ranks with batch b score exactly as one rank with batch N*b.
    Means (l1) and uniform scores are averaged.
    """
    if world_size() == 1:
        return scores
    import torch.distributed as dist

    if metric in ("l2", "output"):
        total = scores.float().square().contiguous()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total.sqrt()
    total = scores.float().contiguous()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total / world_size()
