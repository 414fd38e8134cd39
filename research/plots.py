"""The figures of the sweep (matplotlib, imported lazily, Agg backend)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .fit import Cell, PowerLawFit, rho_groups

__all__ = ["plot_best_alpha", "plot_heatmaps", "plot_rho"]


from alpha_tuner.demo.figure import pyplot as _pyplot


def plot_heatmaps(cells: Mapping[Cell, Sequence[float]], path: Path) -> None:
    """Mean held-out loss over (c = α/√r, LR), one panel per rank; best cell of each panel boxed."""
    plt = _pyplot()
    ranks = sorted({c[0] for c in cells})
    fig, axes = plt.subplots(1, len(ranks), figsize=(4.6 * len(ranks), 4), squeeze=False)
    for ax, rank in zip(axes[0], ranks, strict=True):
        sub = {(lr, a / math.sqrt(rank)): float(np.mean(v)) for (r, lr, a), v in cells.items() if r == rank}
        lrs = sorted({k[0] for k in sub})
        cs = sorted({k[1] for k in sub})
        grid = np.full((len(lrs), len(cs)), np.nan)
        for (lr, c), loss in sub.items():
            grid[lrs.index(lr), cs.index(c)] = loss if math.isfinite(loss) else np.nan
        image = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis_r")
        for i, j in np.ndindex(grid.shape):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", fontsize=7, color="w")
        if np.isfinite(grid).any():
            i, j = np.unravel_index(np.nanargmin(grid), grid.shape)
            ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="red", lw=2))
        ax.set_xticks(range(len(cs)), [f"{c:g}" for c in cs], rotation=45)
        ax.set_yticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
        ax.set(title=f"r = {rank}", xlabel="c = α/√r", ylabel="learning rate")
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.suptitle("held-out loss (mean over selection seeds; red: best cell)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_rho(records: Sequence[Mapping[str, Any]], path: Path) -> None:
    """ρ against α (one line per rank and LR) and against the LR (one line per rank and c)."""
    plt = _pyplot()
    by_alpha, by_lr = rho_groups(records)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, groups, name in ((axes[0], by_alpha, "lr"), (axes[1], by_lr, "c")):
        for (rank, value), points in sorted(groups.items()):
            x, y = np.array(sorted(points)).T
            # One point per seed; the line joins the geometric means of the seeds at each x.
            xs = np.unique(x)
            means = [float(np.exp(np.mean(np.log(y[x == v])))) for v in xs]
            (line,) = ax.plot(xs, means, lw=1, label=f"r={rank}, {name}={value:g}")
            ax.scatter(x, y, s=6, color=line.get_color())
        ax.set(xscale="log", yscale="log", ylabel="ρ (second half of training; line: seed mean)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, ncol=2)
    axes[0].set(title="ρ against α (fixed rank and LR)", xlabel="α")
    axes[1].set(title="ρ against the learning rate (fixed rank and c)", xlabel="learning rate")
    lrs = sorted({lr for (_, _), points in by_lr.items() for lr, _ in points})
    if lrs:
        axes[1].set_xticks(lrs, [f"{lr:g}" for lr in lrs])
        axes[1].minorticks_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_best_alpha(
    fits: Mapping[float, PowerLawFit], path: Path, *, rule: Mapping[str, float] | None = None
) -> None:
    """Best α per rank at each LR with its fitted power law c·r^p, and the joint rule dashed.

    Args:
        fits: LR → the per-LR power-law fit.
        path: The PNG to write.
        rule: Parameters of the joint rule (:func:`.rule.rule_alpha`) to draw at each LR.
    """
    from .rule_fit import rule_alpha

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for lr, fit in sorted(fits.items()):
        ranks = np.array(sorted(fit.alpha_star), dtype=float)
        best = np.array([fit.alpha_star[int(r)] for r in ranks])
        censored = np.array([fit.censored[int(r)] for r in ranks])
        lo, hi = fit.p_interval
        spread = "one seed, no interval" if math.isnan(lo) else f"p∈[{lo:.2f}, {hi:.2f}]"
        label = f"lr={lr:g}: α*≈{fit.c:.3g}·r^{fit.p:.2f} ({spread})"
        (line,) = ax.plot(ranks, fit.c * ranks**fit.p, lw=1, label=label)
        ax.scatter(ranks[~censored], best[~censored], color=line.get_color())
        ax.scatter(ranks[censored], best[censored], color=line.get_color(), marker="^", label=None)
        if rule is not None:
            grid = np.geomspace(ranks.min(), ranks.max(), 50)
            ax.plot(grid, [rule_alpha(r, lr, rule) for r in grid], ls="--", lw=1, color=line.get_color())
    if rule is not None:
        ax.plot([], [], ls="--", lw=1, color="gray", label="joint rule α = c(η)·r^p(η)")
    ax.set(xscale="log", yscale="log", xlabel="rank r", ylabel="best α (▲: at the grid's edge)")
    ax.set_xticks(ranks, [f"{r:g}" for r in ranks])
    ax.minorticks_off()
    ax.set_title("best α per rank")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
