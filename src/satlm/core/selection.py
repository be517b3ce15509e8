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
    elif rule == "unbiased":
        return select_unbiased(scores, k, noise)[0]
    else:
        raise ValueError(f"unknown selection rule {rule!r}; choose one of sample, topk, random, unbiased")
    return torch.sort(torch.topk(keys, k, sorted=False).indices).values


def inclusion_probabilities(scores: torch.Tensor, k: int) -> torch.Tensor:
    """p_i = min(1, c s_i) with sum p_i = k: inclusion probabilities proportional to the scores, the largest capped
    at 1 (float64). With the scores sorted descending, m units are capped where m is the smallest count such that
    the largest uncapped unit gets c_m s_(m+1) <= 1, c_m = (k - m) / (sum of the n - m smallest scores); found for
    every m at once (no host sync). Scores are floored at 1e-12 of the largest, so that every unit keeps a chance
    and no kept unit's weight 1/p is unbounded."""
    s = scores.detach().double()
    s = s.clamp_min(s.max().clamp_min(1e-300) * 1e-12)
    n = s.shape[0]
    if k >= n:
        return torch.ones_like(s)
    desc = torch.sort(s, descending=True).values
    tail = desc.flip(0).cumsum(0).flip(0)  # tail[m] = sum of desc[m:]
    m = torch.arange(k, device=s.device, dtype=s.dtype)
    c = (k - m) / tail[:k]  # c_m for m = 0 .. k-1 capped units
    ok = c * desc[:k] <= 1.0 + 1e-12  # the largest uncapped unit (desc[m]) fits under 1
    first = torch.argmax(ok.to(torch.int8))  # the first m that fits (m = k-1 always fits)
    return (c[first] * s).clamp_max(1.0)


def systematic_sample(p: torch.Tensor, u: torch.Tensor, k: int) -> torch.Tensor:
    """Systematic sampling: k = sum(p) units (ascending indices) such that unit i is included with probability p_i
    exactly (each p_i <= 1), from one uniform u in [0, 1): the units whose interval of the cumulative sums holds one
    of u, u + 1, ..., u + k - 1."""
    cum = p.cumsum(0)
    cum = cum * (k / cum[-1])  # exactly k at the end (no host sync: k is given)
    points = u.double().reshape(()) + torch.arange(k, device=p.device, dtype=torch.float64)
    return torch.searchsorted(cum, points, right=True).clamp_max(p.shape[0] - 1)


def select_unbiased(scores: torch.Tensor, k: int, noise: torch.Tensor | torch.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """k units drawn with inclusion probabilities proportional to the scores (inclusion_probabilities, by
    systematic sampling), and their weights 1/p_i (float32): the kept units' gradients times these weights are an
    unbiased estimate of the gradient over every unit (VCAS-like importance sampling). noise: (n,) uniform; its
    first entry is the draw."""
    n = scores.shape[0]
    if k >= n:
        return torch.arange(n, device=scores.device), torch.ones(n, device=scores.device)
    if isinstance(noise, torch.Generator):
        noise = uniform(n, noise)
    p = inclusion_probabilities(scores, k)
    idx = systematic_sample(p, noise.to(scores.device)[0].clamp(0.0, 1.0 - 1e-7), k)
    return idx, (1.0 / p.index_select(0, idx)).float()
