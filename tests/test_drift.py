"""Tests for alpha_tuner.drift: Gram-matrix drift norms against the dense reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from drift_reference import dense_drift_norms, drift_norms_grouped
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from alpha_tuner.drift import (
    DriftNorms,
    compute_dtype,
    drift_norms,
    drift_ratio,
    lora_matrices,
)

FAST = settings(deadline=None, max_examples=50)
Factors = tuple[Tensor, Tensor, Tensor, Tensor]


def make_factors(
    seed: int,
    batch: tuple[int, ...],
    r: int,
    d: int,
    k: int,
    step: float = 1.0,
    dtype: torch.dtype = torch.float64,
) -> Factors:
    """Random (a, b, da, db) with a, da of shape (*batch, r, k) and b, db of shape (*batch, d, r)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(*batch, r, k, generator=g, dtype=torch.float64)
    b = torch.randn(*batch, d, r, generator=g, dtype=torch.float64)
    da = step * torch.randn(*batch, r, k, generator=g, dtype=torch.float64)
    db = step * torch.randn(*batch, d, r, generator=g, dtype=torch.float64)
    return a.to(dtype), b.to(dtype), da.to(dtype), db.to(dtype)


def scales(a: Tensor, b: Tensor, da: Tensor, db: Tensor) -> tuple[Tensor, Tensor]:
    """Natural magnitudes of signal and drift (for cancellation-aware absolute tolerances)."""
    fro = torch.linalg.matrix_norm
    a, b, da, db = (t.double() for t in (a, b, da, db))
    return fro(db) * fro(a) + fro(b) * fro(da), fro(db) * fro(da)


def assert_norms_close(got: DriftNorms, want: DriftNorms, factors: Factors, rtol: float) -> None:
    """Compares squared norms: the Gram route's error is absolute in ‖·‖², relative to scale²."""
    sig_scale, drift_scale = scales(*factors)
    for g, w, scale in ((got.signal, want.signal, sig_scale), (got.drift, want.drift, drift_scale)):
        assert g.shape == w.shape
        err = (g.double() ** 2 - w.double() ** 2).abs()
        bound = rtol * (w.double() ** 2 + scale**2) + 1e-300
        assert bool((err <= bound).all()), f"max excess {(err / bound).max()}"


def assert_ratio_close(got: Tensor, want: Tensor, norms: DriftNorms, factors: Factors, rtol: float) -> None:
    """Compares ρ where it is well conditioned (signal not lost to cancellation)."""
    ok = norms.signal.double() > 1e-4 * scales(*factors)[0]
    torch.testing.assert_close(got[ok].double(), want[ok].double(), rtol=rtol, atol=0.0)


shape_st = st.tuples(
    st.integers(0, 2**31 - 1),  # seed
    st.integers(1, 3),  # batch
    st.integers(1, 8),  # r
    st.integers(1, 12),  # d
    st.integers(1, 12),  # k
    st.sampled_from([1e-3, 1.0, 10.0]),  # step size relative to the factors
)


@FAST
@given(shape_st)
def test_gram_matches_dense(p: tuple[int, int, int, int, int, float]) -> None:
    seed, n, r, d, k, step = p
    f = make_factors(seed, (n,), r, d, k, step)
    got = drift_norms(*f)
    assert got.signal.dtype == torch.float64 and got.signal.shape == (n,)
    assert_norms_close(got, dense_drift_norms(*f), f, rtol=1e-12)


@FAST
@given(shape_st)
def test_batched_matches_loop(p: tuple[int, int, int, int, int, float]) -> None:
    seed, n, r, d, k, step = p
    f = make_factors(seed, (n, 2), r, d, k, step)
    got = drift_norms(*f)
    assert got.signal.shape == (n, 2)
    for i in range(n):
        for j in range(2):
            one = drift_norms(*(t[i, j] for t in f))
            assert one.signal.shape == ()
            torch.testing.assert_close(got.signal[i, j], one.signal, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(got.drift[i, j], one.drift, rtol=1e-12, atol=1e-14)


@FAST
@given(
    st.lists(
        st.tuples(
            st.integers(0, 2**31 - 1),
            st.sampled_from([(1, 3, 4), (2, 3, 4), (2, 5, 1), (4, 2, 6)]),  # few shapes -> real groups
            st.sampled_from([torch.float32, torch.float64]),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_grouped_matches_per_layer(layers: list[tuple[int, tuple[int, int, int], torch.dtype]]) -> None:
    pairs = [make_factors(seed, (), r, d, k, dtype=dt) for seed, (r, d, k), dt in layers]
    got = drift_norms_grouped(pairs)
    want_dtype = torch.float64 if any(dt == torch.float64 for *_, dt in layers) else torch.float32
    assert got.signal.dtype == got.drift.dtype == want_dtype
    assert got.signal.shape == got.drift.shape == (len(pairs),)
    for i, f in enumerate(pairs):
        one = drift_norms(*f)
        torch.testing.assert_close(got.signal[i], one.signal.to(want_dtype), rtol=1e-6, atol=0.0)
        torch.testing.assert_close(got.drift[i], one.drift.to(want_dtype), rtol=1e-6, atol=0.0)


def test_zero_update() -> None:
    a, b, _, _ = make_factors(0, (2,), 4, 6, 5)
    norms = drift_norms(a, b, torch.zeros_like(a), torch.zeros_like(b))
    assert torch.equal(norms.signal, torch.zeros(2, dtype=torch.float64))
    assert torch.equal(norms.drift, torch.zeros(2, dtype=torch.float64))
    assert torch.equal(drift_ratio(norms), torch.zeros(2, dtype=torch.float64))


def test_b_zero_at_init() -> None:
    a, _, da, db = make_factors(1, (3,), 4, 7, 9, step=0.1)
    b = torch.zeros_like(db)
    norms = drift_norms(a, b, da, db)
    torch.testing.assert_close(norms.signal, torch.linalg.matrix_norm(db @ a), rtol=1e-13, atol=0.0)
    torch.testing.assert_close(norms.drift, torch.linalg.matrix_norm(db @ da), rtol=1e-13, atol=0.0)
    assert bool((drift_ratio(norms) > 0).all())


def test_rank_one_closed_form() -> None:
    a, b, da, db = make_factors(2, (4,), 1, 6, 8)
    norms = drift_norms(a, b, da, db)
    # r = 1: dB·dA is an outer product, so its norm is the product of the vector norms.
    want = db.squeeze(-1).norm(dim=-1) * da.squeeze(-2).norm(dim=-1)
    torch.testing.assert_close(norms.drift, want, rtol=1e-13, atol=0.0)
    assert_norms_close(norms, dense_drift_norms(a, b, da, db), (a, b, da, db), rtol=1e-12)


def test_zero_size_batch() -> None:
    f = make_factors(3, (0,), 3, 4, 5)
    norms = drift_norms(*f)
    assert norms.signal.shape == norms.drift.shape == (0,)
    assert drift_ratio(norms).shape == (0,)


def test_grouped_empty() -> None:
    norms = drift_norms_grouped([])
    for t in norms:
        assert t.shape == (0,) and t.dtype == torch.float32 and t.device.type == "cpu"


def test_drift_ratio_degenerate_and_nan() -> None:
    norms = DriftNorms(
        signal=torch.tensor([0.0, 0.0, 2.0, math.nan, 0.0]),
        drift=torch.tensor([0.0, 3.0, 1.0, 1.0, math.nan]),
    )
    rho = drift_ratio(norms)
    torch.testing.assert_close(rho[:3], torch.tensor([0.0, math.inf, 0.5]))
    assert bool(rho[3:].isnan().all()), "NaN must propagate, not be hidden as 0 or inf"


ratio_st = st.tuples(shape_st, st.floats(1e-3, 1e3))
Params = tuple[tuple[int, int, int, int, int, float], float]


@FAST
@given(ratio_st)
def test_ratio_independent_of_lora_scale(p: Params) -> None:
    (seed, n, r, d, k, step), s = p
    a, b, da, db = make_factors(seed, (n,), r, d, k, step)
    moved_f = (a, s * b, da, s * db)  # the factors of s·ΔW
    base, moved = drift_norms(a, b, da, db), drift_norms(*moved_f)
    assert_norms_close(moved, DriftNorms(s * base.signal, s * base.drift), moved_f, rtol=1e-12)
    assert_ratio_close(drift_ratio(moved), drift_ratio(base), moved, moved_f, rtol=1e-6)


@FAST
@given(ratio_st)
def test_gauge_invariance(p: Params) -> None:
    (seed, n, r, d, k, step), lam = p
    a, b, da, db = make_factors(seed, (n,), r, d, k, step)
    moved_f = (lam * a, b / lam, lam * da, db / lam)  # same product B·A, same step
    base, moved = drift_norms(a, b, da, db), drift_norms(*moved_f)
    assert_norms_close(moved, base, moved_f, rtol=1e-12)
    assert_ratio_close(drift_ratio(moved), drift_ratio(base), moved, moved_f, rtol=1e-6)


@FAST
@given(ratio_st)
def test_step_scaling(p: Params) -> None:
    (seed, n, r, d, k, step), t = p
    a, b, da, db = make_factors(seed, (n,), r, d, k, step)
    moved_f = (a, b, t * da, t * db)
    base, moved = drift_norms(a, b, da, db), drift_norms(*moved_f)
    assert_norms_close(moved, DriftNorms(t * base.signal, t**2 * base.drift), moved_f, rtol=1e-12)
    assert_ratio_close(drift_ratio(moved), t * drift_ratio(base), moved, moved_f, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_upcasts(dtype: torch.dtype) -> None:
    assert compute_dtype(dtype) == torch.float32
    assert compute_dtype(torch.float64) == torch.float64
    f = make_factors(4, (5,), 8, 32, 24, step=0.05, dtype=dtype)
    norms = drift_norms(*f)
    assert norms.signal.dtype == norms.drift.dtype == torch.float32
    assert drift_ratio(norms).dtype == torch.float32
    ref = dense_drift_norms(*(t.double() for t in f))  # same low-precision values, exact maths
    assert_norms_close(norms, ref, f, rtol=1e-5)
    torch.testing.assert_close(drift_ratio(norms).double(), drift_ratio(ref), rtol=1e-4, atol=0.0)


def test_no_host_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    f = make_factors(5, (3,), 4, 6, 5, dtype=torch.float32)
    pairs = [make_factors(6, (), 2, 3, 4), make_factors(7, (), 3, 3, 3), make_factors(8, (), 2, 3, 4)]

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("host sync")

    for name in ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    with pytest.raises(AssertionError, match="host sync"):
        f[0].item()  # the trap is armed
    norms = drift_norms(*f)
    rho = drift_ratio(norms)
    grouped = drift_norms_grouped(pairs)
    monkeypatch.undo()
    torch.testing.assert_close(rho, drift_ratio(dense_drift_norms(*f)), rtol=1e-4, atol=0.0)
    assert grouped.signal.shape == (3,)


def test_shape_mismatch_raises() -> None:
    a, b, da, db = make_factors(9, (), 3, 4, 5)
    with pytest.raises(ValueError):
        drift_norms(a, b, da[:2], db)
    with pytest.raises(ValueError):
        drift_norms(a, b[:, :2], da, db[:, :2])
    with pytest.raises(ValueError):
        drift_norms_grouped([(a[None], b[None], da[None], db[None])])


@pytest.mark.parametrize("kernel", [(3, 3), (3,), (1, 2, 2)])
def test_lora_matrices_conv(kernel: tuple[int, ...]) -> None:
    r, c_in, c_out = 3, 4, 5
    weight_a = torch.randn(r, c_in, *kernel, dtype=torch.float64)
    weight_b = torch.randn(c_out, r, *(1 for _ in kernel), dtype=torch.float64)
    a, b = lora_matrices(weight_a, weight_b)
    assert a.shape == (r, c_in * math.prod(kernel)) and b.shape == (c_out, r)
    assert a.data_ptr() == weight_a.data_ptr() and a._base is weight_a  # a view, not a copy
    assert b.data_ptr() == weight_b.data_ptr() and b._base is weight_b
    # PEFT's conv LoRA is conv_B(conv_A(x)); it must equal one conv with weight (B @ A) reshaped.
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(kernel)]
    x = torch.randn(2, c_in, *(6 for _ in kernel), dtype=torch.float64)
    composed = conv(conv(x, weight_a), weight_b)
    merged = conv(x, (b @ a).reshape(c_out, c_in, *kernel))
    torch.testing.assert_close(composed, merged)


def test_lora_matrices_2d_passthrough_and_errors() -> None:
    weight_a, weight_b = torch.randn(3, 7), torch.randn(5, 3)
    a, b = lora_matrices(weight_a, weight_b)
    assert a is weight_a and b is weight_b
    with pytest.raises(ValueError):
        lora_matrices(torch.randn(3, 4, 3, 3), torch.randn(5, 3, 3, 3))
    with pytest.raises(ValueError):
        lora_matrices(torch.randn(3), torch.randn(5, 3))
