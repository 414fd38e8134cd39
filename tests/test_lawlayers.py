"""alpha_tuner.lawlayers: the step law's reads from and writes to real PEFT layers."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_llama
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from alpha_tuner import StepLaw, lawlayers
from alpha_tuner.discovery import find_lora_targets
from alpha_tuner.drift import lora_matrices
from alpha_tuner.gradunits import GradUnits
from alpha_tuner.steplaw import UNPLACED, init_steps, placement


def test_layer_norms_are_the_factor_and_base_weight_norms() -> None:
    targets = find_lora_targets(tiny_llama(seed=1))
    norms = lawlayers.layer_norms(targets)
    assert norms.shape == (2, len(targets))
    for i, t in enumerate(targets):
        assert float(norms[0, i]) == pytest.approx(float(t.weight_a.detach().norm()), rel=1e-6)
        weight = t.layer.get_base_layer().weight
        assert float(norms[1, i]) == pytest.approx(float(weight.detach().norm()), rel=1e-6)


def test_an_unreadable_base_weight_gives_nan_and_the_layer_is_not_placed() -> None:
    model = tiny_llama(seed=1)
    targets = find_lora_targets(model)
    base = targets[0].layer.get_base_layer()
    base.weight = nn.Parameter(torch.empty(base.weight.shape, device="meta"), requires_grad=False)
    norms = lawlayers.layer_norms(targets)
    assert math.isnan(float(norms[1, 0])) and not torch.isnan(norms[1, 1:]).any()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-4)
    alphas, balances, placed = lawlayers.place_layers(targets, inner, StepLaw(), norms)
    assert placed[0] is False and all(placed[1:])
    assert (alphas[0] / targets[0].alpha, balances[0]) == UNPLACED


def test_placement_reads_the_schedule_base_lr_of_each_factor() -> None:
    """A scheduler built before wrapping has lowered ``lr``: the placement takes ``initial_lr``,
    per factor (LoRA+-style groups give A and B their own)."""
    model = tiny_llama(seed=2)
    targets = find_lora_targets(model)
    a_params = [t.weight_a for t in targets]
    b_params = [t.weight_b for t in targets]
    inner = torch.optim.AdamW([{"params": a_params, "lr": 1e-4}, {"params": b_params, "lr": 1.6e-3}])
    for group in inner.param_groups:
        group["initial_lr"], group["lr"] = group["lr"], 0.0  # a warm-up's first factor
    law = StepLaw()
    norms = lawlayers.layer_norms(targets)
    alphas, balances, placed = lawlayers.place_layers(targets, inner, law, norms)
    assert all(placed)
    for i, t in enumerate(targets):
        a2d, b2d = lora_matrices(t.weight_a, t.weight_b)
        m, mu = placement(
            lr_a=1e-4, lr_b=1.6e-3, scaling=t.scaling, rank=t.rank, fan_in=a2d.shape[1],
            fan_out=b2d.shape[0], a_norm=float(norms[0, i]), weight_norm=float(norms[1, i]), config=law,
        )  # fmt: skip
        assert alphas[i] == pytest.approx(t.alpha * m, rel=1e-6)
        assert balances[i] == pytest.approx(mu, rel=1e-6)


@given(
    placed=st.lists(st.booleans(), min_size=1, max_size=6),
    m=st.floats(1e-3, 1e3),
    mu=st.floats(1e-3, 1e3),
)
def test_the_schedule_shift_moves_only_the_placed_layers(placed: list[bool], m: float, mu: float) -> None:
    n = len(placed)
    law = init_steps(torch.linspace(1.0, 8.0, n), balance0=torch.linspace(0.5, 2.0, n))
    mask = torch.tensor(placed)
    shifted = lawlayers.schedule_shifted(law, mask, m, mu)
    by = {
        "log_alpha": math.log(m),
        "log_alpha0": math.log(m),
        "log_balance": math.log(mu),
        "log_balance0": math.log(mu),
    }
    for field, before in law._asdict().items():
        after = getattr(shifted, field)
        expected = torch.where(mask, before + by[field], before) if field in by else before
        assert torch.equal(after, expected), field


def test_unit_rows_round_trip_through_restore() -> None:
    """Saved rows come back exactly; an entry without rows gets the units the law's state implies."""
    targets = find_lora_targets(tiny_llama(seed=0, lora_bias=True))
    assert all(t.bias_b is not None for t in targets)
    units = GradUnits(lawlayers.all_factors(targets))
    n = len(targets)
    law = init_steps(
        torch.full((n,), 4.0), balance0=torch.full((n,), 8.0), alpha_recipe=torch.full((n,), 16.0)
    )
    lawlayers.restore_units(targets, units, law, None)
    implied = lawlayers.unit_rows(targets, units)
    assert len(implied) == len(targets)
    for k_a, k_b, k_bias in implied:
        assert k_a == pytest.approx(1 / 8) and k_b == pytest.approx(8 * 16 / 4)
        assert k_bias == pytest.approx(16 / 4)
    saved = {0: [0.5, 3.0, 2.0]}
    lawlayers.restore_units(targets, units, law, saved)
    rows = lawlayers.unit_rows(targets, units)
    assert rows[0] == pytest.approx(saved[0])
    assert all(row == pytest.approx(before) for row, before in zip(rows[1:], implied[1:], strict=True))


def test_remove_units_puts_the_moments_back_in_raw_units() -> None:
    model = tiny_llama(seed=4)
    targets = find_lora_targets(model)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    units = GradUnits(lawlayers.all_factors(targets))
    model(input_ids=torch.randint(0, 64, (2, 8)), labels=torch.randint(0, 64, (2, 8))).loss.backward()
    inner.step()
    a = targets[0].weight_a
    before = inner.state[a]["exp_avg"].clone(), inner.state[a]["exp_avg_sq"].clone()
    units.set_(a, 0.25)  # A's gradient was reported ×0.25: its moments are in recipe units
    lawlayers.remove_units(targets, units, inner)
    assert len(units) == 0
    torch.testing.assert_close(inner.state[a]["exp_avg"], before[0] / 0.25)
    torch.testing.assert_close(inner.state[a]["exp_avg_sq"], before[1] / 0.25**2)


def test_start_law_keeps_the_placement_and_the_update_is_scaling_times_signal_over_w0() -> None:
    """The wrap-time state holds α after placement, the recipe's α and the balance; the layers'
    constants give ``u = (α/divisor)·signal/‖W₀‖`` exactly as the engine measures it."""
    targets = find_lora_targets(tiny_llama(seed=2))
    norms = lawlayers.layer_norms(targets)
    n = len(targets)
    alpha0 = torch.linspace(2.0, 40.0, n)
    placed = [i % 2 == 0 for i in range(n)]
    state, layers = lawlayers.start_law(
        targets, alpha0, norms, recipe_alphas=[8.0] * n, balances=[0.5] * n, placed=placed
    )
    torch.testing.assert_close(state.log_alpha, alpha0.log())
    torch.testing.assert_close(state.log_alpha_recipe, torch.full((n,), math.log(8.0)))
    torch.testing.assert_close(state.log_balance0, torch.full((n,), math.log(0.5)))
    torch.testing.assert_close(state.a_norm0, norms[0])
    assert layers.placed == placed and layers.placed_mask.tolist() == placed
    signal = torch.rand(n) + 0.1
    divisors = torch.tensor([t.divisor for t in targets], dtype=torch.float32)
    expected = alpha0 / divisors * signal / norms[1]
    torch.testing.assert_close(layers.update(state.log_alpha, signal), expected)
    unbalanced, _ = lawlayers.start_law(
        targets, alpha0, norms, recipe_alphas=[8.0] * n, balances=None, placed=placed
    )
    assert torch.equal(unbalanced.log_balance0, torch.zeros(n))
