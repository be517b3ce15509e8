"""(scores, k, rule, noise) -> kept unit indices, sorted. No host syncs.

The randomness of `sample` and `random` comes in as `noise`: uniform draws made before the forward
(UnitSelector.begin_forward), so that a compiled forward contains no generator (torch.compile cannot trace one);
a torch.Generator is accepted too and drawn from here."""

from __future__ import annotations

import torch

_TINY = 1e-30


def uniform(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=generator.device)


def select_units(scores: torch.Tensor, k: int, rule: str, noise: torch.Tensor | torch.Generator) -> torch.Tensor:
    """Indices of the k kept units among len(scores), ascending.

    topk: the k highest scores. sample: k without replacement with probability proportional to the score
    (Gumbel-top-k on log score). random: k uniformly, scores ignored. noise: (n,) uniform in [0, 1), used by
    sample and random (or a generator to draw it from).
    """
    n = scores.shape[0]
    if k >= n:
        return torch.arange(n, device=scores.device)
    if isinstance(noise, torch.Generator) and rule != "topk":
        noise = uniform(n, noise)
    if rule == "topk":
        keys = scores
    elif rule == "sample":
        u = noise.to(scores.device).clamp(_TINY, 1.0 - 1e-7)
        gumbel = -torch.log(-torch.log(u))
        keys = torch.log(scores.float().clamp_min(_TINY)) + gumbel
    elif rule == "random":
        keys = noise.to(scores.device)
    else:
        raise ValueError(f"unknown selection rule {rule!r}; choose one of sample, topk, random")
    return torch.sort(torch.topk(keys, k, sorted=False).indices).values
