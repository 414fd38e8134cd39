"""The library's α rule, fitted jointly over ranks and learning rates from the sweep's grid.

The rule of :mod:`alpha_tuner.principled` is

    α*(r, η) = C · (η_ref/η)^q · r^p(η),      p(η) = p₀ + p₁·ln(η/η_ref)

so ``log α* = log C + q·x + p₀·log r − p₁·x·log r`` with ``x = ln(η_ref/η)``: linear in its four
parameters, fitted by least squares to the best α of every (rank, LR) of the grid (each refined
by :func:`~.fit.refine_argmin`). ``p₁ = 0`` is the constant-exponent rule, and ``p₀ = ½, p₁ = 0``
the paper's α = c·√r. The interval of each parameter is the parametric bootstrap of
:func:`~.fit.bootstrap_power_law`, applied to every (rank, LR) grid at once.

Nothing here trains or reads files; the parameters come back under the keyword names of
the fields of :class:`alpha_tuner.AlphaRule`, and :func:`rule_alpha` is the library's own
formula (:func:`alpha_tuner.rule.rule_alpha`), so the fitted constants go into the library as
they are.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from alpha_tuner.rule import REFERENCE_LR, rule_alpha

from .fit import redraw_means, refine_argmin

__all__ = ["RuleFit", "bootstrap_rule", "fit_rule", "leave_one_out", "rule_alpha"]

#: The parameters, by their keyword names in :func:`alpha_tuner.principled.principled_alpha`.
RULE_PARAMS = ("c", "lr_exponent", "rank_exponent", "rank_exponent_slope")

Point = tuple[int, float, float]  # (rank, lr, best α)
#: LR → rank → (α grid, losses of shape (n_seeds, n_alphas)), as :func:`~.fit.rank_tables` gives.
Tables = Mapping[float, Mapping[int, tuple[Sequence[float], Sequence[Sequence[float]]]]]


def fit_rule(
    points: Sequence[Point],
    *,
    reference_lr: float = REFERENCE_LR,
    lr_dependent_exponent: bool = True,
    rank_exponent: float | None = None,
) -> dict[str, float]:
    """Least-squares parameters of the rule through ``(rank, lr, α*)`` points (in log α).

    Args:
        points: The best α of each (rank, LR).
        reference_lr: η_ref, where the coefficient is ``c`` and the rank exponent ``p₀``.
        lr_dependent_exponent: Fit p₁ too; ``False`` fixes it at 0 (one exponent for all LRs).
        rank_exponent: Fix p₀ at this value instead of fitting it (0: α* independent of the
            rank; ½: the paper's √r). Implies p₁ = 0, whatever ``lr_dependent_exponent`` says.

    Returns:
        ``{"c", "lr_exponent", "rank_exponent", "rank_exponent_slope"}``.

    Raises:
        ValueError: If the points do not determine the parameters (fewer than two ranks or
            two learning rates, or, with ``lr_dependent_exponent``, no two ranks at each of two
            learning rates).
    """
    r, lr, a = np.asarray(points, dtype=float).reshape(-1, 3).T
    x, log_r = np.log(reference_lr / lr), np.log(r)
    if rank_exponent is not None:
        if not math.isfinite(rank_exponent):
            raise ValueError(f"rank_exponent must be finite or None, got {rank_exponent!r}.")
        columns = [np.ones_like(x), x]
        design = np.stack(columns, axis=1)
        if len(x) < 2 or np.linalg.matrix_rank(design) < 2:
            raise ValueError(
                f"fit_rule with a fixed rank exponent needs points at two or more learning rates; "
                f"got {len(points)} point(s)."
            )
        coef, *_ = np.linalg.lstsq(design, np.log(a) - rank_exponent * log_r, rcond=None)
        return {
            "c": float(math.exp(coef[0])),
            "lr_exponent": float(coef[1]),
            "rank_exponent": float(rank_exponent),
            "rank_exponent_slope": 0.0,
        }
    columns = [np.ones_like(x), x, log_r] + ([x * log_r] if lr_dependent_exponent else [])
    design = np.stack(columns, axis=1)
    if len(x) < len(columns) or np.linalg.matrix_rank(design) < len(columns):
        raise ValueError(
            f"fit_rule needs points at two or more ranks and learning rates (with an LR-dependent "
            f"exponent, two ranks at each of two learning rates); got {len(points)} point(s)."
        )
    coef, *_ = np.linalg.lstsq(design, np.log(a), rcond=None)
    slope = float(-coef[3]) if lr_dependent_exponent else 0.0
    return {
        "c": float(math.exp(coef[0])),
        "lr_exponent": float(coef[1]),
        "rank_exponent": float(coef[2]),
        "rank_exponent_slope": slope,
    }


def leave_one_out(
    points: Sequence[Point],
    *,
    reference_lr: float = REFERENCE_LR,
    lr_dependent_exponent: bool = True,
    rank_exponent: float | None = None,
) -> list[float]:
    """Each point's measured α* over the α of the rule fitted to all the other points.

    The out-of-sample error of the rule's form: a form with more parameters fits the points it
    saw more closely, and this says whether it also predicts a (rank, LR) it did not see.
    Points whose omission leaves the parameters undetermined are skipped (NaN).
    """
    out = []
    for i, (rank, lr, alpha) in enumerate(points):
        rest = [pt for j, pt in enumerate(points) if j != i]
        try:
            params = fit_rule(
                rest,
                reference_lr=reference_lr,
                lr_dependent_exponent=lr_dependent_exponent,
                rank_exponent=rank_exponent,
            )
        except ValueError:
            out.append(math.nan)
            continue
        out.append(alpha / rule_alpha(rank, lr, params, reference_lr=reference_lr))
    return out


@dataclass(frozen=True)
class RuleFit:
    """The fitted rule, its bootstrap intervals and how well it meets the measured points.

    Attributes:
        params: The parameters (keyword names of :func:`~alpha_tuner.principled.principled_alpha`).
        intervals: Parameter → ``(low, high)`` bootstrap interval (NaN with a single seed).
        points: ``(rank, lr, α*)`` measured, parabola-refined.
        censored: Whether each point's best α sits at an edge of its grid.
        ratios: Measured α* over the rule's α, per point.
        loo_ratios: Measured α* over the α of the rule fitted without that point
            (:func:`leave_one_out`).
        reference_lr: η_ref of the parameters.
        level: The intervals' coverage.
    """

    params: dict[str, float]
    intervals: dict[str, tuple[float, float]]
    points: list[Point]
    censored: list[bool]
    ratios: list[float]
    loo_ratios: list[float]
    reference_lr: float
    level: float

    @property
    def max_factor(self) -> float:
        """The largest factor, either way, between a measured α* and the rule's α."""
        return max(max(q, 1 / q) for q in self.ratios)

    @property
    def loo_rms_log(self) -> float:
        """Root mean square of ln(measured / predicted) over the left-out points."""
        logs = [math.log(q) ** 2 for q in self.loo_ratios if math.isfinite(q)]
        return math.sqrt(sum(logs) / len(logs)) if logs else math.nan


def _best_points(
    tables: Tables, means: Mapping[tuple[float, int], np.ndarray]
) -> tuple[list[Point], list[bool]]:
    points, censored = [], []
    for lr in sorted(tables):
        for rank in sorted(tables[lr]):
            log_a = np.log(np.asarray(tables[lr][rank][0], dtype=float))
            best, edge = refine_argmin(log_a, means[(lr, rank)])
            points.append((rank, lr, math.exp(best)))
            censored.append(edge)
    return points, censored


def bootstrap_rule(
    tables: Tables,
    *,
    reference_lr: float = REFERENCE_LR,
    lr_dependent_exponent: bool = True,
    rank_exponent: float | None = None,
    n_boot: int = 2000,
    level: float = 0.9,
    seed: int = 0,
) -> RuleFit:
    """Fit the rule to the best α of every (rank, LR) grid, with parametric-bootstrap intervals.

    Args:
        tables: LR → rank → (α grid, losses with shape (n_seeds, n_alphas)).
        reference_lr: η_ref of the parameters.
        lr_dependent_exponent: Fit the LR slope of the rank exponent (else it is 0).
        rank_exponent: Fix the rank exponent at this value (see :func:`fit_rule`).
        n_boot: Bootstrap redraws.
        level: Coverage of the intervals.
        seed: Seed of the redraws.

    Raises:
        ValueError: As :func:`fit_rule`.
    """
    losses = {(lr, r): np.asarray(v[1], dtype=float) for lr, row in tables.items() for r, v in row.items()}
    points, censored = _best_points(tables, {k: v.mean(axis=0) for k, v in losses.items()})

    def fit(pts: Sequence[Point]) -> dict[str, float]:
        return fit_rule(
            pts,
            reference_lr=reference_lr,
            lr_dependent_exponent=lr_dependent_exponent,
            rank_exponent=rank_exponent,
        )

    params = fit(points)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n_boot):
        drawn = {k: redraw_means(v, rng) for k, v in losses.items()}
        drawn_params = fit(_best_points(tables, drawn)[0])
        samples.append([drawn_params[name] for name in RULE_PARAMS])
    tail = 100 * (1 - level) / 2
    one_seed = min(v.shape[0] for v in losses.values()) < 2
    intervals = {}
    for name, column in zip(RULE_PARAMS, np.array(samples).T, strict=True):
        lo, hi = (math.nan, math.nan) if one_seed else np.percentile(column, [tail, 100 - tail])
        intervals[name] = (float(lo), float(hi))
    ratios = [a / rule_alpha(r, lr, params, reference_lr=reference_lr) for r, lr, a in points]
    loo = leave_one_out(
        points,
        reference_lr=reference_lr,
        lr_dependent_exponent=lr_dependent_exponent,
        rank_exponent=rank_exponent,
    )
    return RuleFit(params, intervals, points, censored, ratios, loo, reference_lr, level)
