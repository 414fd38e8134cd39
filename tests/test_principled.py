"""The principled α rule: exact rank power law and documented learning-rate dependence."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import pytest
import torch
from conftest import tiny_llama
from hypothesis import given
from hypothesis import strategies as st

from alpha_tuner import AlphaTunedOptimizer
from alpha_tuner.principled import (
    C_REF,
    LR_EXPONENT,
    MAX_CALIBRATED_RANK,
    REFERENCE_LR,
    principled_alpha,
    principled_alphas,
    principled_coefficient,
    principled_multiplier,
    principled_rank_exponent,
)

ranks = st.integers(min_value=1, max_value=4096)
lrs = st.floats(min_value=1e-7, max_value=1e-1)


exponents = st.floats(min_value=-1.0, max_value=1.0)


@given(r=ranks, lr=lrs)
def test_alpha_follows_the_rank_power_law_exactly(r: int, lr: float) -> None:
    c, p = principled_coefficient(lr), principled_rank_exponent(lr)
    assert principled_alpha(r, lr) == pytest.approx(c * r**p, rel=1e-12)
    assert principled_alpha(4 * r, lr) == pytest.approx(4**p * principled_alpha(r, lr), rel=1e-12)
    # rsLoRA convention: same multiplier, alpha = c * r**(p - 1/2)
    assert principled_alpha(r, lr, use_rslora=True) == pytest.approx(c * r ** (p - 0.5), rel=1e-12)
    assert principled_multiplier(r, lr) == pytest.approx(c * r ** (p - 1), rel=1e-12)


@given(r=ranks, lr=lrs)
def test_rank_exponent_one_half_is_the_papers_sqrt_rank_law(r: int, lr: float) -> None:
    rule = {"rank_exponent": 0.5, "rank_exponent_slope": 0.0}
    c = principled_coefficient(lr)
    assert principled_alpha(r, lr, **rule) == pytest.approx(c * math.sqrt(r), rel=1e-12)
    assert principled_alpha(r, lr, use_rslora=True, **rule) == pytest.approx(c, rel=1e-12)


@given(lr=lrs, k=st.floats(min_value=0.01, max_value=100), p0=exponents, p1=exponents)
def test_rank_exponent_moves_with_the_log_of_the_lr(lr: float, k: float, p0: float, p1: float) -> None:
    p = principled_rank_exponent(lr, rank_exponent=p0, rank_exponent_slope=p1)
    assert principled_rank_exponent(lr * k, rank_exponent=p0, rank_exponent_slope=p1) == pytest.approx(
        p + p1 * math.log(k), abs=1e-9
    )
    assert principled_rank_exponent(REFERENCE_LR, rank_exponent=p0, rank_exponent_slope=p1) == p0


@given(lr=lrs, k=st.floats(min_value=0.01, max_value=100))
def test_coefficient_scales_with_lr_as_documented(lr: float, k: float) -> None:
    ratio = principled_coefficient(lr * k) / principled_coefficient(lr)
    assert ratio == pytest.approx(k**-LR_EXPONENT, rel=1e-9)


def test_reference_point() -> None:
    assert principled_coefficient(REFERENCE_LR) == C_REF
    assert principled_coefficient(1e-3, lr_exponent=0.0) == C_REF
    assert principled_alpha(16, REFERENCE_LR, c=10.0, rank_exponent=0.5) == pytest.approx(40.0)
    assert principled_alpha(16, REFERENCE_LR, c=10.0, rank_exponent=0.0, rank_exponent_slope=1.0) == 10.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 0, "lr": 1e-4}, "rank"),
        ({"rank": 2.0, "lr": 1e-4}, "rank"),
        ({"rank": 4, "lr": 0.0}, "lr"),
        ({"rank": 4, "lr": float("nan")}, "lr"),
        ({"rank": 4, "lr": 1e-4, "c": -1.0}, "c must"),
        ({"rank": 4, "lr": 1e-4, "lr_exponent": -0.5}, "lr_exponent"),
        ({"rank": 4, "lr": 1e-4, "rank_exponent": float("inf")}, "rank_exponent must"),
        ({"rank": 4, "lr": 1e-4, "rank_exponent_slope": float("nan")}, "rank_exponent_slope must"),
    ],
)
def test_invalid_inputs(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        principled_alpha(**kwargs)  # type: ignore[arg-type]


@dataclass
class _Layer:
    rank: int
    use_rslora: bool
    weight_a: torch.Tensor


def test_principled_alphas_use_each_group_base_lr() -> None:
    layers = [_Layer(16, False, torch.zeros(16, 4)), _Layer(4, True, torch.zeros(4, 4))]
    groups = [
        {"params": [layers[0].weight_a], "lr": 1.0, "initial_lr": 2e-5},  # a scheduler's base LR
        {"params": [layers[1].weight_a], "lr": torch.tensor(8e-5)},  # a tensor LR
    ]
    alphas = principled_alphas(layers, groups)
    assert alphas == [pytest.approx(principled_alpha(16, 2e-5)),
                      pytest.approx(principled_alpha(4, 8e-5, use_rslora=True))]  # fmt: skip


def test_principled_alphas_fall_back_to_the_reference_lr_with_a_warning() -> None:
    layer = _Layer(8, False, torch.zeros(8, 4))
    with pytest.warns(RuntimeWarning, match="no positive learning rate"):
        alphas = principled_alphas([layer], [{"params": [layer.weight_a], "lr": None}], c=10.0)
    assert alphas == [pytest.approx(principled_alpha(8, REFERENCE_LR, c=10.0))]


def test_ranks_above_the_calibrated_range_warn_unless_the_rule_is_given() -> None:
    big = _Layer(MAX_CALIBRATED_RANK * 2, False, torch.zeros(MAX_CALIBRATED_RANK * 2, 4))
    small = _Layer(MAX_CALIBRATED_RANK, False, torch.zeros(MAX_CALIBRATED_RANK, 4))
    groups = [{"params": [big.weight_a, small.weight_a], "lr": 2e-5}]
    with pytest.warns(UserWarning, match=rf"rank\(s\) \[{MAX_CALIBRATED_RANK * 2}\] exceed .* Pass c="):
        alphas = principled_alphas([big, small], groups)
    assert alphas[0] == pytest.approx(principled_alpha(MAX_CALIBRATED_RANK * 2, 2e-5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        principled_alphas([small], groups)  # within the measured ranks: silent
        principled_alphas([big], groups, c=62.0)  # the user chose c: silent
        principled_alphas([big], groups, rank_exponent=0.5)  # or the rank exponent: silent


def test_the_wrapper_warns_for_a_rank_above_the_calibrated_range() -> None:
    model = tiny_llama(r=MAX_CALIBRATED_RANK * 2)
    with pytest.warns(UserWarning, match="exceed the largest rank"):
        AlphaTunedOptimizer(torch.optim.AdamW(model.parameters(), lr=2e-5), model)
    model = tiny_llama(r=MAX_CALIBRATED_RANK * 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        AlphaTunedOptimizer(torch.optim.AdamW(model.parameters(), lr=2e-5), model, c=62.0)
