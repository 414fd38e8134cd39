"""The step law: its maths (pure functions) and the engine running it on real PEFT models."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alpha_tuner import AlphaTunedOptimizer, StepLaw
from alpha_tuner.adamstate import oscillation_rms
from alpha_tuner.drift import lora_matrices
from alpha_tuner.steplaw import adam_lift, decide_steps, init_steps, observe_steps, placement
from tests.conftest import lm_batch, tiny_llama

positive = st.floats(min_value=1e-6, max_value=1e2)


def _observed(a: float, u: float, *, n: int = 3, law: StepLaw | None = None, scale: float = 1.0):
    law = law or StepLaw()
    state = init_steps(torch.tensor([8.0, 8.0]))
    for _ in range(n):
        state = observe_steps(state, torch.tensor([a, a]), torch.tensor([u, u]), scale, law)
    return state


# ------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("field", "value"),
    [("a_step", 0.0), ("update", -1.0), ("gain", math.inf), ("max_change", 1.0), ("bound", 0.5),
     ("beta", 1.0), ("warmup", 1.5), ("a_step", True), ("adam_floor", 0.0), ("adam_floor", math.nan),
     ("adam_collapse", -0.05), ("adam_collapse", "0.05")],
)  # fmt: skip
def test_bad_settings_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"StepLaw.{field} must satisfy"):
        StepLaw(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [1, "yes", None])
def test_pool_must_be_a_bool(value: object) -> None:
    with pytest.raises(ValueError, match=r"StepLaw\.pool must be True or False"):
        StepLaw(pool=value)  # type: ignore[arg-type]


def test_an_unknown_a_reference_is_named() -> None:
    with pytest.raises(ValueError, match=r"StepLaw.a_reference must be one of \('current', 'initial'\)"):
        StepLaw(a_reference="start")


def test_the_initial_reference_needs_a_norm() -> None:
    state, law = init_steps(torch.tensor([8.0])), StepLaw(a_reference="initial")
    with pytest.raises(ValueError, match="a_reference='initial' needs a_norm"):
        observe_steps(state, torch.tensor([1e-2]), torch.tensor([3e-4]), 1.0, law)


def test_wrapper_rejects_a_non_law() -> None:
    model = tiny_llama()
    with pytest.raises(TypeError, match=r"steps must be an alpha_tuner\.StepLaw"):
        AlphaTunedOptimizer(torch.optim.AdamW(model.parameters()), model, steps=1e-2)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------- maths
def test_on_target_nothing_moves() -> None:
    law = StepLaw()
    new, d_a = decide_steps(_observed(law.a_step, law.update), law)
    torch.testing.assert_close(d_a, torch.zeros(2))
    torch.testing.assert_close(new.log_alpha, torch.full((2,), math.log(8.0)))


@given(a=positive, u=positive)
@settings(max_examples=60, deadline=None)
def test_a_control_step_moves_each_step_toward_its_target_within_the_cap(a: float, u: float) -> None:
    law = StepLaw(max_change=4.0)
    state = _observed(a, u)
    new, d_a = decide_steps(state, law)
    d_b = new.log_alpha - state.log_alpha - d_a
    cap = math.log(4.0) + 1e-5
    e_a, e_b = math.log(law.a_step / a), math.log(law.update / u)
    for d, e in ((d_a, e_a), (d_b, e_b)):
        assert float(d.abs().max()) <= cap
        assert float(d[0]) == pytest.approx(max(-math.log(4.0), min(math.log(4.0), e)), abs=1e-4)
    # The EMAs move by the predicted response: one more step applies what is left of the error.
    torch.testing.assert_close(new.log_a_step, state.log_a_step + d_a)
    torch.testing.assert_close(new.log_balance, d_a)


@given(
    a=st.lists(st.floats(min_value=1e-5, max_value=1.0), min_size=4, max_size=4),
    u=st.lists(st.floats(min_value=1e-7, max_value=1e-1), min_size=4, max_size=4),
    ready=st.lists(st.booleans(), min_size=4, max_size=4),
    movable=st.lists(st.booleans(), min_size=4, max_size=4),
)
@settings(max_examples=60, deadline=None)
def test_a_pooled_law_moves_the_movable_layers_by_the_mean_of_the_ready_ones(
    a: list[float], u: list[float], ready: list[bool], movable: list[bool]
) -> None:
    """``pool=True``: each layer's own move (as the per-layer law makes it) is averaged over the
    layers measured enough, and every movable layer takes that mean; the others do not move."""
    state = init_steps(torch.full((4,), 8.0))
    for _ in range(2):
        state = observe_steps(state, torch.tensor(a), torch.tensor(u), 1.0, StepLaw())
    state = state._replace(n_measured=torch.tensor([1 if r else 0 for r in ready]))
    own, own_d_a = decide_steps(state, StepLaw())
    own_d_b = own.log_alpha - state.log_alpha - own_d_a
    new, d_a = decide_steps(state, StepLaw(pool=True), torch.tensor(movable))
    d_b = new.log_alpha - state.log_alpha - d_a
    count = max(sum(ready), 1)
    for pooled, per_layer in ((d_a, own_d_a), (d_b, own_d_b)):
        mean = float(per_layer.sum()) / count
        expected = torch.tensor([mean if m else 0.0 for m in movable])
        torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new.log_a_step, state.log_a_step + d_a)  # the expected response
    torch.testing.assert_close(new.log_update, state.log_update + d_b, atol=1e-5, rtol=1e-5)


def test_the_pooled_placement_is_the_geometric_mean_of_the_layers() -> None:
    from alpha_tuner.lawlayers import pooled_move

    m, mu = pooled_move([(2.0, 0.5), (8.0, 2.0), (4.0, 1.0)])
    assert m == pytest.approx(4.0) and mu == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least one"):
        pooled_move([])


def test_a_pooled_law_keeps_the_recipes_proportions_between_layers() -> None:
    """On a real PEFT model with one α in the recipe, a pooled law places every layer with the
    same (m, μ), the geometric mean of the per-layer placements, and keeps them equal as it
    moves; the per-layer law does not."""
    kw = {"measure_every": 1, "measure_phases": 1, "control_every": 4}
    per_layer = _train(1e-4, steps=0, **kw)[1]
    model, opt = _train(1e-4, steps=0, law=StepLaw(pool=True), **kw)
    own = torch.tensor(list(per_layer.alphas().values()), dtype=torch.float64)
    alphas = torch.tensor(list(opt.alphas().values()), dtype=torch.float64)
    assert float(own.max() / own.min()) > 1.05  # the layers differ on their own
    assert float(alphas.max() / alphas.min()) == pytest.approx(1.0)
    assert float(alphas[0]) == pytest.approx(float(own.log().mean().exp()), rel=1e-6)
    law = opt.engine.state.law
    assert law is not None
    torch.testing.assert_close(law.log_balance0, law.log_balance0[:1].expand_as(law.log_balance0))
    _fit(model, opt, range(12))
    law = opt.engine.state.law
    assert law is not None
    moved = law.log_balance - law.log_balance0
    assert float(moved.abs().max()) > 0  # the online part acted
    torch.testing.assert_close(moved, moved[:1].expand_as(moved))
    alphas = torch.tensor(list(opt.alphas().values()), dtype=torch.float64)
    assert float(alphas.max() / alphas.min()) == pytest.approx(1.0)


def test_bounds_hold_however_long_the_error_lasts() -> None:
    law = StepLaw(bound=10.0)
    state = _observed(1e-8, 1e-8)
    for _ in range(20):
        state, _ = decide_steps(state, law)
        state = state._replace(
            log_a_step=torch.full((2,), math.log(1e-8)), log_update=torch.full((2,), -18.0)
        )
    assert float(state.log_balance.max()) == pytest.approx(math.log(10.0), rel=1e-5)
    assert float((state.log_alpha - state.log_alpha0).max()) == pytest.approx(2 * math.log(10.0), rel=1e-5)


def test_the_schedule_factor_is_divided_out() -> None:
    """A step at half the LR that moved half as far reads as the same peak-LR step: a decay is kept."""
    full, half = _observed(2e-3, 1e-4), _observed(1e-3, 5e-5, scale=0.5)
    torch.testing.assert_close(full.log_a_step, half.log_a_step)
    torch.testing.assert_close(full.log_update, half.log_update)


@pytest.mark.parametrize("scale", [0.5, 1.0, 0.0, math.inf, math.nan])
def test_a_tensor_schedule_factor_acts_as_the_float(scale: float) -> None:
    """A tensor LR's factor (a 0-dim tensor) folds in as the same host float does, and an
    unusable one (0, inf, NaN) is skipped and counted in the same way."""
    law = StepLaw()
    state = init_steps(torch.tensor([8.0, 8.0]))
    a, u = torch.tensor([1e-2, 3e-3]), torch.tensor([1e-4, 2e-4])
    for _ in range(2):  # twice: the second fold mixes with the first
        host = observe_steps(state, a, u, scale, law)
        device = observe_steps(state, a, u, torch.tensor(scale, dtype=torch.float64), law)
        for name in ("log_a_step", "log_update", "n_measured", "n_skipped"):
            torch.testing.assert_close(getattr(device, name), getattr(host, name), msg=name)
        state = host
    assert state.n_measured.tolist() == ([2, 2] if 0 < scale < math.inf else [0, 0])


def test_invalid_measurements_are_skipped_and_counted() -> None:
    law = StepLaw()
    state = init_steps(torch.tensor([8.0, 8.0, 8.0]))
    a = torch.tensor([1e-2, math.nan, 0.0])
    state = observe_steps(state, a, torch.tensor([1e-4, 1e-4, 1e-4]), 1.0, law)
    assert state.n_measured.tolist() == [1, 0, 0] and state.n_skipped.tolist() == [0, 1, 1]
    state = observe_steps(state, a, torch.tensor([1e-4] * 3), 0.0, law)  # LR 0: nothing is a step
    assert state.n_measured.tolist() == [1, 0, 0] and state.n_skipped.tolist() == [1, 2, 2]
    masked = observe_steps(state, a, a, 1.0, law, mask=torch.tensor([False, False, False]))
    assert masked.n_skipped.tolist() == state.n_skipped.tolist()
    _, d_a = decide_steps(state, law)
    assert d_a[1] == 0 and d_a[2] == 0  # never measured: never moved


def test_placement_puts_the_first_adam_steps_on_target() -> None:
    law = StepLaw(a_step=1e-2, update=3e-4)
    m, mu = placement(
        lr_a=1e-4, lr_b=2e-4, scaling=2.0, rank=4, fan_in=64, fan_out=32,
        a_norm=0.5, weight_norm=4.0, config=law,
    )  # fmt: skip
    a_after = 1e-4 * math.sqrt(4 * 64) / (0.5 / mu)  # A is divided by μ, its step is not
    u_after = 2.0 * m * 2e-4 * math.sqrt(32) * (0.5 / mu) / 4.0
    assert a_after == pytest.approx(1e-2) and u_after == pytest.approx(3e-4)
    assert placement(
        lr_a=1e-4, lr_b=1e-4, scaling=1.0, rank=4, fan_in=8, fan_out=8,
        a_norm=0.0, weight_norm=1.0, config=law,
    ) == (1.0, 1.0)  # fmt: skip


def test_a_smaller_step_rms_places_both_steps_higher_by_its_inverse() -> None:
    """``step_rms = k``: Adam's steps are assumed k× the LR, so A's step (μ) is raised 1/k× and
    B's (``m/μ``) 1/k× too, i.e. α (m) by 1/k²."""
    kw = {"lr_a": 1e-4, "lr_b": 2e-4, "scaling": 2.0, "rank": 4, "fan_in": 64, "fan_out": 32,
          "a_norm": 0.5, "weight_norm": 4.0}  # fmt: skip
    m1, mu1 = placement(**kw, config=StepLaw())  # type: ignore[arg-type]
    m, mu = placement(**kw, config=StepLaw(step_rms=0.25))  # type: ignore[arg-type]
    assert mu == pytest.approx(4 * mu1) and m / mu == pytest.approx(4 * m1 / mu1)
    assert m == pytest.approx(16 * m1)


@pytest.mark.parametrize("value", [0.0, -0.5, float("nan"), float("inf"), True, "0.2"])
def test_a_step_rms_out_of_range_is_named(value: object) -> None:
    with pytest.raises(ValueError, match=r"StepLaw.step_rms must satisfy 0 < step_rms < inf"):
        StepLaw(step_rms=value)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- the engine
def _train(
    lr: float, *, steps: int = 12, alpha: float | None = None, law: StepLaw | None = None, **kw: object
) -> tuple[torch.nn.Module, AlphaTunedOptimizer]:
    model = tiny_llama(seed=3, lora_alpha=alpha) if alpha else tiny_llama(seed=3)
    model = model.double()
    inner = torch.optim.AdamW(model.parameters(), lr=lr, eps=1e-30, weight_decay=0.0)
    opt = AlphaTunedOptimizer(inner, model, steps=law or StepLaw(), head_lr=None, **kw)  # type: ignore[arg-type]
    _fit(model, opt, range(steps))
    return model, opt


def _fit(model: torch.nn.Module, opt: AlphaTunedOptimizer, seeds: range) -> None:
    """One optimizer step on the LM batch of each seed."""
    for i in seeds:
        model(**lm_batch(seed=i)).loss.backward()
        opt.step()
        opt.zero_grad()


def _delta(model: torch.nn.Module, opt: AlphaTunedOptimizer) -> list[torch.Tensor]:
    return [t.scaling * (lora_matrices(t.weight_a, t.weight_b)[1] @ lora_matrices(t.weight_a, t.weight_b)[0])
            for t in opt.targets]  # fmt: skip


@pytest.mark.parametrize("adapt", [False, True], ids=["static", "adaptive"])
def test_the_run_does_not_depend_on_the_base_lr_or_the_recipe_alpha(adapt: bool) -> None:
    """From any base LR and lora_alpha the law trains the same adapter (Adam, ε → 0, no decay)."""
    kw = {"adapt": adapt, "measure_every": 1, "measure_phases": 1, "control_every": 4}
    runs = [_train(lr, alpha=alpha, **kw) for lr, alpha in ((1e-5, None), (1e-3, None), (1e-4, 64.0))]
    deltas = [_delta(*run) for run in runs]
    for other in deltas[1:]:  # Adam's first steps are signs: round-off flips a few near-zero ones
        worst = max(float((y - x).norm() / x.norm()) for x, y in zip(deltas[0], other, strict=True))
        assert worst < 1e-5
    assert all(float(d.norm()) > 0 for d in deltas[0])
    law = runs[0][1].engine.state.law
    assert law is not None
    assert (float((law.log_balance - law.log_balance0).abs().max()) > 0) == adapt  # online part acted


def test_the_online_part_corrects_a_wrong_start() -> None:
    """α × 16 at wrap time (B's step 16× off target): the law brings u back near its target at its
    regular cadence (the fast start, which decides sooner, has its own test below)."""
    kw = {"measure_every": 1, "measure_phases": 1, "control_every": 4, "fast_start": False}
    model, opt = _train(1e-4, steps=0, **kw)
    opt.rescale_({name: a * 16 for name, a in opt.alphas().items()})
    start = dict(opt.alphas())
    _fit(model, opt, range(24))
    law = opt.engine.state.law
    assert law is not None
    ratio = [opt.alphas()[n] / start[n] for n in start]
    assert max(ratio) < 1.0  # every layer's α went down
    assert float((law.log_update - math.log(StepLaw().update)).abs().max()) < math.log(4.0)


@pytest.mark.parametrize("fast", [False, True], ids=["default", "fast-start"])
def test_the_fast_start_corrects_a_far_start_within_the_first_interval(fast: bool, monkeypatch) -> None:
    """α ÷ 64 at wrap time (B's step 64× below target): with ``fast_start`` the law decides after
    every measurement of the first interval (steps 2, 4, 6, 8), each measuring every layer, and
    ends it near the target; without, one decision at step 8 moves α by at most ``max_change``."""
    kw = {"measure_every": 2, "measure_phases": 2, "control_every": 8, "fast_start": fast}
    model, opt = _train(1e-4, steps=0, **kw)
    opt.rescale_({name: a / 64 for name, a in opt.alphas().items()})
    start = dict(opt.alphas())
    decided: list[int] = []
    real = opt.engine._control_step

    def counted() -> None:
        decided.append(opt.engine.state.steps)
        real()

    monkeypatch.setattr(opt.engine, "_control_step", counted)
    for i in range(8):
        model(**lm_batch(seed=i)).loss.backward()
        opt.step()
        opt.zero_grad()
    assert decided == ([2, 4, 6, 8] if fast else [8])
    assert opt.fast_start is fast and f"fast_start={fast}" in repr(opt)
    law = opt.engine.state.law
    assert law is not None and bool((law.n_measured == (4 if fast else 2)).all())  # every layer, each time
    raised = min(opt.alphas()[n] / start[n] for n in start)
    assert (raised > 16.0) == fast  # 4 decisions can undo 64×; one moves it at most 4× (with A's)
    error = float((law.log_update - math.log(StepLaw().update)).abs().max())
    assert (error < math.log(2.0)) == fast


def _non_adam(name: str, params: object) -> torch.optim.Optimizer:
    from transformers.optimization import Adafactor

    builders = {
        "sgd-momentum": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9),
        "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3),
        "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2),
        "adafactor": lambda p: Adafactor(p, lr=1e-3, scale_parameter=False, relative_step=False),
    }
    return builders[name](params)


@pytest.mark.parametrize("name", ["sgd-momentum", "rmsprop", "adagrad", "adafactor"])
def test_non_adam_optimizers_keep_the_static_rule_with_a_warning(name: str) -> None:
    """Outside the Adam family the law does not apply: the run is the rule's run, bit for bit."""
    runs = []
    for law in (StepLaw(), None):
        model = tiny_llama(seed=5)
        inner = _non_adam(name, model.parameters())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt = AlphaTunedOptimizer(inner, model, steps=law, measure_every=1, control_every=4)
        said = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert any("step law needs an Adam-family optimizer" in m for m in said) == (law is not None)
        assert opt.engine.step_law is None and opt.engine.state.law is None
        for i in range(8):
            model(**lm_batch(seed=i)).loss.backward()
            opt.step()
            opt.zero_grad()
        runs.append((model, opt))
    (tuned, tuned_opt), (rule, rule_opt) = runs
    assert tuned_opt.alphas() == rule_opt.alphas()
    moved = 0
    for (key, x), (_, y) in zip(tuned.state_dict().items(), rule.state_dict().items(), strict=True):
        assert torch.equal(x, y), key
        moved += int("lora_B" in key and bool(x.abs().sum() > 0))
    assert moved > 0  # the adapters trained, so the equality is not of two untouched models


_FAST = {"measure_every": 2, "measure_phases": 2, "control_every": 8, "fast_start": True}


@pytest.mark.parametrize(
    ("reference", "cadence", "ahead"),
    [("current", {"measure_every": 1, "measure_phases": 1, "control_every": 3}, 0),
     ("initial", {"measure_every": 1, "measure_phases": 1, "control_every": 3}, 0),
     ("current", _FAST, 0),
     ("current", _FAST, 12)],
    ids=["current", "initial", "saved-in-the-fast-start", "loaded-into-a-run-past-it"],
)  # fmt: skip
def test_state_dict_round_trip_resumes_exactly(reference: str, cadence: dict, ahead: int) -> None:
    kw = {**cadence, "law": StepLaw(a_reference=reference)}
    model, opt = _train(1e-4, steps=7, **kw)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = copy.deepcopy(opt.state_dict())  # the live dict holds the moments themselves
    for i in range(7, 12):
        model(**lm_batch(seed=i)).loss.backward()
        opt.step()
        opt.zero_grad()
    straight = _delta(model, opt)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model2, opt2 = _train(1e-4, steps=ahead, **kw)  # ahead: a run already past the fast start
    model2.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    for i in range(7, 12):
        model2(**lm_batch(seed=i)).loss.backward()
        opt2.step()
        opt2.zero_grad()
    for x, y in zip(straight, _delta(model2, opt2), strict=True):
        torch.testing.assert_close(y, x, rtol=0, atol=0)
    assert opt2.alphas() == opt.alphas()


def test_a_reference_initial_measures_a_against_the_wrap_time_norm() -> None:
    """``a_reference="initial"``: ‖dA‖ over A's wrap-time norm in today's units, ``‖A₀‖/μ``."""
    kw = {"measure_every": 1, "measure_phases": 1, "control_every": 1000, "fast_start": False}  # never moved
    runs = {}
    for reference in ("current", "initial"):
        law = StepLaw(beta=0.0, a_reference=reference)  # beta 0: the state is the last measurement
        model, opt = _train(1e-3, steps=5, law=law, **kw)
        before = torch.stack([lora_matrices(t.weight_a, t.weight_b)[0].norm() for t in opt.targets])
        model(**lm_batch(seed=5)).loss.backward()
        opt.step()
        runs[reference] = (opt.engine.state.law, before.float())
    (current, a_pre), (initial, _) = runs["current"], runs["initial"]
    assert current is not None and initial is not None
    wrap_norm = initial.a_norm0 * torch.exp(-initial.log_balance)  # ‖A₀‖ in today's units
    torch.testing.assert_close(initial.log_a_step - current.log_a_step, torch.log(a_pre / wrap_norm))
    assert float((a_pre / wrap_norm).max()) > 1.001  # A grew: the two references differ


def test_diagnostics_report_the_law() -> None:
    kw = {"measure_every": 1, "measure_phases": 1, "control_every": 4}
    _, opt = _train(1e-4, steps=8, **kw)
    stats = opt.diagnostics()
    law = opt.engine.state.law
    assert law is not None
    assert stats["balance_mean"] == pytest.approx(math.exp(float(law.log_balance.double().mean())))
    assert stats["a_step"] == pytest.approx(math.exp(float(law.log_a_step.double().mean())))
    # The law's own counts: at the first step B = 0, so A's gradient is 0 and A does not move; that
    # step tells the law nothing about A's step and is skipped.
    n = len(opt.targets)
    assert 0 < stats["update"] < 1 and stats["measurements"] == 7 * n and stats["skipped"] == n


def test_gradients_reach_clipping_in_the_recipe_units() -> None:
    """At lr 1e-5 the placement divides A by ~100s; B's gradient must still read as the recipe's."""
    plain = tiny_llama(seed=3).double()
    tuned = tiny_llama(seed=3).double()
    opt = AlphaTunedOptimizer(
        torch.optim.AdamW(tuned.parameters(), lr=1e-5), tuned, steps=StepLaw(), head_lr=None
    )
    law = opt.engine.state.law
    assert law is not None and float(law.log_balance.min()) > math.log(10.0)  # A really was divided
    for model in (plain, tuned):
        model(**lm_batch(seed=0)).loss.backward()
    for (name, p), q in zip(plain.named_parameters(), tuned.parameters(), strict=True):
        if "lora_B" in name:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-15, msg=name)
    assert float(torch.stack([p.grad.norm() for p in plain.parameters() if p.grad is not None]).norm()) > 0


def test_detach_puts_the_moments_back_in_raw_units() -> None:
    from alpha_tuner import attach

    runs = []
    for detach in (False, True):
        model = tiny_llama(seed=3).double()
        inner = torch.optim.AdamW(model.parameters(), lr=1e-4, eps=1e-30, weight_decay=0.0)
        handle = attach(inner, model, steps=StepLaw(), head_lr=None, control_every=1000)
        for i in range(6):
            if i == 5 and detach:
                handle.detach()
            model(**lm_batch(seed=i)).loss.backward()
            inner.step()
            inner.zero_grad()
        runs.append([p.detach().clone() for p in model.parameters() if p.requires_grad])
    for x, y in zip(*runs, strict=True):
        torch.testing.assert_close(y, x, rtol=1e-9, atol=1e-15)


def test_the_head_lr_is_head_lr_exactly_under_the_law() -> None:
    from alpha_tuner import HEAD_LR
    from tests.conftest import tiny_bert_cls

    for base in (1e-5, 1e-2):  # below and above HEAD_LR: both end at HEAD_LR
        model = tiny_bert_cls(modules_to_save=["classifier"])
        opt = AlphaTunedOptimizer(torch.optim.AdamW(model.parameters(), lr=base), model, steps=StepLaw())
        heads = {id(p) for n, p in model.named_parameters() if "modules_to_save" in n and p.requires_grad}
        lrs = {g["lr"] for g in opt.param_groups if any(id(p) in heads for p in g["params"])}
        assert lrs == {HEAD_LR} and opt.head_params_lifted == len(heads) > 0
    plain = tiny_bert_cls(modules_to_save=["classifier"])  # without the law a higher LR is kept
    kept = AlphaTunedOptimizer(torch.optim.AdamW(plain.parameters(), lr=1e-2), plain, steps=None)
    assert kept.head_params_lifted == 0


def test_a_schedule_still_acts_as_set() -> None:
    """A scheduler at a constant factor 0.1 keeps every step 10× smaller: the law does not undo it."""
    kw = {"measure_every": 1, "measure_phases": 1, "control_every": 2}
    deltas = []
    for factor in (1.0, 0.1):
        model = tiny_llama(seed=3).double()
        inner = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-30, weight_decay=0.0)
        opt = AlphaTunedOptimizer(inner, model, steps=StepLaw(), head_lr=None, **kw)
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda _, f=factor: f)
        for i in range(8):
            model(**lm_batch(seed=i)).loss.backward()
            opt.step()
            scheduler.step()
            opt.zero_grad()
        deltas.append(sum(float(d.norm()) for d in _delta(model, opt)))
    assert 0.05 < deltas[1] / deltas[0] < 0.2


def test_saved_adapter_and_merge_reproduce_the_tuned_model(tmp_path: object) -> None:
    from peft import PeftModel

    from tests.conftest import ids_batch

    kw = {"measure_every": 1, "measure_phases": 1, "control_every": 2}
    model, opt = _train(1e-4, steps=6, **kw)
    assert float(opt.engine.state.law.log_balance.abs().max()) > 0  # type: ignore[union-attr]
    model.eval()
    ids = ids_batch()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(str(tmp_path))
    base = tiny_llama(seed=3).double().get_base_model()
    reloaded = PeftModel.from_pretrained(base, str(tmp_path)).double().eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=1e-9, atol=1e-9)
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-9, atol=1e-9)


def test_the_default_is_the_law_for_adam_and_the_rule_otherwise() -> None:
    from alpha_tuner import AlphaRule, ControlConfig

    def law_of(build: object, **kw: object) -> StepLaw | None:
        model = tiny_llama()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the default never warns, whatever the optimizer
            opt = AlphaTunedOptimizer(build(model.parameters()), model, **kw)  # type: ignore[operator]
        return opt.engine.step_law

    adamw = lambda p: torch.optim.AdamW(p, lr=1e-4)  # noqa: E731
    assert law_of(adamw) == StepLaw()
    assert law_of(lambda p: torch.optim.NAdam(p, lr=1e-4)) == StepLaw()
    assert law_of(lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9)) is None
    assert law_of(adamw, steps=None) is None
    # naming the rule or the back-off law asks for them
    assert law_of(adamw, c=100.0) is None
    assert law_of(adamw, rule=AlphaRule()) is None
    assert law_of(adamw, control=ControlConfig()) is None
    assert law_of(adamw, steps=StepLaw(update=1e-3)) == StepLaw(update=1e-3)
    with pytest.raises(TypeError, match=r"steps must be an alpha_tuner\.StepLaw, 'auto' or None"):
        law_of(adamw, steps="on")


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]  # fmt: skip


@pytest.mark.parametrize("pool", [False, True], ids=["per-layer", "pooled"])
@pytest.mark.parametrize("device", DEVICES)
def test_a_layer_whose_base_weight_cannot_be_read_is_left_alone(device: str, pool: bool) -> None:
    """A quantised (non-float) base weight: the law places and moves the other layers and keeps
    this one's recipe α (its ‖W₀‖ is unknown), pooled or not; on CUDA the unknown norm must live
    on the device."""
    model = tiny_llama(seed=3).to(device)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    base = layer.get_base_layer()
    base.weight = torch.nn.Parameter(torch.ones_like(base.weight, dtype=torch.int8), requires_grad=False)
    cadence = {"measure_every": 1, "measure_phases": 1, "control_every": 1}
    opt = AlphaTunedOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-4), model, steps=StepLaw(pool=pool), **cadence
    )
    alphas = opt.alphas()
    frozen = next(name for name in alphas if "layers.0.self_attn.q_proj" in name)
    assert alphas[frozen] == pytest.approx(layer.lora_alpha["default"])
    assert sum(a != pytest.approx(layer.lora_alpha["default"]) for a in alphas.values()) >= 1
    for _ in range(2):
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.randn_like(p)
        opt.step()
    after = opt.alphas()
    assert all(math.isfinite(a) for a in after.values())
    assert after[frozen] == pytest.approx(layer.lora_alpha["default"])
    assert sum(after[n] != pytest.approx(alphas[n]) for n in after) >= 1  # the others moved


def test_a_layer_the_law_cannot_place_is_not_moved_by_the_schedule_shift() -> None:
    """Under a warm-up + decay schedule the first step moves every *placed* layer to the run-mean
    targets; a layer with a quantised base weight was not placed and keeps its recipe α."""
    from transformers import get_linear_schedule_with_warmup

    model = tiny_llama(seed=3)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    base = layer.get_base_layer()
    base.weight = torch.nn.Parameter(torch.ones_like(base.weight, dtype=torch.int8), requires_grad=False)
    opt = AlphaTunedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-4), model)
    scheduler = get_linear_schedule_with_warmup(opt, 2, 20)
    before = opt.alphas()
    for p in model.parameters():  # no forward: the int8 stand-in has no quantised kernel
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    opt.step()
    scheduler.step()
    assert opt.engine.law_schedule.shape is not None and opt.engine.law_schedule.shape.mean < 1.0
    after = opt.alphas()
    frozen = next(name for name in after if "layers.0.self_attn.q_proj" in name)
    assert after[frozen] == before[frozen] == layer.lora_alpha["default"]
    moved = [name for name in after if after[name] != pytest.approx(before[name])]
    assert len(moved) == len(after) - 1  # every placed layer moved to the schedule's targets


def test_the_adam_floor_lifts_only_steps_where_adam_is_below_it() -> None:
    """``a`` and ``u`` are read as if Adam's normalised step were at least the floor."""
    n = 4
    state = init_steps(torch.full((n,), 8.0))
    a, u = torch.full((n,), 1e-2), torch.full((n,), 3e-4)
    rms = torch.tensor([[0.5, 0.1, math.nan, 0.23], [0.05, 0.3, 0.2, math.nan]])
    floored = observe_steps(state, a, u, 1.0, StepLaw(adam_floor=0.23, adam_collapse=None), adam_rms=rms)
    plain = observe_steps(state, a, u, 1.0, StepLaw(adam_floor=None, adam_collapse=None), adam_rms=rms)
    lift_a = torch.tensor([1.0, 2.3, 1.0, 1.0])
    lift_u = torch.tensor([4.6, 1.0, 1.15, 1.0])
    torch.testing.assert_close(floored.log_a_step, plain.log_a_step + lift_a.log())
    torch.testing.assert_close(floored.log_update, plain.log_update + lift_u.log())
    unread = observe_steps(state, a, u, 1.0, StepLaw(adam_floor=0.23))  # no Adam state given
    torch.testing.assert_close(unread.log_a_step, plain.log_a_step)


def _alternating(floor: float | None) -> float:
    """Median log-change of α after 24 steps whose gradient flips sign every step (m̂ → 0)."""
    model = tiny_llama(seed=5).double()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    law = StepLaw(adam_floor=floor)
    opt = AlphaTunedOptimizer(inner, model, steps=law, head_lr=None, measure_every=1, measure_phases=1,
                              control_every=4, fast_start=False)  # fmt: skip
    start = opt.engine.state.law
    assert start is not None
    torch.manual_seed(0)
    grads = {p: torch.randn_like(p) for p in model.parameters() if p.requires_grad}
    for step in range(24):
        for p, g in grads.items():
            p.grad = g.clone() if step % 2 else -g
        opt.step()
    law_state = opt.engine.state.law
    assert law_state is not None
    return float((law_state.log_alpha - start.log_alpha).median())


def test_the_adam_floor_keeps_the_law_from_answering_a_flipping_gradient_with_a_larger_lr() -> None:
    """A gradient whose sign flips every step shrinks Adam's steps ~20× (an overshooting step):
    the law without a floor raises α to restore the measured step; with the floor at the
    noise level it takes the steps for what Adam's own normalisation says and raises far less."""
    without, with_floor = _alternating(None), _alternating(0.23)
    assert without > math.log(8.0)
    assert with_floor < without - math.log(4.0)


def test_the_collapse_level_backs_off_only_below_it_and_multiplies_the_floor() -> None:
    """Below ``adam_collapse`` a step is read as larger by ``collapse / rms`` on top of the floor's
    lift; at or above it nothing changes; NaN (not read) lifts nothing."""
    rms = torch.tensor([[0.5, 0.053, 0.01, math.nan], [0.1, 0.002, 0.0, 0.3]])
    both = adam_lift(rms, StepLaw(adam_floor=0.23, adam_collapse=0.053))
    floor_only = adam_lift(rms, StepLaw(adam_floor=0.23, adam_collapse=None))
    collapse_only = adam_lift(rms, StepLaw(adam_floor=None, adam_collapse=0.053))
    expected_collapse = torch.tensor([[1.0, 1.0, 5.3, 1.0], [1.0, 26.5, 1.0, 1.0]])
    torch.testing.assert_close(collapse_only, expected_collapse)
    torch.testing.assert_close(both, floor_only * expected_collapse)
    assert adam_lift(rms, StepLaw(adam_floor=None, adam_collapse=None)) == 1.0
    # The deepest collapse gives the largest finite lift, never an overflow read as "not lifted".
    deep = adam_lift(torch.tensor([1e-3, 1e-21, 1e-40, math.inf]), StepLaw())
    assert torch.isfinite(deep).all() and deep[2] == deep[1] > deep[0] > 1.0 and deep[3] == 1.0
    assert StepLaw().adam_collapse == pytest.approx(oscillation_rms(0.9), abs=5e-4)
    assert StepLaw().reads_adam and StepLaw(adam_floor=None).reads_adam
    assert not StepLaw(adam_floor=None, adam_collapse=None).reads_adam


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(min_value=0.053, max_value=3.0), min_size=8, max_size=8), positive, positive)
def test_above_the_collapse_level_the_law_is_bit_identical_to_the_floor_alone(
    rms: list[float], a: float, u: float
) -> None:
    """Where Adam's step is at or above the collapse level, the state with it is exactly the
    state without it: runs that never collapse are the runs they were."""
    state = init_steps(torch.full((4,), 8.0))
    adam = torch.tensor(rms, dtype=torch.float32).reshape(2, 4)
    a_t, u_t = torch.full((4,), a * 1e-2), torch.full((4,), u * 1e-4)
    with_it = observe_steps(state, a_t, u_t, 0.7, StepLaw(adam_collapse=0.053), adam_rms=adam)
    without = observe_steps(state, a_t, u_t, 0.7, StepLaw(adam_collapse=None), adam_rms=adam)
    for x, y in zip(with_it, without, strict=True):
        assert torch.equal(x, y)
    assert int(with_it.n_collapsed.sum()) == 0


def test_collapsed_measurements_are_counted_per_layer() -> None:
    """A layer is counted once per measurement where A's or B's step is below the level."""
    rms = torch.tensor([[0.3, 0.01, 0.3, 0.0], [0.3, 0.3, 0.02, math.nan]])
    state = init_steps(torch.full((4,), 8.0))
    a, u = torch.full((4,), 1e-2), torch.full((4,), 3e-4)
    for _ in range(2):
        state = observe_steps(state, a, u, 1.0, StepLaw(), adam_rms=rms)
    assert state.n_collapsed.tolist() == [0, 2, 2, 0]  # rms 0 or NaN: not read, not lifted


def _after_burst(collapse: float | None) -> float:
    """Median log-change of α over 48 steps of small noisy gradients that follow 8 steps of
    gradients 10⁴ times larger: Adam's ``v̂`` remembers the burst and its steps collapse (once
    the burst's momentum has decayed, after about 20 steps)."""
    model = tiny_llama(seed=5).double()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    law = StepLaw(adam_collapse=collapse)
    opt = AlphaTunedOptimizer(inner, model, steps=law, head_lr=None, measure_every=1, measure_phases=1,
                              control_every=4, fast_start=False)  # fmt: skip
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(0)
    for _ in range(8):
        for p in params:
            p.grad = 1e2 * torch.randn(p.shape, generator=gen, dtype=p.dtype)
        opt.step()
    start = opt.engine.state.law
    assert start is not None
    for _ in range(48):
        for p in params:
            p.grad = 1e-2 * torch.randn(p.shape, generator=gen, dtype=p.dtype)
        opt.step()
    law_state = opt.engine.state.law
    assert law_state is not None
    counted = opt.diagnostics()["collapsed"]
    assert (counted > 0) == (collapse is not None)
    return float((law_state.log_alpha - start.log_alpha).median())


def test_after_a_gradient_burst_the_collapse_level_backs_the_steps_off() -> None:
    """After a burst, Adam's normalised step falls ~10⁴× below the noise level: the floor alone
    does not back the layers' steps off; with the collapse level the law does, by more than
    two control steps' worth."""
    held, backed_off = _after_burst(None), _after_burst(0.053)
    assert held > -math.log(2.0)
    assert backed_off < held - 2 * math.log(4.0)
