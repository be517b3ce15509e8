"""Plots from a run directory's saved JSON: one run (plots/training.png) and dense vs SAT (compare.png)."""

from __future__ import annotations

from pathlib import Path

from .recorder import EVAL_NAME, METRICS_NAME, read_jsonl_records


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    return plt


def _ema(values: list[float], beta: float = 0.9) -> list[float]:
    out, avg = [], None
    for v in values:
        avg = v if avg is None else beta * avg + (1 - beta) * v
        out.append(avg)
    return out


def plot_run(run_dir: Path) -> Path | None:
    """plots/training.png: loss against tokens (train, smoothed, and eval), omission rates, tokens/s."""
    run_dir = Path(run_dir)
    records = read_jsonl_records(run_dir / METRICS_NAME)
    evals = read_jsonl_records(run_dir / EVAL_NAME)
    if not records:
        return None
    plt = _pyplot()
    steps = [r["step"] for r in records]
    tokens = [r["tokens"] for r in records]
    fig, (ax_loss, ax_rate, ax_speed) = plt.subplots(1, 3, figsize=(15, 4))
    losses = [r["loss"] for r in records]
    ax_loss.plot(tokens, losses, color="C0", alpha=0.3, lw=0.8)
    ax_loss.plot(tokens, _ema(losses), color="C0", label="train (EMA)")
    if evals:
        ax_loss.plot([e["tokens"] for e in evals], [e["eval_loss"] for e in evals], "o-", color="C3", label="eval")
    ax_loss.set(xlabel="tokens", ylabel="loss", title="loss")
    ax_loss.legend()
    ax_rate.plot(steps, [r["attn_omission_rate"] for r in records], label="attention")
    ax_rate.plot(steps, [r["mlp_omission_rate"] for r in records], label="MLP")
    ax_rate.set(xlabel="step", ylabel="omission rate", title="SAT omission rate", ylim=(-0.02, 1.0))
    ax_rate.legend()
    speed = [(s, r["tokens_per_second"]) for s, r in zip(steps, records) if r.get("tokens_per_second")]
    if speed:
        ax_speed.plot([s for s, _ in speed], _ema([v for _, v in speed]), color="C2")
    ax_speed.set(xlabel="step", ylabel="tokens/s", title="throughput (EMA)")
    fig.tight_layout()
    out = run_dir / "plots" / "training.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_compare(curves: dict[str, list[dict]], out: Path, target: float | None = None,
                 reached: float | None = None, reached_tokens: float | None = None, thinned: bool = False) -> Path:
    """compare.png: eval loss (dense, on held-out data) against training tokens and against training time, one line
    per run and seed, from compare.json's `curves`; the time axis is the interleaved time model's (`seconds`) where
    there is one, else each run's own measured train_seconds. Dense's final eval loss as a line and where SAT first
    reaches it (target; reached in seconds, reached_tokens) as a mark. Training losses are left out: with a thinned
    forward (thinned) SAT's training loss is a thinned model's, not comparable with dense's."""
    plt = _pyplot()
    fig, (ax_tok, ax_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    modelled = all("seconds" in p for points in curves.values() for p in points)
    key = "seconds" if modelled else "train_seconds"
    for i, (label, points) in enumerate(curves.items()):
        seeds = sorted({p.get("seed") for p in points}, key=lambda s: (s is None, s))
        for j, seed in enumerate(seeds):
            pts = sorted((p for p in points if p.get("seed") == seed), key=lambda p: p["step"])
            name = label + (f" (seed {seed})" if len(seeds) > 1 else "") + (" [thinned forward]"
                                                                           if thinned and label == "sat" else "")
            style = dict(color=f"C{i}", ls=("--", ":", "-.")[j % 3], marker="o", ms=4, label=name)
            ax_tok.plot([p["tokens"] for p in pts], [p["eval_loss"] for p in pts], **style)
            ax_time.plot([p[key] for p in pts], [p["eval_loss"] for p in pts], **style)
    if target is not None:
        for ax in (ax_tok, ax_time):
            ax.axhline(target, color="grey", lw=0.8, ls=":", label="dense final eval loss")
        if reached is not None:
            ax_time.plot([reached], [target], marker="*", ms=14, color="C1", ls="none", label="SAT reaches it")
        if reached_tokens is not None:
            ax_tok.plot([reached_tokens], [target], marker="*", ms=14, color="C1", ls="none", label="SAT reaches it")
    ax_tok.set(xlabel="training tokens", ylabel="eval loss", title="eval loss vs tokens")
    xlabel = ("training seconds (SAT's from the interleaved step-time ratios)" if modelled
              else "training seconds (each run's own; evaluation and saving excluded)")
    ax_time.set(xlabel=xlabel, ylabel="eval loss", title="eval loss vs training time")
    for ax in (ax_tok, ax_time):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
