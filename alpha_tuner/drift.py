"""Second-order "drift" of a LoRA update, measured without forming any d×k matrix.

A LoRA layer adds ``ΔW = s·B·A`` with ``A ∈ R^{r×k}`` and ``B ∈ R^{d×r}``. When one optimizer
step moves the factors by ``dA`` and ``dB`` (``A``, ``B`` being the pre-step factors), the
product moves by::

    Δ(s·B·A) = s·(dB·A + B·dA)  +  s·dB·dA
               └── signal ───┘     └ drift ┘

The signal is the first-order (linearised) change the optimizer "meant"; the drift is the
bilinear cross term it did not control. Their ratio ``ρ = ‖dB·dA‖_F / ‖dB·A + B·dA‖_F`` does
not depend on ``s``, and a large ``ρ`` means the factorised step is far from its linearisation.

Both Frobenius norms reduce to inner products ``⟨P, Q⟩ = Σ P∘Q`` of r×r Gram matrices::

    ‖dB·dA‖²       = ⟨dBᵀdB, dA·dAᵀ⟩
    ‖dB·A + B·dA‖² = ⟨dBᵀdB, A·Aᵀ⟩ + 2·Σ (dBᵀB) ∘ (A·dAᵀ) + ⟨BᵀB, dA·dAᵀ⟩

(the middle term is ``2·tr(Aᵀ·dBᵀ·B·dA)`` rearranged cyclically). Every Gram block comes out of
two batched matmuls, ``[B, dB]ᵀ[B, dB]`` and ``[A; dA]·[A; dA]ᵀ``, so the cost is
``O((d + k)·r²)`` time and ``O((d + k)·r)`` extra memory instead of the ``O(d·k·r)`` of the
dense route. All functions are pure and never synchronise with the host, so they can run
inside a training step on an accelerator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "DriftNorms",
    "compute_dtype",
    "dense_drift_norms",
    "drift_norms",
    "drift_norms_grouped",
    "drift_ratio",
    "lora_matrices",
]


class DriftNorms(NamedTuple):
    """Frobenius norms of the two parts of one LoRA step (both without the scale ``s``).

    Attributes:
        signal: ``‖dB·A + B·dA‖_F``, shape ``(...,)``.
        drift: ``‖dB·dA‖_F``, shape ``(...,)``.
    """

    signal: Tensor
    drift: Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Returns the dtype the norms are computed in: at least float32 (bf16/fp16 are upcast)."""
    return torch.promote_types(dtype, torch.float32)


def _common_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _check_shapes(a: Tensor, b: Tensor, da: Tensor, db: Tensor) -> None:
    # Shapes are host-side metadata, so validating them costs no device sync.
    if a.dim() < 2 or b.dim() < 2:
        raise ValueError(f"a and b must be at least 2-D, got {tuple(a.shape)} and {tuple(b.shape)}")
    if da.shape != a.shape or db.shape != b.shape:
        raise ValueError(
            f"update shapes must match factors: a {tuple(a.shape)} vs da {tuple(da.shape)}, "
            f"b {tuple(b.shape)} vs db {tuple(db.shape)}"
        )
    if a.shape[:-2] != b.shape[:-2] or a.shape[-2] != b.shape[-1]:
        raise ValueError(f"expected a (..., r, k) and b (..., d, r), got {tuple(a.shape)}, {tuple(b.shape)}")


def drift_norms(a: Tensor, b: Tensor, da: Tensor, db: Tensor) -> DriftNorms:
    """Signal and drift norms of a LoRA step via r×r Gram matrices, batched over leading dims.

    Args:
        a: Pre-step ``A`` factors, shape ``(..., r, k)``.
        b: Pre-step ``B`` factors, shape ``(..., d, r)``.
        da: Step taken by ``A``, same shape as ``a``.
        db: Step taken by ``B``, same shape as ``b``.

    Returns:
        ``DriftNorms`` with tensors of shape ``(...,)`` in ``compute_dtype`` of the inputs.

    Raises:
        ValueError: If the shapes are inconsistent.
    """
    _check_shapes(a, b, da, db)
    r = a.shape[-2]
    dtype = _common_dtype(a, b, da, db)
    # One Gram per side instead of three: the (2r×2r) blocks hold every product we need.
    left = torch.cat((b.to(dtype), db.to(dtype)), dim=-1)  # (..., d, 2r) = [B, dB]
    right = torch.cat((a.to(dtype), da.to(dtype)), dim=-2)  # (..., 2r, k) = [A; dA]
    g_b = torch.matmul(left.mT, left)  # [[BᵀB, BᵀdB], [dBᵀB, dBᵀdB]]
    g_a = torch.matmul(right, right.mT)  # [[AAᵀ, AdAᵀ], [dAAᵀ, dAdAᵀ]]
    btb, dbtb, dbtdb = g_b[..., :r, :r], g_b[..., r:, :r], g_b[..., r:, r:]
    aat, adat, dadat = g_a[..., :r, :r], g_a[..., :r, r:], g_a[..., r:, r:]
    signal_sq = (dbtdb * aat + 2.0 * dbtb * adat + btb * dadat).sum(dim=(-2, -1))
    drift_sq = (dbtdb * dadat).sum(dim=(-2, -1))
    # Cancellation in the expanded sums can leave tiny negative values; sqrt would make NaN.
    return DriftNorms(signal_sq.clamp_min(0.0).sqrt(), drift_sq.clamp_min(0.0).sqrt())


def drift_ratio(norms: DriftNorms, *, eps: float = 1e-30) -> Tensor:
    """Drift ratio ``ρ = drift / signal`` computed without host syncs.

    Args:
        norms: Output of ``drift_norms`` (or ``dense_drift_norms``).
        eps: A signal at or below ``eps`` counts as zero.

    Returns:
        ``ρ`` with the shape and dtype of the norms. Where the signal is zero the ratio is 0 if
        the drift is 0 too (no step at all) and ``+inf`` otherwise; NaN inputs stay NaN.
    """
    signal, drift = norms
    # clamp_min keeps the untaken branch finite, so no inf/NaN leaks into autograd or checks.
    ratio = drift / signal.clamp_min(eps)
    # drift * inf is +inf for drift > 0 and NaN for NaN drift; drift == 0 gives a clean 0.
    degenerate = torch.where(drift == 0, torch.zeros_like(drift), drift * math.inf)
    return torch.where(signal <= eps, degenerate, ratio)


def dense_drift_norms(a: Tensor, b: Tensor, da: Tensor, db: Tensor) -> DriftNorms:
    """Reference ``drift_norms`` that forms the d×k matrices (for tests and benchmarks only).

    Args:
        a: ``(..., r, k)``. b: ``(..., d, r)``. da: like ``a``. db: like ``b``.

    Returns:
        ``DriftNorms`` of shape ``(...,)`` in the same compute dtype as ``drift_norms``.
    """
    _check_shapes(a, b, da, db)
    dtype = _common_dtype(a, b, da, db)
    a, b, da, db = a.to(dtype), b.to(dtype), da.to(dtype), db.to(dtype)
    signal = torch.linalg.matrix_norm(db @ a + b @ da)
    drift = torch.linalg.matrix_norm(db @ da)
    return DriftNorms(signal, drift)


def drift_norms_grouped(pairs: Sequence[tuple[Tensor, Tensor, Tensor, Tensor]]) -> DriftNorms:
    """``drift_norms`` for a list of layers of possibly different shapes.

    Layers sharing ``(a.shape, b.shape, dtype, device)`` are stacked and handled by a single
    batched ``drift_norms`` call, so a model costs one call per distinct layer shape.

    Args:
        pairs: Per-layer 2-D ``(a, b, da, db)`` tensors.

    Returns:
        ``DriftNorms`` of 1-D tensors of length ``len(pairs)`` in input order, on the device of
        the first layer, in float64 if any layer computes in float64 and float32 otherwise.
        Empty input gives empty float32 CPU tensors.
    """
    if not pairs:
        return DriftNorms(torch.zeros(0), torch.zeros(0))
    groups: dict[tuple[object, ...], list[int]] = {}
    for i, (a, b, da, db) in enumerate(pairs):
        if a.dim() != 2:
            raise ValueError(f"layer {i}: expected 2-D factors, got a of shape {tuple(a.shape)}")
        _check_shapes(a, b, da, db)
        key = (tuple(a.shape), tuple(b.shape), a.dtype, b.dtype, da.dtype, db.dtype, a.device)
        groups.setdefault(key, []).append(i)
    device = pairs[0][0].device
    out_dtype = torch.float32
    signals: list[Tensor] = [torch.zeros(())] * len(pairs)
    drifts: list[Tensor] = [torch.zeros(())] * len(pairs)
    for idx in groups.values():
        stacked = [torch.stack([pairs[i][j] for i in idx]) for j in range(4)]
        norms = drift_norms(*stacked)
        out_dtype = torch.promote_types(out_dtype, norms.signal.dtype)
        # unbind gives views, so this is bookkeeping only; the final stack is one kernel.
        for i, s, d in zip(idx, norms.signal.unbind(), norms.drift.unbind(), strict=True):
            signals[i], drifts[i] = s, d
    signal = torch.stack([s.to(device=device, dtype=out_dtype) for s in signals])
    drift = torch.stack([d.to(device=device, dtype=out_dtype) for d in drifts])
    return DriftNorms(signal, drift)


def lora_matrices(weight_a: Tensor, weight_b: Tensor) -> tuple[Tensor, Tensor]:
    """Reshapes PEFT LoRA factor weights to the 2-D ``A (r, k)`` and ``B (d, r)`` used here.

    Conv LoRA stores ``A`` as ``(r, in, *kernel)`` and ``B`` as ``(out, r, 1, ..., 1)``; their
    delta weight is ``(B2 @ A2).reshape(out, in, *kernel)``, so flattening is exact. 2-D
    (linear / embedding) factors are returned unchanged.

    Args:
        weight_a: ``lora_A`` weight, ``(r, k)`` or ``(r, in, *kernel)``.
        weight_b: ``lora_B`` weight, ``(d, r)`` or ``(out, r, 1, ..., 1)``.

    Returns:
        ``(A, B)`` as 2-D views (copies only if the inputs are non-contiguous).

    Raises:
        ValueError: If a factor is below 2-D or ``B`` has a non-unit kernel.
    """
    if weight_a.dim() < 2 or weight_b.dim() < 2:
        raise ValueError("LoRA factors must be at least 2-D")
    if any(n != 1 for n in weight_b.shape[2:]):
        raise ValueError(f"lora_B must have a 1×…×1 kernel, got shape {tuple(weight_b.shape)}")
    a = weight_a if weight_a.dim() == 2 else weight_a.reshape(weight_a.shape[0], -1)
    b = weight_b if weight_b.dim() == 2 else weight_b.reshape(weight_b.shape[0], weight_b.shape[1])
    return a, b
