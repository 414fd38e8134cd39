"""The wrapper's contract: equivalence with the bare optimizer, persistence, errors."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
from conftest import lm_batch, make_convnet, randomize_lora_b, tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from torch import nn

from alpha_tuner import C_REF, AlphaTunedOptimizer, ControlConfig, create_alpha_tuned_optimizer
from alpha_tuner.principled import RANK_EXPONENT


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, start: int = 0) -> list[float]:
    losses = []
    for i in range(start, start + steps):
        loss = model(**lm_batch(seed=i)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _lora(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_is_a_real_optimizer_sharing_groups_and_state() -> None:
    model = tiny_llama()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt = AlphaTunedOptimizer(inner, model)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is inner.param_groups and opt.state is inner.state
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    assert inner.param_groups[0]["lr"] == pytest.approx(5e-4)
    _train(model, opt, 2)
    sched.step()
    assert inner.state  # the inner optimizer really stepped


@pytest.mark.parametrize("measure", [False, True])
def test_alpha_unchanged_means_bitwise_equal_trajectory(measure: bool) -> None:
    bare_model, wrapped_model = tiny_llama(seed=3), tiny_llama(seed=3)
    bare = torch.optim.AdamW(bare_model.parameters(), lr=1e-2)
    wrapped = AlphaTunedOptimizer(
        torch.optim.AdamW(wrapped_model.parameters(), lr=1e-2),
        wrapped_model,
        init="keep",
        adapt=False,
        measure=measure,
        measure_every=1,
    )
    assert _train(bare_model, bare, 6) == _train(wrapped_model, wrapped, 6)
    for (n, p), q in zip(_lora(bare_model).items(), _lora(wrapped_model).values(), strict=True):
        assert torch.equal(p, q), n
    if measure:
        assert all(r == r for r in wrapped.drift_ratios().values())  # measured, not NaN


@settings(max_examples=6)
@given(k=st.floats(min_value=0.2, max_value=20.0))
def test_alpha_times_k_equals_b_learning_rate_times_k_under_adam(k: float) -> None:
    """DESIGN-NOTES §3: with AdamW (wd=0, ε→0), α×k ≡ B's learning rate ×k."""

    def run(alpha_factor: float, b_lr_factor: float) -> torch.Tensor:
        model = tiny_llama(seed=5, target_modules=["q_proj", "v_proj"]).double()
        lr = 1e-3
        a_params = [p for n, p in model.named_parameters() if "lora_A" in n]
        b_params = [p for n, p in model.named_parameters() if "lora_B" in n]
        inner = torch.optim.AdamW(
            [{"params": a_params, "lr": lr}, {"params": b_params, "lr": lr * b_lr_factor}],
            lr=lr,
            weight_decay=0.0,
            eps=1e-30,
        )
        opt = AlphaTunedOptimizer(inner, model, init="keep", adapt=False)
        opt.rescale_({n: a * alpha_factor for n, a in opt.alphas().items()})
        _train(model, opt, 8)
        model.eval()
        return model(input_ids=lm_batch(seed=99)["input_ids"]).logits

    torch.testing.assert_close(run(k, 1.0), run(1.0, k), rtol=1e-7, atol=1e-9)


def _adapting(model: nn.Module) -> AlphaTunedOptimizer:
    # rho_max tiny: every control step backs off, so alpha really changes during the run.
    return AlphaTunedOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-2),
        model,
        measure_every=1,
        measure_phases=2,
        control_every=2,
        control=ControlConfig(rho_max=1e-9, min_factor=1e-3),
    )


def test_state_dict_round_trip_gives_identical_trajectory() -> None:
    model = tiny_llama(seed=7)
    opt = _adapting(model)
    _train(model, opt, 5)
    alpha_mid = opt.alphas()
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "lora": _lora(model)}, buf)
    losses = _train(model, opt, 5, start=5)
    assert opt.alphas() != alpha_mid  # the controller acted after the checkpoint

    resumed_model = tiny_llama(seed=7)  # same frozen base; LoRA factors and alpha from the checkpoint
    randomize_lora_b(resumed_model, seed=11)
    resumed = _adapting(resumed_model)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed_model.load_state_dict(ckpt["lora"], strict=False)
    resumed.load_state_dict(ckpt["opt"])
    resumed.load_state_dict(ckpt["opt"])  # idempotent (Accelerate reloads at prepare time)
    assert resumed.alphas() == alpha_mid
    assert _train(resumed_model, resumed, 5, start=5) == losses
    for (n, p), q in zip(_lora(model).items(), _lora(resumed_model).values(), strict=True):
        assert torch.equal(p, q), n
    assert resumed.alphas() == opt.alphas()


def test_tuned_alpha_reaches_the_adapter_config() -> None:
    model = tiny_llama(target_modules=["q_proj"])
    opt = AlphaTunedOptimizer(torch.optim.AdamW(model.parameters(), lr=2e-5), model, adapt=False, steps=None)
    pattern = model.peft_config["default"].alpha_pattern
    assert sorted(pattern.values()) == sorted(opt.alphas().values())
    law_model = tiny_llama(target_modules=["q_proj"])
    law = AlphaTunedOptimizer(torch.optim.AdamW(law_model.parameters(), lr=2e-5), law_model, adapt=False)
    assert sorted(law_model.peft_config["default"].alpha_pattern.values()) == sorted(law.alphas().values())
    want = C_REF * 4**RANK_EXPONENT  # the rule at its reference LR 2e-5, rank 4
    assert all(v == pytest.approx(want) for v in opt.alphas().values())


def test_factory_and_trainer_factory_protocol() -> None:
    model = tiny_llama()
    opt = create_alpha_tuned_optimizer(model, torch.optim.AdamW, lr=1e-3, weight_decay=0.0, adapt=False)
    assert isinstance(opt, AlphaTunedOptimizer) and isinstance(opt.optimizer, torch.optim.AdamW)
    assert not opt.adapt and opt.param_groups[0]["weight_decay"] == 0.0
    # transformers' Trainer: factory() then factory_result(model, **kwargs)
    built = create_alpha_tuned_optimizer()(model, optimizer_cls=torch.optim.SGD, lr=0.1, momentum=0.9)
    assert isinstance(built.optimizer, torch.optim.SGD)


def _errors() -> list[tuple[Any, type[Exception], str]]:
    return [
        (
            lambda m: AlphaTunedOptimizer(torch.optim.AdamW(nn.Linear(2, 2).parameters()), nn.Linear(2, 2)),
            ValueError,
            "no PEFT LoRA layers",
        ),
        (lambda m: AlphaTunedOptimizer(torch.optim.AdamW(m.parameters()), "model"), TypeError, "nn.Module"),
        (lambda m: AlphaTunedOptimizer(m.parameters(), m), TypeError, "constructed torch.optim.Optimizer"),
        (
            lambda m: AlphaTunedOptimizer(
                torch.optim.AdamW(
                    [p for n, p in m.named_parameters() if "q_proj.lora_B" not in n and p.requires_grad]
                ),
                m,
            ),
            ValueError,
            "does not update",
        ),
        (lambda m: AlphaTunedOptimizer(torch.optim.LBFGS(m.parameters()), m), TypeError, "closure"),
        (
            lambda m: AlphaTunedOptimizer(torch.optim.AdamW(m.parameters()), m, measure_every=0),
            ValueError,
            "measure_every",
        ),
        (
            lambda m: AlphaTunedOptimizer(
                torch.optim.AdamW(m.parameters()), m, measure_every=3, control_every=10
            ),
            ValueError,
            "multiple",
        ),
        (
            lambda m: AlphaTunedOptimizer(torch.optim.AdamW(m.parameters()), m, measure_phases=0),
            ValueError,
            "measure_phases must be an integer >= 1",
        ),
        (
            # control_every=50 with the default 10 steps × 4 phases: both named, the fix given.
            lambda m: AlphaTunedOptimizer(torch.optim.AdamW(m.parameters()), m, control_every=50),
            ValueError,
            r"measure_every × measure_phases \(10 × 4 = 40\).*control_every=80",
        ),
        (lambda m: AlphaTunedOptimizer(torch.optim.AdamW(m.parameters()), m, init="big"), ValueError, "init"),
        (lambda m: AlphaTunedOptimizer(torch.optim.AdamW(m.parameters()), m, c=-1.0), ValueError, "c must"),
        (
            lambda m: AlphaTunedOptimizer(torch.optim.AdamW(m.parameters()), m, control={"gain": 1}),
            TypeError,
            "ControlConfig",
        ),
        (
            lambda m: AlphaTunedOptimizer(torch.optim.AdamW(m.parameters()), m, adapt=True, measure=False),
            ValueError,
            "measure=True",
        ),
        (
            lambda m: AlphaTunedOptimizer(AlphaTunedOptimizer(torch.optim.AdamW(m.parameters()), m), m),
            TypeError,
            "already",
        ),
        (
            lambda m: AlphaTunedOptimizer(torch.optim.AdamW(m.parameters()), m).rescale_(0.0),
            ValueError,
            "finite",
        ),
        (
            lambda m: AlphaTunedOptimizer(torch.optim.AdamW(m.parameters()), m).rescale_(float("nan")),
            ValueError,
            "finite",
        ),
        (
            lambda m: AlphaTunedOptimizer(torch.optim.AdamW(m.parameters()), m).rescale_({"nope": 2.0}),
            KeyError,
            "opt.alphas",
        ),
        (
            lambda m: create_alpha_tuned_optimizer(
                [{"params": list(m.parameters())}], torch.optim.AdamW, lr=1.0
            ),
            TypeError,
            "PEFT model",
        ),
    ]


@pytest.mark.parametrize(("build", "error", "match"), _errors())
def test_bad_input_gets_a_clear_error(build: Any, error: type[Exception], match: str) -> None:
    model = tiny_llama(target_modules=["q_proj", "v_proj"])
    with pytest.raises(error, match=match):
        build(model)


def test_frozen_second_adapter_is_untouched_and_other_params_unchanged() -> None:
    model = get_peft_model(
        nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)),
        LoraConfig(r=2, lora_alpha=2, target_modules=["0", "2"], modules_to_save=None),
    )
    model.add_adapter("frozen", LoraConfig(r=2, lora_alpha=5, target_modules=["0"]))
    layer = model.base_model.model[0]
    opt = AlphaTunedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model, adapt=False)
    assert layer.lora_alpha["frozen"] == 5 and layer.scaling["frozen"] == 2.5
    assert set(opt.alphas()) == {"base_model.model.0", "base_model.model.2"}


def test_principled_init_preserves_function_with_nonzero_b() -> None:
    model = make_convnet()
    randomize_lora_b(model)
    from conftest import ids_batch

    model.eval()
    before = model(ids_batch())
    opt = AlphaTunedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-4), model)
    torch.testing.assert_close(model(ids_batch()), before, rtol=1e-5, atol=1e-6)
    assert opt.alphas() != {n: 8.0 for n in opt.alphas()}


def test_principled_alpha_per_layer_follows_rank_and_group_lr() -> None:
    model = tiny_llama(target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 16})
    q = [p for n, p in model.named_parameters() if "q_proj.lora_" in n]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and "q_proj.lora_" not in n]
    inner = torch.optim.AdamW([{"params": q, "lr": 8e-5}, {"params": rest, "lr": 2e-5}])
    opt = AlphaTunedOptimizer(inner, model, adapt=False, c=10.0, lr_exponent=0.5, rank_exponent=0.5)
    for name, alpha in opt.alphas().items():
        if name.endswith("q_proj"):  # r = 4, lr 4x the reference: c = 10 / 2
            assert alpha == pytest.approx(5.0 * 2.0)
        else:  # r = 16 at the reference lr
            assert alpha == pytest.approx(10.0 * 4.0)


@pytest.mark.parametrize("steps", ["auto", None], ids=["step-law", "rule"])
def test_non_lora_parameters_are_updated_exactly_as_by_the_inner_optimizer(steps: str | None) -> None:
    def run(wrap: bool) -> dict[str, torch.Tensor]:
        model = tiny_llama(seed=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        if wrap:
            opt = AlphaTunedOptimizer(
                opt, model, measure_every=1, measure_phases=1, control_every=1, head_lr=None, steps=steps
            )
        # One step: B = 0 makes the forward pass (hence every gradient) independent of alpha,
        # so the non-LoRA head must receive exactly the inner optimizer's update.
        _train(model, opt, 1)
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lm_head" in n}

    bare, wrapped = run(False), run(True)
    assert bare and bare.keys() == wrapped.keys()
    for name in bare:
        assert torch.equal(bare[name], wrapped[name]), name


def test_load_state_dict_rekeys_by_module_and_refuses_newer_versions() -> None:
    model = tiny_llama(target_modules=["q_proj", "v_proj"])
    opt = AlphaTunedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model, adapt=False)
    names = list(opt.alphas())
    opt.rescale_({n: 3.0 + i for i, n in enumerate(names)})
    sd = opt.state_dict()
    tuner = sd["alpha_tuner"]
    # reverse the saved rows and drop the first layer: rows are matched by key, not position
    keep = list(range(1, len(tuner["keys"])))[::-1]
    sd["alpha_tuner"] = {
        **tuner,
        "keys": [tuner["keys"][i] for i in keep],
        "alpha": [tuner["alpha"][i] for i in keep],
        "control": {k: v[keep] for k, v in tuner["control"].items()},
        "rho": tuner["rho"][keep],
    }
    other = tiny_llama(target_modules=["q_proj", "v_proj"])
    fresh = AlphaTunedOptimizer(torch.optim.AdamW(other.parameters(), lr=1e-3), other, adapt=False)
    first = fresh.alphas()[names[0]]
    with pytest.warns(RuntimeWarning, match="1 LoRA layer"):
        fresh.load_state_dict(sd)
    assert fresh.alphas()[names[0]] == first
    assert [fresh.alphas()[n] for n in names[1:]] == [3.0 + i for i in range(1, len(names))]
    saved_log = tuner["control"]["log_alpha"]
    torch.testing.assert_close(fresh._control.log_alpha[1:], saved_log[1:])
    with pytest.raises(ValueError, match="newer alpha_tuner"):
        fresh.load_state_dict({**opt.state_dict(), "alpha_tuner": {**tuner, "version": 99}})


@pytest.mark.parametrize("steps", ["auto", None], ids=["step-law", "rule"])
def test_a_scheduler_attached_before_wrapping_is_harmless_without_heads(steps: str | None) -> None:
    """README: only a head lift needs the wrapper before the scheduler; otherwise the order is free.

    Both place each layer from the schedule's base LR (``initial_lr``), not the warm-up's first one.
    """
    runs = []
    for scheduler_first in (False, True):
        model = tiny_llama(seed=2)
        inner = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
        if scheduler_first:
            scheduler = torch.optim.lr_scheduler.LinearLR(inner, start_factor=0.25, total_iters=4)
            opt = AlphaTunedOptimizer(inner, model, steps=steps)
        else:
            opt = AlphaTunedOptimizer(inner, model, steps=steps)
            scheduler = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.25, total_iters=4)
        lrs = []
        for i in range(6):
            model(**lm_batch(seed=i)).loss.backward()
            opt.step()
            opt.zero_grad()
            scheduler.step()
            lrs.append(opt.param_groups[0]["lr"])
        runs.append((opt.alphas(), lrs, _lora(model)))
    (alphas_a, lrs_a, lora_a), (alphas_b, lrs_b, lora_b) = runs
    assert alphas_a == alphas_b and lrs_a == lrs_b
    assert lrs_a[0] < lrs_a[-1] == pytest.approx(1e-3)  # the schedule acted in both
    for name in lora_a:
        torch.testing.assert_close(lora_a[name], lora_b[name], rtol=0, atol=0)
