"""Function-preserving rescale: outputs, group law, optimizer state, save/load and merge."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from conftest import ids_batch, lm_batch, make_convnet, randomize_lora_b, tiny_gpt2, tiny_llama
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from alpha_tuner import AlphaTunedOptimizer, find_lora_targets
from alpha_tuner.gradunits import GradUnits
from alpha_tuner.rescale import STATE_EXPONENTS, rescale_target_, rescale_targets_

KINDS: dict[str, Callable[[], nn.Module]] = {
    "conv+emb+linear": lambda: make_convnet(),
    "dora": lambda: make_convnet(use_dora=True),
    "rslora": lambda: make_convnet(use_rslora=True),
    "gpt2-conv1d": lambda: tiny_gpt2(),
    "conv-bias": lambda: make_convnet(lora_bias=True, target_modules=["conv1", "conv2", "lin"]),
    "llama-bias": lambda: tiny_llama(lora_bias=True, target_modules=["q_proj", "v_proj", "down_proj"]),
}


def _forward(model: nn.Module) -> torch.Tensor:
    model.eval()
    if isinstance(model.base_model.model, nn.Module) and hasattr(model.base_model.model, "config"):
        return model(input_ids=lm_batch()["input_ids"]).logits
    return model(ids_batch())


def _trained(
    kind: str, steps: int = 2, dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, AlphaTunedOptimizer]:
    model = KINDS[kind]().to(dtype)
    randomize_lora_b(model)
    opt = AlphaTunedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, init="keep", adapt=False)
    model.train()
    for _ in range(steps):
        out = _forward(model)
        model.train()
        out.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


_CACHE: dict[str, tuple[nn.Module, AlphaTunedOptimizer]] = {}


def _cached(kind: str) -> tuple[nn.Module, AlphaTunedOptimizer]:
    if kind not in _CACHE:
        _CACHE[kind] = _trained(kind, dtype=torch.float64)
    return _CACHE[kind]


alphas = st.floats(min_value=0.05, max_value=500.0)


@given(kind=st.sampled_from(sorted(KINDS)), alpha=alphas, which=st.integers(0, 100))
def test_outputs_unchanged_by_rescale(kind: str, alpha: float, which: int) -> None:
    model, opt = _cached(kind)
    before = _forward(model)
    names = list(opt.alphas())
    opt.rescale_({names[which % len(names)]: alpha})
    assert opt.alphas()[names[which % len(names)]] == alpha
    torch.testing.assert_close(_forward(model), before, rtol=1e-10, atol=1e-12)
    opt.rescale_(alpha)  # every layer at once
    torch.testing.assert_close(_forward(model), before, rtol=1e-10, atol=1e-12)


def _snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    params = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    state = [
        v.clone() for p in model.parameters() for v in opt.state.get(p, {}).values() if torch.is_tensor(v)
    ]
    return params, state


@given(kind=st.sampled_from(sorted(KINDS)), a1=alphas, a2=alphas)
def test_rescale_is_a_group_action(kind: str, a1: float, a2: float) -> None:
    model, opt = _cached(kind)
    opt.rescale_(a1)
    params0, state0 = _snapshot(model, opt)
    opt.rescale_(a2)
    opt.rescale_(a1)
    params1, state1 = _snapshot(model, opt)
    assert len(state0) == len(state1) > 0
    for x, y in zip(params0 + state0, params1 + state1, strict=True):
        torch.testing.assert_close(y, x, rtol=1e-12, atol=0)


def test_adam_state_follows_the_factor() -> None:
    model, opt = _trained("llama-bias", steps=3)
    target = find_lora_targets(model)[0]
    exp_avg = opt.state[target.weight_b]["exp_avg"].clone()
    exp_avg_sq = opt.state[target.weight_b]["exp_avg_sq"].clone()
    bias_sq = opt.state[target.bias_b]["exp_avg_sq"].clone()  # type: ignore[index]
    step = opt.state[target.weight_b]["step"].clone()
    a_state = opt.state[target.weight_a]["exp_avg"].clone()
    m = rescale_target_(target, target.alpha * 4, opt.optimizer)
    assert m == pytest.approx(0.25)
    torch.testing.assert_close(opt.state[target.weight_b]["exp_avg"], exp_avg / m)
    torch.testing.assert_close(opt.state[target.weight_b]["exp_avg_sq"], exp_avg_sq / m**2)
    torch.testing.assert_close(opt.state[target.bias_b]["exp_avg_sq"], bias_sq / m**2)  # type: ignore[index]
    assert torch.equal(opt.state[target.weight_b]["step"], step)
    assert torch.equal(opt.state[target.weight_a]["exp_avg"], a_state)  # A is never touched


def test_sgd_momentum_and_adafactor_are_rescaled() -> None:
    from transformers.optimization import Adafactor

    for make in (
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
        lambda ps: Adafactor(ps, lr=1e-2, relative_step=False, scale_parameter=False, warmup_init=False),
    ):
        model = tiny_llama(target_modules=["q_proj"])
        randomize_lora_b(model)
        opt = AlphaTunedOptimizer(make(model.parameters()), model, init="keep", adapt=False)
        for _ in range(2):
            model(**lm_batch()).loss.backward()
            opt.step()
            opt.zero_grad()
        before = _forward(model)
        opt.rescale_(3.0)
        torch.testing.assert_close(_forward(model), before, rtol=1e-5, atol=1e-6)
        assert all(opt.state[t.weight_b] for t in opt.targets)  # known state is kept, not reset


def test_unknown_optimizer_state_is_reset_with_one_warning() -> None:
    class Custom(torch.optim.Optimizer):
        def __init__(self, params: object) -> None:
            super().__init__(params, {"lr": 0.01})

        @torch.no_grad()
        def step(self, closure: object = None) -> None:
            for g in self.param_groups:
                for p in g["params"]:
                    if p.grad is not None:
                        buf = self.state[p].setdefault("trace", torch.zeros_like(p))
                        buf.mul_(0.9).add_(p.grad)
                        p.sub_(g["lr"] * buf)

    model = tiny_llama(target_modules=["q_proj", "v_proj"])
    opt = AlphaTunedOptimizer(Custom(model.parameters()), model, init="keep", adapt=False)
    model(**lm_batch()).loss.backward()
    opt.step()
    with pytest.warns(RuntimeWarning, match="does not know how Custom state"):
        opt.rescale_(2.0)
    assert all(t.weight_b not in opt.state for t in opt.targets)
    assert all(t.weight_a in opt.state for t in opt.targets)  # A untouched
    opt.step()  # the optimizer re-initialises lazily


def test_state_tables_cover_torch_optimizers() -> None:
    for name in ("Adam", "AdamW", "SGD", "RAdam", "NAdam", "Adamax", "Adagrad", "RMSprop", "Adadelta"):
        assert hasattr(torch.optim, name) and name in STATE_EXPONENTS


def _tuned(model: nn.Module) -> AlphaTunedOptimizer:
    randomize_lora_b(model)
    opt = AlphaTunedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model, adapt=False)
    names = list(opt.alphas())
    opt.rescale_({n: 1.5 + i for i, n in enumerate(names)})  # a different alpha per module
    return opt


@pytest.mark.parametrize("kind", ["conv+emb+linear", "dora", "rslora", "gpt2-conv1d", "conv-bias"])
def test_save_pretrained_and_reload_reproduce_outputs(kind: str, tmp_path: object) -> None:
    from peft import PeftModel

    model = KINDS[kind]()
    _tuned(model)
    expected = _forward(model)
    model.save_pretrained(str(tmp_path))
    base = KINDS[kind]().unload()  # same seed: the same base weights, LoRA layers removed
    loaded = PeftModel.from_pretrained(base, str(tmp_path))
    torch.testing.assert_close(_forward(loaded), expected, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["conv+emb+linear", "dora", "conv-bias"])
def test_merge_and_unload_reproduces_outputs(kind: str) -> None:
    model = KINDS[kind]()
    _tuned(model)
    expected = _forward(model)
    merged = model.merge_and_unload()
    merged.eval()
    got = (
        merged(input_ids=lm_batch()["input_ids"]).logits if hasattr(merged, "config") else merged(ids_batch())
    )
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("rank_exponent", "alpha_rs"), [(0.5, 10.0), (0.0, 10.0 / math.sqrt(4))])
def test_alpha_reported_in_model_convention(rank_exponent: float, alpha_rs: float) -> None:
    # The rule sets the vanilla-convention alpha c * r^p, so the multiplier is c * r^(p - 1);
    # an rsLoRA layer reports the alpha that gives that multiplier in its own convention,
    # multiplier * sqrt(r): c at p = 1/2 and c / sqrt(r) at p = 0 (rank 4 here).
    model = make_convnet(use_rslora=True)
    opt = AlphaTunedOptimizer(
        torch.optim.AdamW(model.parameters(), lr=2e-5),
        model,
        adapt=False,
        c=10.0,
        rank_exponent=rank_exponent,
    )
    for t in opt.targets:
        assert t.alpha == pytest.approx(alpha_rs)
        assert t.scaling == pytest.approx(10.0 * 4 ** (rank_exponent - 1))


# ------------------------------------------------------------------------- balance (A/μ, B·μ/m)
balances = st.floats(min_value=1e-3, max_value=1e3)


@given(kind=st.sampled_from(sorted(KINDS)), alpha=alphas, mu=balances)
def test_a_balanced_rescale_preserves_the_function_and_is_a_group_action(
    kind: str, alpha: float, mu: float
) -> None:
    model, opt = _cached(kind)
    before = _forward(model)
    params0, state0 = _snapshot(model, opt)
    old = [t.alpha for t in opt.targets]
    for target in opt.targets:
        rescale_target_(target, alpha, opt.optimizer, balance=mu)
    assert all(t.alpha == alpha for t in opt.targets)
    torch.testing.assert_close(_forward(model), before, rtol=1e-9, atol=1e-12)
    for target, a in zip(opt.targets, old, strict=True):  # back: α as it was, A and B by 1/μ
        rescale_target_(target, a, opt.optimizer, balance=1.0 / mu)
    params1, state1 = _snapshot(model, opt)
    for x, y in zip(params0 + state0, params1 + state1, strict=True):
        torch.testing.assert_close(y, x, rtol=1e-10, atol=0)


@pytest.mark.parametrize(("m", "mu"), [(16.0, 1.0), (16.0, 16.0), (4.0, 0.5), (1.0, 100.0)])
def test_under_adam_the_balance_sets_both_learning_rates(m: float, mu: float) -> None:
    """(s, A, B) → (m·s, A/μ, B·μ/m) trains as if η_A = μ·η and η_B = (m/μ)·η (DESIGN-NOTES)."""
    lr, runs = 1e-3, []
    for reparametrize in (True, False):
        model = tiny_llama(seed=4).double()
        targets = find_lora_targets(model)
        a_params = [t.weight_a for t in targets]
        b_params = [t.weight_b for t in targets]
        # eps far below √v and no weight decay: Adam's step is then exactly scale-free
        groups = [{"params": a_params}, {"params": b_params}]
        opt = torch.optim.AdamW(groups, lr=lr, eps=1e-30, weight_decay=0.0)
        for i in range(8):
            if i == 3:  # B has left zero and the moments are warm: the change is not free any more
                if reparametrize:
                    for t in targets:
                        rescale_target_(t, t.alpha * m, opt, balance=mu)
                else:
                    opt.param_groups[0]["lr"], opt.param_groups[1]["lr"] = mu * lr, m / mu * lr
            model(**lm_batch(seed=i)).loss.backward()
            opt.step()
            opt.zero_grad()
        runs.append([t.scaling * (t.weight_b @ t.weight_a).detach() for t in targets])
    for tuned, plain in zip(*runs, strict=True):
        torch.testing.assert_close(tuned, plain, rtol=1e-9, atol=1e-12)
    assert any(not torch.equal(x, torch.zeros_like(x)) for x in runs[0])


def test_balance_must_be_positive() -> None:
    model = tiny_llama()
    target = find_lora_targets(model)[0]
    with pytest.raises(ValueError, match="balance must be a finite number > 0"):
        rescale_target_(target, 4.0, None, balance=0.0)


# ------------------------------------------------------------------ many layers in one batch
def _optimizer_with_state(kind: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = KINDS[kind]().double()
    randomize_lora_b(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, amsgrad=True)
    for _ in range(2):
        _forward(model).pow(2).mean().backward()
        model.train()
        opt.step()
        opt.zero_grad()
    return model, opt


@given(
    kind=st.sampled_from(sorted(KINDS)),
    factors=st.lists(st.tuples(alphas, balances), min_size=1, max_size=12),
    hooked=st.booleans(),
)
def test_the_batched_rescale_is_the_per_layer_rescale_element_for_element(
    kind: str, factors: list[tuple[float, float]], hooked: bool
) -> None:
    """One fused multiply per kind of tensor gives bit for bit what one rescale per layer gives:
    factors, optimizer state (AMSGrad's maximum too) and, for hooked factors, the gradient units."""
    runs = []
    for batched in (True, False):
        model, opt = _optimizer_with_state(kind)
        targets = find_lora_targets(model)
        chosen = [(t, *factors[i % len(factors)]) for i, t in enumerate(targets) if i % 2 == 0]
        units = GradUnits([p for t in targets for p in (t.weight_a, *t.factor_params())]) if hooked else None
        if batched:
            ratios = rescale_targets_(
                [t for t, _, _ in chosen],
                [a for _, a, _ in chosen],
                opt,
                balances=[mu for _, _, mu in chosen],
                units=units,
            )
        else:
            ratios = []
            for t, a, mu in chosen:
                params = [t.weight_a, *t.factor_params()]
                ratio = rescale_target_(t, a, None if hooked else opt, balance=mu)
                ratios.append(ratio)
                if units is not None:
                    units.multiply_(t.weight_a, 1.0 / mu)
                    units.multiply_(t.weight_b, ratio * mu)
                    if t.bias_b is not None:
                        units.multiply_(t.bias_b, ratio)
                assert all(units is None or units.hooked(p) for p in params)
        scales = (
            []
            if units is None
            else [units.scale(p) for t in targets for p in (t.weight_a, *t.factor_params())]
        )
        runs.append((ratios, [t.alpha for t in targets], *_snapshot(model, opt), scales))
    (r1, al1, p1, s1, u1), (r2, al2, p2, s2, u2) = runs
    assert r1 == r2 and al1 == al2
    assert all(torch.equal(x, y) for x, y in zip(p1 + s1, p2 + s2, strict=True))
    assert u1 == pytest.approx(u2, rel=1e-15)
    assert len(p1) > 0 and len(s1) > 0


def test_the_batched_rescale_checks_its_input() -> None:
    model = tiny_llama()
    targets = find_lora_targets(model)
    with pytest.raises(ValueError, match="one alpha and one balance per target"):
        rescale_targets_(targets, [4.0], None)
    with pytest.raises(
        ValueError, match=rf"alpha must be a finite number > 0, got nan for {targets[1].module_name}"
    ):
        rescale_targets_(targets[:2], [4.0, math.nan], None)
    assert [t.alpha for t in targets] == [find_lora_targets(model)[0].alpha] * len(targets)  # nothing moved


def test_factor_slots_hold_the_live_factors() -> None:
    for model in (make_convnet(), tiny_llama(), tiny_gpt2()):
        for t in find_lora_targets(model):
            (mod_a, name_a), (mod_b, name_b) = t.factor_slots()
            assert mod_a._parameters[name_a] is t.weight_a and mod_b._parameters[name_b] is t.weight_b
            replaced = nn.Parameter(t.weight_a.detach().clone())
            mod_a._parameters[name_a] = replaced  # as FSDP2 swaps in a sharded parameter
            assert t.weight_a is replaced
