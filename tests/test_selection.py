"""Importance and selection rules, as pure functions."""

from __future__ import annotations

import torch

from satlm.core.importance import group_scores, head_scores, mlp_scores
from satlm.core.selection import select_units


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_topk_keeps_highest_sorted():
    s = torch.tensor([0.1, 5.0, 0.3, 2.0, 4.0])
    assert select_units(s, 3, "topk", gen()).tolist() == [1, 3, 4]


def test_same_seed_same_draw_and_k_respected():
    s = torch.rand(50, generator=gen(1)) + 0.1
    a = select_units(s, 20, "sample", gen(3))
    b = select_units(s, 20, "sample", gen(3))
    assert torch.equal(a, b) and len(a.unique()) == 20
    assert not torch.equal(a, select_units(s, 20, "sample", gen(4)))


def test_sample_favours_important_units_but_keeps_every_unit_sometimes():
    n, k, draws = 16, 8, 2000
    scores = torch.linspace(0.1, 1.6, n)  # unit i has score proportional to i + 1
    g = gen(0)
    counts = torch.zeros(n)
    for _ in range(draws):
        counts[select_units(scores, k, "sample", g)] += 1
    freq = counts / draws
    assert freq.min() > 0.05  # every unit is kept sometimes
    assert freq[-4:].mean() > freq[:4].mean() + 0.3  # high scores are kept much more often
    # Frequencies rise with the score (Spearman correlation close to 1).
    ranks = freq.argsort().argsort().float()
    assert torch.corrcoef(torch.stack([ranks, torch.arange(n).float()]))[0, 1] > 0.95


def test_random_ignores_importance():
    n, k, draws = 16, 8, 2000
    scores = torch.linspace(0.01, 100.0, n)
    g = gen(0)
    counts = torch.zeros(n)
    for _ in range(draws):
        counts[select_units(scores, k, "random", g)] += 1
    freq = counts / draws
    assert (freq - 0.5).abs().max() < 0.06


def test_importance_ignores_padding_tokens():
    h = torch.randn(2, 5, 7)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    noisy = h.clone()
    noisy[0, 3:] = 1e6  # padding rows must not matter
    for metric in ("l2", "l1"):
        torch.testing.assert_close(mlp_scores(noisy, mask, metric), mlp_scores(h, mask, metric))
    ref = torch.sqrt((h[0, :3] ** 2).sum(0) + (h[1] ** 2).sum(0))
    torch.testing.assert_close(mlp_scores(h, mask, "l2"), ref)


def test_output_metric_equals_norm_of_head_contribution():
    b, t, n_h, hd, d = 2, 6, 4, 3, 10
    o = torch.randn(b, t, n_h, hd)
    wo = torch.randn(d, n_h * hd)
    got = head_scores(o, None, "output", wo)
    want = torch.stack([
        (o[:, :, h, :].reshape(-1, hd) @ wo[:, h * hd:(h + 1) * hd].T).norm() for h in range(n_h)
    ])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    h_mlp = torch.randn(b, t, 5)
    wd = torch.randn(d, 5)
    torch.testing.assert_close(mlp_scores(h_mlp, None, "output", wd),
                               h_mlp.reshape(-1, 5).norm(dim=0) * wd.norm(dim=0))


def test_group_scores_sum_heads_of_a_group():
    s = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    assert group_scores(s, 2).tolist() == [6.0, 15.0]
