"""AlphaRule: the α rule as one object (alpha_tuner.rule), and its use by the wrapper."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import tiny_llama
from hypothesis import given
from hypothesis import strategies as st

from alpha_tuner import C_REF, AlphaRule, AlphaTunedOptimizer, create_alpha_tuned_optimizer
from alpha_tuner.principled import principled_alpha
from alpha_tuner.rule import rule_alpha

ranks = st.integers(min_value=1, max_value=1024)
lrs = st.floats(min_value=1e-6, max_value=1e-2)
rules = st.builds(
    AlphaRule,
    c=st.floats(min_value=1.0, max_value=1e4),
    reference_lr=st.floats(min_value=1e-6, max_value=1e-3),
    lr_exponent=st.floats(min_value=0.0, max_value=2.0),
    rank_exponent=st.floats(min_value=-1.0, max_value=1.0),
    rank_exponent_slope=st.floats(min_value=-0.2, max_value=0.2),
)


@given(rule=rules, r=ranks, lr=lrs, rslora=st.booleans())
def test_implied_c_inverts_the_rule(rule: AlphaRule, r: int, lr: float, rslora: bool) -> None:
    alpha = rule.alpha(r, lr, use_rslora=rslora)
    assert rule.implied_c(alpha, r, lr, use_rslora=rslora) == pytest.approx(rule.c, rel=1e-9)
    # Twice the α is twice the c: the column inspect prints scales with α.
    assert rule.implied_c(2 * alpha, r, lr, use_rslora=rslora) == pytest.approx(2 * rule.c, rel=1e-9)


@given(rule=rules, r=ranks, lr=lrs)
def test_the_rule_is_the_formula_and_the_functions(rule: AlphaRule, r: int, lr: float) -> None:
    params = rule.to_dict()
    ref = params.pop("reference_lr")
    assert rule.alpha(r, lr) == pytest.approx(rule_alpha(r, lr, params, reference_lr=ref), rel=1e-12)
    assert rule.alpha(r, lr) == pytest.approx(principled_alpha(r, lr, **rule.to_dict()), rel=1e-12)
    assert rule.multiplier(r, lr) * r == pytest.approx(rule.alpha(r, lr), rel=1e-12)
    assert rule.alpha(r, lr, use_rslora=True) == pytest.approx(
        rule.multiplier(r, lr) * math.sqrt(r), rel=1e-12
    )


def test_default_identity_and_tags() -> None:
    assert AlphaRule().is_default and AlphaRule(c=C_REF).is_default
    assert not AlphaRule(c=C_REF * 2).is_default
    assert AlphaRule().tag == "c=1130@2e-05,q=1.41,p=0"  # the keys of the committed results
    assert AlphaRule(c=280.0, rank_exponent=0.5).tag == "c=280@2e-05,q=1.41"  # the √r law: legacy form
    assert AlphaRule(rank_exponent=0.1, rank_exponent_slope=0.05).tag.endswith(",p=0.1+0.05ln")
    assert len({AlphaRule(c=c).tag for c in (100.0, 1000.0, 1130.0)}) == 3
    assert AlphaRule.from_dict(AlphaRule(c=5.0).to_dict()) == AlphaRule(c=5.0)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"c": 0.0}, "c must"),
        ({"c": True}, "c must"),
        ({"reference_lr": -1e-5}, "reference_lr must"),
        ({"lr_exponent": -0.1}, "lr_exponent must"),
        ({"rank_exponent": math.nan}, "rank_exponent must"),
        ({"rank_exponent_slope": math.inf}, "rank_exponent_slope must"),
    ],
)
def test_invalid_fields_are_named(fields: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AlphaRule(**fields)


def test_from_dict_names_an_unknown_key() -> None:
    with pytest.raises(TypeError, match=r"Unknown rule parameter\(s\) \['alpha'\]"):
        AlphaRule.from_dict({"alpha": 1.0})


def test_the_wrapper_takes_a_rule_and_refuses_a_rule_with_fields() -> None:
    rule = AlphaRule(c=64.0, lr_exponent=0.0)
    model = tiny_llama(r=4)
    opt = AlphaTunedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-4), model, adapt=False, rule=rule)
    assert opt.rule is rule
    assert list(opt.alphas().values()) == pytest.approx([64.0] * len(opt.targets))
    # The keyword shorthand builds the same rule.
    model = tiny_llama(r=4)
    opt = AlphaTunedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-4), model, c=64.0, lr_exponent=0.0)
    assert opt.rule == rule
    with pytest.raises(TypeError, match=r"either rule= or the rule's fields \(c\)"):
        AlphaTunedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-4), model, rule=rule, c=3.0)
    with pytest.raises(TypeError, match=r"rule must be an alpha_tuner\.AlphaRule"):
        AlphaTunedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-4), model, rule={"c": 3.0})  # type: ignore[arg-type]
    # The factory passes rule= to the wrapper, not to AdamW.
    model = tiny_llama(r=4)
    opt = create_alpha_tuned_optimizer(
        model, torch.optim.AdamW, lr=1e-4, rule=dataclasses.replace(rule, c=32.0)
    )
    assert list(opt.alphas().values()) == pytest.approx([32.0] * len(opt.targets))
