"""Tests for alpha_tuner.measure: DriftMeter against the dense per-layer reference."""

from __future__ import annotations

import math
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from conftest import lm_batch, make_convnet, randomize_lora_b, tiny_gpt2, tiny_llama
from drift_reference import dense_drift_norms, drift_norms_grouped
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from alpha_tuner import AlphaTunedOptimizer, ControlConfig
from alpha_tuner.discovery import find_lora_targets
from alpha_tuner.drift import drift_ratio, lora_matrices
from alpha_tuner.measure import DriftMeter, Measurement


def _loss(model: nn.Module, seed: int) -> Tensor:
    if hasattr(model, "emb"):  # the conv net of conftest: ids in, logits out
        ids = torch.randint(0, 20, (3, 5), generator=torch.Generator().manual_seed(seed))
        return model(ids).square().mean()
    return model(**lm_batch(seed=seed)).loss


def _factors(model: nn.Module) -> list[tuple[Tensor, Tensor]]:
    return [
        tuple(m.detach().clone() for m in lora_matrices(t.weight_a, t.weight_b))  # type: ignore[misc]
        for t in find_lora_targets(model)
    ]


def _dense(
    before: list[tuple[Tensor, Tensor]], after: list[tuple[Tensor, Tensor]]
) -> tuple[Tensor, Tensor, Tensor]:
    signal, drift = [], []
    for (a, b), (a1, b1) in zip(before, after, strict=True):
        a, b, a1, b1 = (x.double() for x in (a, b, a1, b1))
        norms = dense_drift_norms(a, b, a1 - a, b1 - b)
        signal.append(norms.signal)
        drift.append(norms.drift)
    s, d = torch.stack(signal), torch.stack(drift)
    return s, d, drift_ratio(type(norms)(s, d))


def _a_norms(
    before: list[tuple[Tensor, Tensor]], after: list[tuple[Tensor, Tensor]]
) -> tuple[Tensor, Tensor]:
    """``‖A‖`` before the step and A's relative step ``‖dA‖ / ‖A‖``, per layer, in float64."""
    norm = torch.stack([a.double().norm() for a, _ in before])
    step = torch.stack(
        [(a1.double() - a.double()).norm() for (a, _), (a1, _) in zip(before, after, strict=True)]
    )
    return norm, step / norm


def _step_and_measure(
    model: nn.Module, meter: DriftMeter, seed: int = 0, lr: float = 1e-2
) -> tuple[Measurement, tuple[Tensor, Tensor, Tensor]]:
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    _loss(model, seed).backward()
    opt.step()  # a first step so that the moments (and A·dAᵀ, dBᵀB) are generic
    opt.zero_grad()
    _loss(model, seed + 1).backward()
    before = _factors(model)
    meter.snapshot()
    opt.step()
    got = meter.measure()
    after = _factors(model)
    a_norm, a_step = _a_norms(before, after)
    torch.testing.assert_close(got.a_norm.double(), a_norm, rtol=1e-6, atol=0)
    torch.testing.assert_close(got.a_step.double(), a_step, rtol=1e-5, atol=0)
    return got, _dense(before, after)


BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "llama-linear": tiny_llama,
    "convnet-conv-embedding-linear": make_convnet,
    "gpt2-conv1d-embedding": tiny_gpt2,
}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_meter_equals_dense_per_layer_after_real_adamw_step(name: str) -> None:
    model = BUILDERS[name]().double()
    randomize_lora_b(model)  # B ≠ 0 so that every Gram term contributes
    targets = find_lora_targets(model)
    meter = DriftMeter(targets, torch.device("cpu"))
    shapes = {(tuple(t.weight_a.shape), tuple(t.weight_b.shape)) for t in targets}
    assert meter.num_groups == len(shapes)
    if name != "convnet-conv-embedding-linear":  # the conv net's five layers all differ in shape
        assert meter.num_groups < len(targets)  # equal-shape layers are batched
    got, (signal, drift, rho) = _step_and_measure(model, meter)
    assert got.signal.dtype == got.drift.dtype == got.rho.dtype == torch.float32
    assert got.signal.shape == (len(targets),)
    assert bool((signal > 0).all()) and bool((drift > 0).all())
    torch.testing.assert_close(got.signal.double(), signal, rtol=1e-6, atol=0)
    torch.testing.assert_close(got.drift.double(), drift, rtol=1e-6, atol=0)
    torch.testing.assert_close(got.rho.double(), rho, rtol=2e-6, atol=0)


def test_layer_kinds_and_group_counts() -> None:
    kinds = {t.kind for t in find_lora_targets(make_convnet())} | {
        t.kind for t in find_lora_targets(tiny_gpt2())
    }
    assert kinds == {"linear", "conv", "embedding"}
    targets = find_lora_targets(tiny_llama())
    meter = DriftMeter(targets, torch.device("cpu"))
    shapes = {(tuple(t.weight_a.shape), tuple(t.weight_b.shape)) for t in targets}
    assert meter.num_groups == len(shapes) < len(targets)
    assert meter.num_chunks == meter.num_groups  # a tiny model fits one chunk per group


@pytest.mark.parametrize("chunk_bytes", [1, 700, 10**9])
def test_chunking_does_not_change_the_result(chunk_bytes: int) -> None:
    ref_model, model = tiny_llama(seed=4).double(), tiny_llama(seed=4).double()
    randomize_lora_b(ref_model)
    randomize_lora_b(model)
    ref, _ = _step_and_measure(ref_model, DriftMeter(find_lora_targets(ref_model), torch.device("cpu")))
    targets = find_lora_targets(model)
    meter = DriftMeter(targets, torch.device("cpu"), chunk_bytes=chunk_bytes)
    if chunk_bytes == 1:
        assert meter.num_chunks == len(targets)
    got, _ = _step_and_measure(model, meter)
    for x, y in ((got.signal, ref.signal), (got.drift, ref.drift), (got.rho, ref.rho)):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=0)


@pytest.mark.parametrize("keep", [False, True], ids=["freed", "kept"])
def test_repeated_measurements_reuse_buffers_correctly(keep: bool) -> None:
    """Kept snapshot storage and the workspace are reused across steps without stale values."""
    model = tiny_llama(seed=6).double()
    randomize_lora_b(model)
    meter = DriftMeter(find_lora_targets(model), torch.device("cpu"), chunk_bytes=700, keep_snapshot=keep)
    assert meter.num_chunks > meter.num_groups  # several chunks share the workspace
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for i in range(3):
        _loss(model, i).backward()
        before = _factors(model)
        meter.snapshot()
        opt.step()
        opt.zero_grad()
        got = meter.measure()
        signal, drift, rho = _dense(before, _factors(model))
        torch.testing.assert_close(got.signal.double(), signal, rtol=1e-6, atol=0)
        torch.testing.assert_close(got.drift.double(), drift, rtol=1e-6, atol=0)
        torch.testing.assert_close(got.rho.double(), rho, rtol=2e-6, atol=0)
        assert all((c.kept is not None) == keep for c in meter._chunks)
        assert all(c.snap_a is None and c.snap_b is None for c in meter._chunks)


def test_snapshot_is_kept_on_cpu_by_default() -> None:
    targets = find_lora_targets(tiny_llama())
    assert DriftMeter(targets, torch.device("cpu")).keep_snapshot
    assert not DriftMeter(targets, torch.device("cpu"), keep_snapshot=False).keep_snapshot


def test_chunks_respect_the_budget() -> None:
    targets = find_lora_targets(tiny_llama())
    layer_bytes = [8 * (t.weight_a.numel() + t.weight_b.numel()) for t in targets]  # float64 compute
    budget = 2 * max(layer_bytes)
    model = tiny_llama().double()
    meter = DriftMeter(find_lora_targets(model), torch.device("cpu"), chunk_bytes=budget)
    for chunk in meter._chunks:
        size = sum(8 * (a.numel() + b.numel()) for a, b in zip(chunk.a, chunk.b, strict=True))
        assert size <= budget
    assert meter.num_groups < meter.num_chunks < len(targets)


@pytest.mark.parametrize("keep", [False, True], ids=["freed", "kept"])
@pytest.mark.parametrize("phases", [2, 3])
def test_phases_measure_disjoint_balanced_subsets_exactly(phases: int, keep: bool) -> None:
    """Each phase measures its own layers exactly (NaN elsewhere); the phases cover every layer
    once, hold about equal bytes, and the kept snapshot storage is that of the largest phase."""
    model = tiny_llama(seed=6).double()
    randomize_lora_b(model)
    targets = find_lora_targets(model)
    meter = DriftMeter(targets, torch.device("cpu"), phases=phases, keep_snapshot=keep)
    assert meter.num_phases == phases
    masks = torch.stack([meter.phase_layers(p) for p in range(phases)])
    assert masks.sum(0).tolist() == [1] * len(targets)  # disjoint, and together every layer
    layer_bytes = torch.tensor([8 * (t.weight_a.numel() + t.weight_b.numel()) for t in targets])
    phase_bytes = [int(layer_bytes[m].sum()) for m in masks]
    assert max(phase_bytes) <= 1.5 * sum(phase_bytes) / phases  # balanced by bytes
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for i in range(2 * phases):
        _loss(model, i).backward()
        before = _factors(model)
        meter.snapshot(i % phases)
        opt.step()
        opt.zero_grad()
        got = meter.measure()
        mask = masks[i % phases]
        assert torch.equal(got.measured, mask)
        signal, drift, rho = _dense(before, _factors(model))
        torch.testing.assert_close(got.signal[mask].double(), signal[mask], rtol=1e-6, atol=0)
        torch.testing.assert_close(got.drift[mask].double(), drift[mask], rtol=1e-6, atol=0)
        torch.testing.assert_close(got.rho[mask].double(), rho[mask], rtol=2e-6, atol=0)
        assert torch.isnan(got.rho[~mask]).all() and torch.isnan(got.signal[~mask]).all()
    snapshot_bytes = sum(x.numel() * x.element_size() for a, b in _factors(model) for x in (a, b))
    kept = meter.held_bytes - sum(w.numel() * w.element_size() for w in meter._workspaces.values())
    if keep:
        assert max(phase_bytes) <= kept < max(phase_bytes) + 64 * 2 * meter.num_chunks
        assert kept < 0.75 * snapshot_bytes
    else:
        assert kept == 0
    with pytest.raises(ValueError, match="phase"):
        meter.snapshot(phases)
    with pytest.raises(ValueError, match="phases"):
        DriftMeter(targets, torch.device("cpu"), phases=0)


def test_fewer_chunks_than_phases_leave_no_phase_empty() -> None:
    """Two layers cannot fill eight phases: the meter uses one phase per chunk, each non-empty."""
    model = tiny_llama(seed=2, target_modules=["q_proj"], layers_to_transform=[0])
    targets = find_lora_targets(model)
    assert len(targets) == 1
    meter = DriftMeter(targets, torch.device("cpu"), phases=8)
    assert meter.num_phases == meter.num_chunks == 1
    assert meter.phase_layers(0).all()
    wide = tiny_llama(seed=2, target_modules=["q_proj", "v_proj"], layers_to_transform=[0])
    meter = DriftMeter(find_lora_targets(wide), torch.device("cpu"), phases=8)
    assert meter.num_phases == meter.num_chunks == 2
    assert all(meter.phase_layers(p).sum() == 1 for p in range(2))


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_chunk_bytes(bad: Any) -> None:
    with pytest.raises(ValueError, match="chunk_bytes"):
        DriftMeter(find_lora_targets(tiny_llama()), torch.device("cpu"), chunk_bytes=bad)


def test_measure_needs_a_snapshot_and_discard_drops_it() -> None:
    meter = DriftMeter(find_lora_targets(tiny_llama()), torch.device("cpu"))
    with pytest.raises(RuntimeError, match="snapshot"):
        meter.measure()
    meter.snapshot()
    meter.discard()
    with pytest.raises(RuntimeError, match="snapshot"):
        meter.measure()
    meter.snapshot()
    meter.measure()
    with pytest.raises(RuntimeError, match="snapshot"):  # a measurement consumes its snapshot
        meter.measure()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_factors_measure_the_exact_update(dtype: torch.dtype) -> None:
    """The update is taken in float32 after upcasting, not rounded by a half-precision subtraction."""
    model = tiny_llama(seed=2).to(dtype)
    randomize_lora_b(model)
    targets = find_lora_targets(model)
    meter = DriftMeter(targets, torch.device("cpu"))
    before = _factors(model)
    meter.snapshot()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in targets:
            for p in (t.weight_a, t.weight_b):
                p.add_((torch.randn(p.shape, generator=g) * 3e-2).to(dtype))
    got = meter.measure()
    signal, drift, _ = _dense(before, _factors(model))  # exact differences of the stored values
    torch.testing.assert_close(got.signal.double(), signal, rtol=1e-5, atol=0)
    torch.testing.assert_close(got.drift.double(), drift, rtol=1e-5, atol=0)


@settings(max_examples=20)
@given(
    layers=st.lists(st.sampled_from([(2, 3, 5), (2, 4, 3), (3, 5, 5), (1, 1, 2)]), min_size=1, max_size=7),
    chunk_bytes=st.integers(min_value=1, max_value=2000),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_meter_equals_grouped_reference(
    layers: list[tuple[int, int, int]], chunk_bytes: int, seed: int
) -> None:
    """Any mix of shapes and any chunk budget: same as ``drift_norms_grouped``, in target order."""
    g = torch.Generator().manual_seed(seed)
    targets = [
        SimpleNamespace(
            weight_a=torch.randn(r, k, generator=g, dtype=torch.float64),
            weight_b=torch.randn(d, r, generator=g, dtype=torch.float64),
        )
        for r, d, k in layers
    ]
    meter = DriftMeter(targets, torch.device("cpu"), chunk_bytes=chunk_bytes)  # type: ignore[arg-type]
    assert meter.num_groups == len(set(layers))
    before = [(t.weight_a.clone(), t.weight_b.clone()) for t in targets]
    meter.snapshot()
    for t in targets:
        t.weight_a.add_(torch.randn(t.weight_a.shape, generator=g, dtype=torch.float64))
        t.weight_b.add_(torch.randn(t.weight_b.shape, generator=g, dtype=torch.float64))
    got = meter.measure()
    want = drift_norms_grouped(
        [(a, b, t.weight_a - a, t.weight_b - b) for (a, b), t in zip(before, targets, strict=True)]
    )
    torch.testing.assert_close(got.signal, want.signal.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.drift, want.drift.float(), rtol=1e-5, atol=1e-6)


def test_non_finite_norms_give_nan_rho() -> None:
    """An overflowing signal with a finite drift is no measurement (not ρ = 0)."""
    targets = [
        SimpleNamespace(weight_a=torch.ones(2, 3), weight_b=torch.ones(4, 2)),
        SimpleNamespace(weight_a=torch.ones(2, 3), weight_b=torch.full((4, 2), 1e20)),
        SimpleNamespace(weight_a=torch.ones(2, 3), weight_b=torch.ones(4, 2)),
    ]
    meter = DriftMeter(targets, torch.device("cpu"))  # type: ignore[arg-type]
    meter.snapshot()
    targets[0].weight_a.add_(0.1)
    targets[0].weight_b.add_(0.1)
    targets[1].weight_a.add_(1.0)  # dB = 0: drift 0, signal ‖B·dA‖ overflows float32
    targets[2].weight_a.add_(float("nan"))
    m = meter.measure()
    assert math.isinf(m.signal[1]) and m.drift[1] == 0
    assert math.isfinite(m.rho[0]) and m.rho[0] > 0
    assert math.isnan(m.rho[1]) and math.isnan(m.rho[2])


@pytest.mark.parametrize("bad", ["nan", "inf", "one-layer-nan"])
def test_non_finite_gradient_step_is_skipped_and_alpha_stays_finite(bad: str) -> None:
    """Without a GradScaler a NaN/inf gradient reaches the step: it must not move α."""
    model = tiny_llama(seed=1)
    opt = AlphaTunedOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-3),
        model,
        measure_every=1,
        measure_phases=1,
        control_every=2,
        control=ControlConfig(rho_max=1e-12, min_factor=1e-3),  # always backs off: α really moves
    )
    n = len(opt.targets)
    for i in range(4):  # healthy steps first: the controller has state to protect
        _loss(model, i).backward()
        opt.step()
        opt.zero_grad()
    before = opt.alphas()
    healthy = opt.diagnostics()
    assert healthy["skipped"] == 0 and healthy["measurements"] == 4 * n
    _loss(model, 10).backward()
    poisoned = opt.targets[:1] if bad == "one-layer-nan" else opt.targets
    value = float("inf") if bad == "inf" else float("nan")
    for t in poisoned:
        t.weight_b.grad.fill_(value)  # type: ignore[union-attr]
    opt.step()  # step 5: a measurement step, not a control step
    opt.zero_grad()
    after_bad = opt.diagnostics()
    assert after_bad["skipped"] == len(poisoned)
    assert after_bad["measurements"] == 4 * n + n - len(poisoned)
    broken = 0  # (step, layer) pairs whose factors are non-finite after the step: no ρ there
    for i in range(3):  # NaN factors spread through the forward pass over the next steps
        _loss(model, 20 + i).backward()
        opt.step()
        opt.zero_grad()
        broken += sum(
            not (bool(torch.isfinite(t.weight_a).all()) and bool(torch.isfinite(t.weight_b).all()))
            for t in opt.targets
        )
    assert broken > len(poisoned)  # the NaN did spread: the count below is not trivially 3·|poisoned|
    alphas = opt.alphas()
    assert all(math.isfinite(a) and a > 0 for a in alphas.values())
    assert alphas != before  # the control steps did run and move α
    diag = opt.diagnostics()
    assert math.isfinite(diag["alpha_min"]) and math.isfinite(diag["alpha_max"])
    assert diag["skipped"] == len(poisoned) + broken
    assert diag["measurements"] == 4 * n + n - len(poisoned) + 3 * n - broken
    final_broken = {
        t.module_name
        for t in opt.targets
        if not (bool(torch.isfinite(t.weight_a).all()) and bool(torch.isfinite(t.weight_b).all()))
    }
    assert {k for k, r in opt.drift_ratios().items() if math.isnan(r)} == final_broken
    state = opt._control
    for field in (state.log_alpha, state.rho_fast, state.rho_slow):
        assert bool(torch.isfinite(field).all())


def test_a_step_at_learning_rate_zero_is_skipped_not_read_as_rho_zero() -> None:
    """A warm-up that starts at LR 0 leaves the factors unchanged: no ρ, counted as skipped."""
    model = tiny_llama(seed=2)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt = AlphaTunedOptimizer(
        inner, model, measure_every=1, measure_phases=1, control_every=1, adapt=False, measure=True
    )
    n = len(opt.targets)
    for lr in (0.0, 1e-3):
        for group in opt.param_groups:
            group["lr"] = lr
        _loss(model, 0).backward()
        opt.step()
        opt.zero_grad()
        rho = list(opt.drift_ratios().values())
        if lr == 0.0:
            assert all(math.isnan(r) for r in rho)
            assert opt.diagnostics()["skipped"] == n and opt.diagnostics()["measurements"] == 0
        else:
            assert all(math.isfinite(r) and r > 0 for r in rho)
            assert opt.diagnostics()["measurements"] == n
