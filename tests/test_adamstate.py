"""alpha_tuner.adamstate: Adam's normalised step read from the optimizer's state."""

from __future__ import annotations

import math

import pytest
import torch

from alpha_tuner.adamstate import AppliedStep, adam_step_rms, noise_rms, steps_like_adam
from alpha_tuner.discovery import find_lora_targets
from alpha_tuner.measure import DriftMeter
from tests.conftest import tiny_llama

CPU = torch.device("cpu")


def _params(n: int = 3) -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(16, 24)) for _ in range(n)]


def test_the_first_step_is_the_gradient_s_sign() -> None:
    params = _params()
    optimizer = torch.optim.AdamW(params, lr=1e-3, eps=1e-12)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    torch.testing.assert_close(adam_step_rms(optimizer, params, CPU), torch.ones(3), rtol=1e-5, atol=0)


def test_pure_noise_gives_the_noise_level_and_a_flipping_sign_goes_below_it() -> None:
    params = _params(2)
    optimizer = torch.optim.Adam(params, lr=1e-3)
    g = torch.randn(16, 24)
    for step in range(400):
        params[0].grad = torch.randn(16, 24)  # i.i.d. noise
        params[1].grad = g if step % 2 else -g  # an overshooting step: the sign flips each time
        optimizer.step()
    noise, flipping = adam_step_rms(optimizer, params, CPU).tolist()
    assert noise == pytest.approx(noise_rms(0.9), rel=0.1)  # √(0.1 / 1.9) = 0.229
    assert flipping < 0.25 * noise_rms(0.9)  # (1 − β₁)/(1 + β₁) = 0.053 of the gradient's size


def _groups(model: torch.nn.Module, *, b_lr: float = 1e-3, decay: float = 0.0) -> list[dict]:
    a = [p for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n]
    b = [p for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n]
    return [{"params": a}, {"params": b, "lr": b_lr, "weight_decay": decay}]


#: Inner optimizers: AdamW's decoupled decay, fused; Adam's L2 decay (inside m̂) and its
#: decoupled option; LoRA+'s layout (B in its own group at 16× the LR).
INNERS = {
    "adamw": lambda m: torch.optim.AdamW(_groups(m, decay=0.1), lr=1e-3, weight_decay=0.05),
    "adamw-fused": lambda m: torch.optim.AdamW(_groups(m, decay=0.1), lr=1e-3, weight_decay=0.05, fused=True),
    "adam-l2": lambda m: torch.optim.Adam(_groups(m, decay=0.1), lr=1e-3, weight_decay=0.05),
    "adam-decoupled": lambda m: torch.optim.Adam(
        _groups(m, decay=0.1), lr=1e-3, weight_decay=0.05, decoupled_weight_decay=True
    ),
    "loraplus": lambda m: torch.optim.AdamW(_groups(m, b_lr=1.6e-2), lr=1e-3),
}


@pytest.mark.parametrize("inner", sorted(INNERS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_step_taken_gives_adam_s_normalised_step(inner: str, dtype: torch.dtype) -> None:
    """AppliedStep, from the measured step's Gram traces, is the RMS that adam_step_rms reads
    from the moments: to rounding in float64, within 1e-4 in float32 (the step is a difference of
    two weights), for each kind of weight decay and with A and B in separate groups."""
    model = tiny_llama(seed=4).to(dtype)
    optimizer = INNERS[inner](model)
    targets = find_lora_targets(model)
    meter = DriftMeter(targets, CPU)
    reader = AppliedStep(optimizer, targets, CPU)
    torch.manual_seed(1)
    for step in range(4):
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = torch.randn_like(p) * (1 + step)
        if step == 3:
            meter.snapshot()
        optimizer.step()
    got = reader.rms(meter.measure().traces)
    factors = [t.weight_a for t in targets] + [t.weight_b for t in targets]
    want = adam_step_rms(optimizer, factors, CPU).view(2, -1)
    assert bool(((want > 0.1) & (want < 1.0)).all())  # a real range, not a constant
    rtol = 1e-6 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(got, want, rtol=rtol, atol=0)


@pytest.mark.parametrize("name", ["RAdam", "NAdam", "Adamax"])
def test_other_adam_family_steps_give_no_reading(name: str) -> None:
    """RAdam's first steps are SGD's (``lr·m̂``: read as Adam's they would sit far below the
    floor), Adamax's and NAdam's are not ``lr·m̂/(√v̂ + ε)`` either: no reading, no floor."""
    model = tiny_llama(seed=4)
    targets = find_lora_targets(model)
    optimizer = getattr(torch.optim, name)(_groups(model), lr=1e-3)
    reader = AppliedStep(optimizer, targets, CPU)
    assert not steps_like_adam(optimizer)
    assert bool(reader.rms(torch.ones(6, len(targets))).isnan().all())


def test_adam_and_adamw_by_class_or_by_name() -> None:
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert steps_like_adam(torch.optim.Adam(params)) and steps_like_adam(torch.optim.AdamW(params))
    for name, expected in [
        ("PagedAdamW8bit", True),
        ("AdamW8bit", True),
        ("Adam32bit", True),
        ("Lion", False),
    ]:
        cls = type(name, (torch.optim.SGD,), {})
        assert steps_like_adam(cls(params, lr=1e-3)) is expected


def test_an_unmeasured_layer_or_an_lr_of_zero_gives_no_reading() -> None:
    model = tiny_llama(seed=4)
    targets = find_lora_targets(model)
    optimizer = torch.optim.AdamW(_groups(model, b_lr=0.0), lr=1e-3, weight_decay=0.0)
    reader = AppliedStep(optimizer, targets, CPU)
    traces = torch.full((6, len(targets)), math.nan)
    traces[:, 0] = torch.tensor([4.0, 0.0, 1e-6, 9.0, 0.0, 1e-6])
    rms = reader.rms(traces)
    assert bool(rms[:, 1:].isnan().all())  # not measured
    assert not bool(torch.isfinite(rms[1, 0]))  # B's LR is 0: no reading (the law's lift is 1)
    expected = 1e-3 / (1e-3 * targets[0].weight_a.numel() ** 0.5)
    assert float(rms[0, 0]) == pytest.approx(expected, rel=1e-5)


def test_parameters_without_adam_state_read_nan() -> None:
    params = _params(2)
    adam = torch.optim.AdamW(params[:1], lr=1e-3)
    params[0].grad = torch.randn_like(params[0])
    adam.step()
    values = adam_step_rms(adam, params, CPU)  # params[1] is not in this optimizer
    assert math.isfinite(float(values[0])) and math.isnan(float(values[1]))
    sgd = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    sgd.step()
    assert torch.isnan(adam_step_rms(sgd, params, CPU)).all()
    assert adam_step_rms(adam, [], CPU).shape == (0,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_reading_it_on_cuda_does_not_sync(fused: bool) -> None:
    device = torch.device("cuda")
    params = [torch.nn.Parameter(torch.randn(16, 24, device=device)) for _ in range(2)]
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=fused, foreach=not fused)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        values = adam_step_rms(optimizer, params, device)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(values.cpu(), torch.ones(2), rtol=1e-4, atol=0)
