"""alpha_tuner.adamstate: Adam's normalised step read from the optimizer's state."""

from __future__ import annotations

import math

import pytest
import torch

from alpha_tuner import AlphaTunedOptimizer, StepLaw
from alpha_tuner.adamstate import adam_step_rms, noise_rms
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


def test_a_measurement_reads_the_adam_state_of_its_own_phase_only() -> None:
    """With the floor on, each measurement reads Adam's step of the layers its phase measured
    (the law uses no other), the same values as a read of every factor; the others are NaN."""
    model = tiny_llama(seed=3)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt = AlphaTunedOptimizer(inner, model, steps=StepLaw(adam_floor=0.23), head_lr=None, measure_every=1,
                              measure_phases=2, control_every=4, fast_start=False)  # fmt: skip
    torch.manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn_like(p) if p.requires_grad else None
    opt.step()
    engine = opt.engine
    assert engine.meter is not None and engine.meter.num_phases == 2
    factors = [t.weight_a for t in engine.targets] + [t.weight_b for t in engine.targets]
    every = adam_step_rms(inner, factors, CPU).view(2, -1)
    seen = torch.zeros(len(engine.targets), dtype=torch.bool)
    for phase in range(2):
        layers, index = engine.meter.phase_targets(phase)
        assert 0 < len(layers) < len(engine.targets)
        assert index.tolist() == layers
        got = engine._adam_rms(layers, index)
        mine = torch.zeros_like(seen)
        mine[layers] = True
        torch.testing.assert_close(got[:, mine], every[:, mine], rtol=0, atol=0)
        assert bool(got[:, ~mine].isnan().all())
        assert not bool((seen & mine).any())
        seen |= mine
    assert bool(seen.all())


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
