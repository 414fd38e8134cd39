"""The joint fit of the α rule over ranks and learning rates (research.rule_fit)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from alpha_tuner.principled import principled_alpha
from research.rule_fit import bootstrap_rule, fit_rule, leave_one_out, rule_alpha

RANKS = (4, 16, 64, 256)
LRS = (2e-5, 8e-5, 3.2e-4)
TRUE = {"c": 900.0, "lr_exponent": 1.5, "rank_exponent": 0.05, "rank_exponent_slope": 0.06}


def _points(params: dict[str, float]) -> list[tuple[int, float, float]]:
    return [(r, lr, rule_alpha(r, lr, params)) for r in RANKS for lr in LRS]


@given(
    c=st.floats(min_value=1.0, max_value=1e4),
    q=st.floats(min_value=0.0, max_value=2.0),
    p0=st.floats(min_value=-0.5, max_value=1.0),
    p1=st.floats(min_value=-0.3, max_value=0.3),
)
def test_fit_rule_recovers_the_parameters_of_its_own_predictions(
    c: float, q: float, p0: float, p1: float
) -> None:
    params = {"c": c, "lr_exponent": q, "rank_exponent": p0, "rank_exponent_slope": p1}
    fit = fit_rule(_points(params))
    assert fit["c"] == pytest.approx(c, rel=1e-8)
    for name in ("lr_exponent", "rank_exponent", "rank_exponent_slope"):
        assert fit[name] == pytest.approx(params[name], abs=1e-8)


@given(
    r=st.integers(min_value=1, max_value=4096),
    lr=st.floats(min_value=1e-7, max_value=1e-1),
    c=st.floats(min_value=1.0, max_value=1e4),
    q=st.floats(min_value=0.0, max_value=2.0),
    p0=st.floats(min_value=-0.5, max_value=1.0),
    p1=st.floats(min_value=-0.3, max_value=0.3),
)
def test_rule_alpha_is_the_librarys_formula(
    r: int, lr: float, c: float, q: float, p0: float, p1: float
) -> None:
    params = {"c": c, "lr_exponent": q, "rank_exponent": p0, "rank_exponent_slope": p1}
    assert rule_alpha(r, lr, params) == pytest.approx(principled_alpha(r, lr, **params), rel=1e-12)


def test_constant_exponent_fit_sets_the_slope_to_zero_and_averages_the_exponent() -> None:
    fit = fit_rule(_points(TRUE), lr_dependent_exponent=False)
    assert fit["rank_exponent_slope"] == 0.0
    # the exponent of each LR is p0 + p1*ln(lr/2e-5); the least-squares constant is their mean
    mean_p = np.mean(
        [TRUE["rank_exponent"] + TRUE["rank_exponent_slope"] * math.log(lr / 2e-5) for lr in LRS]
    )
    assert fit["rank_exponent"] == pytest.approx(mean_p, abs=1e-9)


@given(
    c=st.floats(min_value=1.0, max_value=1e4),
    q=st.floats(min_value=0.0, max_value=2.0),
    p=st.floats(min_value=-0.5, max_value=1.0),
)
def test_fixed_rank_exponent_recovers_c_and_q_and_keeps_p(c: float, q: float, p: float) -> None:
    params = {"c": c, "lr_exponent": q, "rank_exponent": p, "rank_exponent_slope": 0.0}
    fit = fit_rule(_points(params), rank_exponent=p)
    assert fit["c"] == pytest.approx(c, rel=1e-8)
    assert fit["lr_exponent"] == pytest.approx(q, abs=1e-8)
    assert (fit["rank_exponent"], fit["rank_exponent_slope"]) == (p, 0.0)


def test_a_wrong_fixed_exponent_is_worse_out_of_sample_than_the_true_one() -> None:
    rng = np.random.default_rng(3)
    flat = {"c": 1000.0, "lr_exponent": 1.4, "rank_exponent": 0.0, "rank_exponent_slope": 0.0}
    noisy = [(r, lr, a * math.exp(0.1 * rng.standard_normal())) for r, lr, a in _points(flat)]

    def rms(p: float | None) -> float:
        loo = leave_one_out(noisy, lr_dependent_exponent=False, rank_exponent=p)
        return math.sqrt(np.mean(np.log(loo) ** 2))

    assert rms(0.0) < rms(None) < rms(0.5)  # the true form, the free one, the wrong one
    assert math.exp(rms(0.5)) > 1.5  # √r at r = 4 … 256 misses a flat α* by far


def test_fixed_rank_exponent_needs_two_learning_rates() -> None:
    fit_rule([(4, 2e-5, 1.0), (4, 8e-5, 2.0)], rank_exponent=0.0)  # one rank is enough
    with pytest.raises(ValueError, match="two or more learning rates"):
        fit_rule([(r, 2e-5, 1.0) for r in RANKS], rank_exponent=0.0)
    with pytest.raises(ValueError, match="rank_exponent must be finite"):
        fit_rule(_points(TRUE), rank_exponent=math.nan)


def test_fit_rule_names_what_is_missing() -> None:
    one_rank = [(16, lr, 100.0) for lr in LRS]
    one_lr = [(r, 2e-5, 100.0) for r in RANKS]
    ranks_at_one_lr = [(4, 2e-5, 1.0), (16, 2e-5, 2.0), (4, 8e-5, 1.0)]
    for points in (one_rank, one_lr, []):
        with pytest.raises(ValueError, match="two or more ranks and learning rates"):
            fit_rule(points)
    fit_rule(ranks_at_one_lr, lr_dependent_exponent=False)  # three parameters: enough
    with pytest.raises(ValueError, match="two ranks at each of two"):
        fit_rule(ranks_at_one_lr)


def _tables(params: dict[str, float], *, noise: float, seeds: int, rng: np.random.Generator) -> dict:
    """Per LR and rank, a loss parabola in log α around the rule's α, with seed noise."""
    tables: dict = {}
    for lr in LRS:
        tables[lr] = {}
        for r in RANKS:
            center = math.log(rule_alpha(r, lr, params))
            alphas = [math.exp(center + k * math.log(2) + 0.3) for k in range(-4, 4)]
            mean = 0.4 + 0.05 * (np.log(alphas) - center) ** 2
            tables[lr][r] = (alphas, (mean + rng.normal(0, noise, (seeds, len(alphas)))).tolist())
    return tables


def test_bootstrap_rule_recovers_the_rule_with_intervals_that_cover_it() -> None:
    fit = bootstrap_rule(_tables(TRUE, noise=0.002, seeds=3, rng=np.random.default_rng(3)), n_boot=200)
    assert fit.params["c"] == pytest.approx(TRUE["c"], rel=0.15)
    for name in ("lr_exponent", "rank_exponent", "rank_exponent_slope"):
        assert fit.params[name] == pytest.approx(TRUE[name], abs=0.05)
        lo, hi = fit.intervals[name]
        assert lo < fit.params[name] < hi
    assert fit.max_factor < 1.3
    assert not any(fit.censored)
    assert len(fit.points) == len(RANKS) * len(LRS)


def test_bootstrap_rule_intervals_widen_with_noise_and_are_nan_with_one_seed() -> None:
    quiet = bootstrap_rule(_tables(TRUE, noise=0.001, seeds=3, rng=np.random.default_rng(4)), n_boot=200)
    loud = bootstrap_rule(_tables(TRUE, noise=0.02, seeds=3, rng=np.random.default_rng(4)), n_boot=200)
    width = lambda f: f.intervals["rank_exponent"][1] - f.intervals["rank_exponent"][0]  # noqa: E731
    assert width(loud) > width(quiet)
    single = bootstrap_rule(_tables(TRUE, noise=0.0, seeds=1, rng=np.random.default_rng(0)), n_boot=10)
    assert all(math.isnan(v) for interval in single.intervals.values() for v in interval)
    assert single.params["rank_exponent"] == pytest.approx(TRUE["rank_exponent"], abs=0.02)


def test_ratios_single_out_a_point_the_rule_cannot_follow() -> None:
    tables = _tables(TRUE, noise=0.0, seeds=2, rng=np.random.default_rng(0))
    moved = _tables({**TRUE, "c": TRUE["c"] * 4}, noise=0.0, seeds=2, rng=np.random.default_rng(0))
    tables[8e-5][16] = moved[8e-5][16]  # one cell's optimum 4x higher than the rule's
    fit = bootstrap_rule(tables, n_boot=5)
    worst = int(np.argmax([abs(math.log(q)) for q in fit.ratios]))
    assert fit.points[worst][:2] == (16, 8e-5)
    assert fit.ratios[worst] > 1.5
    assert fit.max_factor == pytest.approx(fit.ratios[worst])
    ratio = fit.points[worst][2] / rule_alpha(16, 8e-5, fit.params)
    assert fit.ratios[worst] == pytest.approx(ratio)


def test_leave_one_out_predicts_exact_points_and_flags_a_point_the_others_do_not_imply() -> None:
    points = _points(TRUE)
    assert all(q == pytest.approx(1.0, rel=1e-8) for q in leave_one_out(points))
    moved = [(r, lr, a * (3.0 if (r, lr) == (64, 8e-5) else 1.0)) for r, lr, a in points]
    loo = leave_one_out(moved)
    worst = int(np.argmax([abs(math.log(q)) for q in loo]))
    assert moved[worst][:2] == (64, 8e-5)
    assert loo[worst] == pytest.approx(3.0, rel=1e-6)  # the other eleven points still follow TRUE exactly
    # two points at one LR: without either, the exponent's LR slope is undetermined there
    few = [(4, 2e-5, 1.0), (16, 2e-5, 2.0), (4, 8e-5, 1.0), (16, 8e-5, 3.0)]
    assert all(math.isnan(q) for q in leave_one_out(few))
    assert all(math.isfinite(q) for q in leave_one_out(few, lr_dependent_exponent=False))
