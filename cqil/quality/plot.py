"""The similarity plot of cqil-analyze: adjacent-layer similarity, similarity to the group input, the range."""

from __future__ import annotations

from pathlib import Path

from cqil.quality.similarity import Similarity, Suggestion


def plot_similarity(sim: Similarity, suggestion: Suggestion, threshold: float, out: str | Path, title: str = ""):
    import matplotlib
    matplotlib.use("Agg")  # files only: never open a window
    import matplotlib.pyplot as plt

    plan = suggestion.plan
    L = sim.num_layers
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=120)
    # cos(x_l, x_{l+1}) is a property of the step between l and l+1: draw it there
    ax.plot([l + 0.5 for l in range(L - 1)], sim.adjacent, marker="o", ms=3, label="adjacent: cos(x_l, x_{l+1})")
    group = sim.to_group_start(plan)
    # members reading an earlier layer's input; a group start reads its own (similarity 1)
    xs = [l for l in range(L) if group[l] is not None and plan.rank_of(l) != 0]
    if plan.groups:
        ax.plot(xs, [group[l] for l in xs], marker="s", ms=4, linestyle="none",
                label=f"cos(x_l, group input), p={plan.p}")
        ax.axvspan(plan.start - 0.5, plan.end - 0.5, alpha=0.12, color="tab:green",
                   label=f"suggested [{plan.start}, {plan.end})")
    ax.axhline(threshold, color="gray", linewidth=0.8, linestyle=":", label=f"threshold {threshold}")
    ax.set_xlabel("layer")
    ax.set_ylabel("cosine similarity of layer inputs")
    ax.set_xlim(-0.5, L - 0.5)
    ax.set_title(title or f"{L} layers, {sim.tokens} tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(str(out))
    plt.close(fig)
