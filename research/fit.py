"""Pure analysis of sweep records: best α per rank, the power law α* = c·r^p, and the claims.

Nothing here trains or reads files; every function takes records (dicts as written by
:func:`alpha_tuner.demo.train.run`) or arrays and returns numbers, so it is tested on
synthetic data with a known answer.

Best α of a rank at one learning rate: the mean held-out loss over seeds of each grid α, then
the vertex of the parabola through the lowest point and its two neighbours in log α (the
lowest grid point itself when it is at the edge of the grid: *censored*). The power law is an
ordinary least-squares line of log α* on log r. Its interval is a parametric bootstrap: each
cell's mean loss is redrawn with the seed-to-seed spread pooled over the rank's cells, and the
whole fit is redone.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "PowerLawFit",
    "bootstrap_power_law",
    "cell_table",
    "fit_power_law",
    "grid_oracle",
    "grid_records",
    "matched_step_pairs",
    "paired_gap",
    "record_loss",
    "redraw_means",
    "refine_argmin",
    "rho_groups",
    "rho_slopes",
]

Cell = tuple[int, float, float]  # (rank, lr, alpha)


def record_loss(record: Mapping[str, Any]) -> float:
    """A run's held-out loss; ``inf`` for a diverged run or one without a loss."""
    value = record.get("eval_loss")
    return math.inf if record.get("diverged") or value is None else float(value)


def grid_records(records: Iterable[Mapping[str, Any]], seeds: Sequence[int]) -> list[Mapping[str, Any]]:
    """The grid runs among ``records``: untagged plain LoRA with an explicit α, on ``seeds``."""
    return [
        r
        for r in records
        if r["config"]["method"] == "lora"
        and r["config"]["alpha"] is not None
        and not r["config"]["tag"]
        and r["config"]["seed"] in seeds
    ]


def cell_table(
    records: Iterable[Mapping[str, Any]], seeds: Sequence[int] | None = None
) -> dict[Cell, list[float]]:
    """Held-out losses of each grid cell ``(rank, lr, alpha)``, one per seed (diverged: inf)."""
    table: dict[Cell, dict[int, float]] = defaultdict(dict)
    for rec in records:
        cfg = rec["config"]
        if seeds is not None and cfg["seed"] not in seeds:
            continue
        table[(cfg["rank"], cfg["lr"], round(cfg["alpha"], 9))][cfg["seed"]] = record_loss(rec)
    return {cell: [by_seed[s] for s in sorted(by_seed)] for cell, by_seed in table.items()}


def grid_oracle(
    records: Iterable[Mapping[str, Any]], seeds: Sequence[int], *, n_cells: int | None = None
) -> dict[int, tuple[float, float]]:
    """Rank → (α, lr) of the grid cell with the lowest mean loss over all of ``seeds``.

    Only cells with a record for every seed count; with ``n_cells`` a rank is left out until
    that many of its cells are complete.
    """
    complete = {c: v for c, v in cell_table(records, seeds).items() if len(v) == len(seeds)}
    by_rank: dict[int, list[tuple[float, float, float]]] = defaultdict(list)
    for (rank, lr, alpha), losses in complete.items():
        by_rank[rank].append((float(np.mean(losses)), alpha, lr))
    return {
        rank: (min(cells)[1], min(cells)[2])
        for rank, cells in by_rank.items()
        if n_cells is None or len(cells) >= n_cells
    }


def paired_gap(losses: Mapping[int, float], reference: Mapping[int, float]) -> dict[str, Any]:
    """The relative gap of ``losses`` to ``reference``, both keyed by seed, over their common seeds.

    Returns ``gap`` (mean loss / mean reference loss − 1), ``paired`` (per seed, sorted by seed:
    loss / reference − 1), ``se`` (standard error of the mean of ``paired``; NaN for one seed) and
    ``seeds``. A seed's pair shares the training seed, so its data order and initialisation, and
    the paired spread is the noise of the comparison rather than of either run.

    Raises:
        ValueError: If the two have no seed in common.
    """
    seeds = sorted(set(losses) & set(reference))
    if not seeds:
        raise ValueError(f"no common seed: losses has {sorted(losses)}, reference has {sorted(reference)}")
    mine = np.array([losses[s] for s in seeds], dtype=float)
    ref = np.array([reference[s] for s in seeds], dtype=float)
    paired = mine / ref - 1.0
    se = float(paired.std(ddof=1) / math.sqrt(len(seeds))) if len(seeds) > 1 else math.nan
    return {"gap": float(mine.mean() / ref.mean() - 1.0), "paired": paired.tolist(), "se": se, "seeds": seeds}


def refine_argmin(
    log_alphas: Sequence[float] | np.ndarray, losses: Sequence[float] | np.ndarray
) -> tuple[float, bool]:
    """The log α of the minimum loss, refined by a parabola; and whether it is censored.

    Args:
        log_alphas: Increasing grid of log α.
        losses: The loss at each (inf allowed for diverged cells).

    Returns:
        ``(log α*, censored)``: censored when the minimum is at either end of the grid.
    """
    x = np.asarray(log_alphas, dtype=float)
    y = np.asarray(losses, dtype=float)
    i = int(np.argmin(y))
    if i == 0 or i == len(x) - 1 or not np.all(np.isfinite(y[i - 1 : i + 2])):
        return float(x[i]), i == 0 or i == len(x) - 1
    a, b, _ = np.polyfit(x[i - 1 : i + 2], y[i - 1 : i + 2], 2)
    vertex = -b / (2 * a) if a > 0 else x[i]
    return float(np.clip(vertex, x[i - 1], x[i + 1])), False


def fit_power_law(ranks: Sequence[float], alpha_star: Sequence[float]) -> tuple[float, float]:
    """Least-squares ``(c, p)`` of ``log α* = log c + p·log r``.

    Raises:
        ValueError: With fewer than two distinct ranks.
    """
    r = np.log(np.asarray(ranks, dtype=float))
    if len(np.unique(r)) < 2:
        raise ValueError("fit_power_law needs at least two distinct ranks.")
    p, log_c = np.polyfit(r, np.log(np.asarray(alpha_star, dtype=float)), 1)
    return float(math.exp(log_c)), float(p)


def redraw_means(losses: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One parametric-bootstrap draw of the per-α mean loss of one rank's grid.

    Each finite cell's mean over seeds is redrawn from a normal with the seed-to-seed spread
    pooled over the grid's finite cells (divided by √seeds); non-finite cells (diverged runs)
    keep their mean. With one seed there is no spread and the means come back unchanged.

    Args:
        losses: Shape (n_seeds, n_alphas).
        rng: The generator of the draw.
    """
    means = losses.mean(axis=0)
    finite = np.isfinite(losses).all(axis=0)
    n = losses.shape[0]
    if n < 2 or not finite.any():
        return means
    sd = float(np.sqrt(np.mean(losses[:, finite].var(axis=0, ddof=1))))
    return np.where(finite, means + rng.normal(0.0, sd / math.sqrt(n), means.shape), means)


@dataclass(frozen=True)
class PowerLawFit:
    """α* = c·r^p at one learning rate, with bootstrap intervals.

    Attributes:
        c: The coefficient (α* at r = 1).
        p: The exponent.
        c_interval: ``(low, high)`` bootstrap interval of c.
        p_interval: ``(low, high)`` bootstrap interval of p.
        alpha_star: Rank → best α (parabola-refined).
        censored: Rank → whether the best α sits at an edge of the grid.
        c_at_half: The coefficient with p fixed at 0.5 (geometric mean of α*/√r).
        level: The interval's coverage.
    """

    c: float
    p: float
    c_interval: tuple[float, float]
    p_interval: tuple[float, float]
    alpha_star: dict[int, float]
    censored: dict[int, bool]
    c_at_half: float
    level: float


def bootstrap_power_law(
    table: Mapping[int, tuple[Sequence[float], Sequence[Sequence[float]]]],
    *,
    n_boot: int = 2000,
    level: float = 0.9,
    seed: int = 0,
) -> PowerLawFit:
    """Fit α* = c·r^p from per-rank loss grids, with a parametric bootstrap interval.

    Args:
        table: Rank → (α grid, losses with shape (n_seeds, n_alphas)). Cells with a
            non-finite loss keep it in every redraw.
        n_boot: Bootstrap redraws. With a single seed at some rank there is no spread to
            redraw from and the intervals are NaN.
        level: Coverage of the intervals.
        seed: Seed of the redraws.
    """
    ranks = sorted(table)
    grids = {r: (np.log(np.asarray(table[r][0], float)), np.asarray(table[r][1], float)) for r in ranks}

    def best(losses_by_rank: Mapping[int, np.ndarray]) -> tuple[list[float], list[bool]]:
        out = [refine_argmin(grids[r][0], losses_by_rank[r]) for r in ranks]
        return [math.exp(v) for v, _ in out], [c for _, c in out]

    means = {r: grids[r][1].mean(axis=0) for r in ranks}
    alpha_star, censored = best(means)
    c, p = fit_power_law(ranks, alpha_star)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n_boot):
        drawn = {r: redraw_means(grids[r][1], rng) for r in ranks}
        samples.append(fit_power_law(ranks, best(drawn)[0]))
    cs, ps = np.array(samples).T
    tail = 100 * (1 - level) / 2
    if min(grids[r][1].shape[0] for r in ranks) < 2:  # no seed-to-seed spread to redraw from
        cs = ps = np.full(1, math.nan)
    c_half = math.exp(float(np.mean(np.log(alpha_star) - 0.5 * np.log(ranks))))
    return PowerLawFit(
        c=c,
        p=p,
        c_interval=(float(np.percentile(cs, tail)), float(np.percentile(cs, 100 - tail))),
        p_interval=(float(np.percentile(ps, tail)), float(np.percentile(ps, 100 - tail))),
        alpha_star=dict(zip(ranks, alpha_star, strict=True)),
        censored=dict(zip(ranks, censored, strict=True)),
        c_at_half=c_half,
        level=level,
    )


def rank_tables(
    cells: Mapping[Cell, Sequence[float]], lr: float
) -> dict[int, tuple[list[float], list[list[float]]]]:
    """The per-rank inputs of :func:`bootstrap_power_law` at one learning rate (complete seeds only)."""
    out: dict[int, tuple[list[float], list[list[float]]]] = {}
    for rank in sorted({c[0] for c in cells}):
        row = sorted((a, v) for (r, eta, a), v in cells.items() if r == rank and math.isclose(eta, lr))
        n = max((len(v) for _, v in row), default=0)
        row = [(a, list(v)) for a, v in row if len(v) == n]
        if len(row) >= 3:
            out[rank] = ([a for a, _ in row], np.array([v for _, v in row]).T.tolist())
    return out


def matched_step_pairs(
    cells: Mapping[Cell, Sequence[float]], *, tolerance: float = 1.0
) -> list[dict[str, float]]:
    """Claim 1: pairs of cells with the same α·η, one with k× the α and one with k× the LR.

    For every rank, pair of learning rates η < k·η and α with k·α in the grid, compare the
    cell (k·α, η) (raise α) with (α, k·η) (raise the LR), both starting from (α, η). With
    ``tolerance`` > 1 the raised α need only be within that factor of k·α (grids whose α and LR
    steps differ, e.g. α × 4 against LR × 10); ``alpha_raised`` is then the α actually used.
    """
    means = {cell: float(np.mean(v)) for cell, v in cells.items()}
    out = []
    for (rank, lr, alpha), loss_alpha_up in means.items():
        for (r2, lr2, a2), loss_lr_up in means.items():
            if r2 != rank or lr2 <= lr or alpha <= a2:
                continue
            k = lr2 / lr
            ratio = alpha / (a2 * k)
            matched = math.isclose(ratio, 1.0, rel_tol=1e-6) or 1.0 / tolerance <= ratio <= tolerance
            if matched:
                out.append({
                    "rank": rank, "alpha": a2, "lr": lr, "k": k, "alpha_raised": alpha,
                    "loss_raise_alpha": loss_alpha_up, "loss_raise_lr": loss_lr_up,
                })  # fmt: skip
    return out


RhoGroups = dict[tuple[int, float], list[tuple[float, float]]]


def rho_groups(
    records: Iterable[Mapping[str, Any]], *, min_accuracy: float | None = None
) -> tuple[RhoGroups, RhoGroups]:
    """The measured ρ of the runs, grouped for claim 2.

    Args:
        records: Grid records (``config``, ``rho_mean``, ``eval_accuracy``, ``diverged``).
            Runs that diverged or have no positive ρ are left out.
        min_accuracy: Keep only runs whose held-out accuracy reaches this (runs that learned,
            rather than collapsed to the majority class); ``None`` keeps all.

    Returns:
        ``(by_alpha, by_lr)``: (rank, LR) → [(α, ρ)], and (rank, c = α/√r) → [(LR, ρ)].
    """
    by_alpha: RhoGroups = defaultdict(list)
    by_lr: RhoGroups = defaultdict(list)
    for rec in records:
        rho, cfg = rec.get("rho_mean"), rec["config"]
        if rho is None or not rho > 0 or rec.get("diverged"):
            continue
        if min_accuracy is not None and not (rec.get("eval_accuracy") or 0.0) >= min_accuracy:
            continue
        c = round(cfg["alpha"] / math.sqrt(cfg["rank"]), 6)
        by_alpha[(cfg["rank"], cfg["lr"])].append((cfg["alpha"], rho))
        by_lr[(cfg["rank"], c)].append((cfg["lr"], rho))
    return by_alpha, by_lr


def rho_slopes(
    records: Iterable[Mapping[str, Any]], *, min_accuracy: float | None = None
) -> dict[str, list[float]]:
    """Claim 2: slopes of log ρ against log α (fixed rank, LR) and against log LR (fixed rank, c).

    Args:
        records: As for :func:`rho_groups`.
        min_accuracy: As for :func:`rho_groups`.

    Returns:
        ``{"alpha": [...], "lr": [...]}``: one least-squares slope per group with ≥ 2 points.
    """
    by_alpha, by_lr = rho_groups(records, min_accuracy=min_accuracy)

    def slopes(groups: RhoGroups) -> list[float]:
        out = []
        for points in groups.values():
            x, y = np.log(np.array(points)).T
            if len(np.unique(x)) >= 2:
                out.append(float(np.polyfit(x, y, 1)[0]))
        return out

    return {"alpha": slopes(by_alpha), "lr": slopes(by_lr)}
