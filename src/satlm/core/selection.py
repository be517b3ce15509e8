"""(scores, k, rule, generator) -> kept unit indices, sorted. No host syncs."""

from __future__ import annotations

import torch

_TINY = 1e-30


def uniform(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=generator.device)


def select_units(scores: torch.Tensor, k: int, rule: str, generator: torch.Generator) -> torch.Tensor:
    """Indices of the k kept units among len(scores), ascending.

    topk: the k highest scores. sample: k without replacement with probability proportional to the score
    (Gumbel-top-k on log score). random: k uniformly, scores ignored.
    """
    n = scores.shape[0]
    if k >= n:
        return torch.arange(n, device=scores.device)
    if rule == "topk":
        keys = scores
    elif rule == "sample":
        u = uniform(n, generator).to(scores.device).clamp_(_TINY, 1.0 - 1e-7)
        gumbel = -torch.log(-torch.log(u))
        keys = torch.log(scores.float().clamp_min(_TINY)) + gumbel
    elif rule == "random":
        keys = uniform(n, generator).to(scores.device)
    else:
        raise ValueError(f"unknown selection rule {rule!r}; choose one of sample, topk, random")
    return torch.sort(torch.topk(keys, k, sorted=False).indices).values
