"""Importance and selection rules, as pure functions."""

from __future__ import annotations

import pytest
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("metric", ["l2", "output"])
def test_channels_first_scores_equal_the_token_major_ones(metric, dtype):
    """Paper mode's fused MLP scores an unpadded batch from its channels-first activations in one read."""
    from satlm.core.importance import mlp_scores_rows

    g = gen(5)
    h_rows = torch.randn(24, 40, generator=g).to(dtype)  # (f, N)
    down = torch.randn(8, 24, generator=g)
    ref = mlp_scores(h_rows.t().reshape(4, 10, 24), None, metric, down)
    got = mlp_scores_rows(h_rows, metric, down)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("metric", ["l2", "output"])
def test_paper_mode_mlp_scores_are_those_of_the_activations(metric, pad):
    """The scores paper mode's fused MLP ranks by (one-read row norms when unpadded, token-major with a mask) equal
    the metric computed here from the layer's input by plain ops."""
    import torch.nn.functional as F

    import satlm
    from conftest import batch, sat_config, tiny_model

    model = tiny_model()
    satlm.apply_sat(model, sat_config(omission_rate=0.5, schedule="constant", selection="topk", metric=metric))
    data = batch(pad=pad)
    if not pad:
        data.pop("attention_mask")
    mlp = model.model.layers[1].mlp
    seen = {}
    hook = mlp.register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0].detach()))
    model(**data).loss.backward()
    hook.remove()
    x = seen["x"]
    h = F.silu(x @ mlp.gate_proj.weight.t()) * (x @ mlp.up_proj.weight.t())  # (B, T, f)
    if pad:
        h = h * data["attention_mask"][..., None]
    ref = h.square().sum(dim=(0, 1)).sqrt()
    if metric == "output":
        ref = ref * mlp.down_proj.weight.norm(dim=0)
    torch.testing.assert_close(mlp.sat_last_scores, ref, rtol=1e-4, atol=1e-6)
