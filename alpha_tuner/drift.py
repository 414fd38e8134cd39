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

(the middle term is ``2·tr(Aᵀ·dBᵀ·B·dA)`` rearranged cyclically). The six Gram blocks come out of
six batched r×r-output matmuls (:func:`lora_grams`), so the cost is
``O((d + k)·r²)`` time and ``O((d + k)·r)`` extra memory instead of the ``O(d·k·r)`` of the
dense route. All functions are pure and never synchronise with the host, so they can run
inside a training step on an accelerator.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "GRAM_BLOCKS",
    "DriftNorms",
    "check_shapes",
    "common_dtype",
    "compute_dtype",
    "drift_norms",
    "drift_ratio",
    "lora_grams",
    "lora_matrices",
    "norms_from_grams",
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


def common_dtype(*tensors: Tensor) -> torch.dtype:
    """The compute dtype of several tensors together: at least float32."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def check_shapes(a: Tensor, b: Tensor, da: Tensor, db: Tensor) -> None:
    """Raise ``ValueError`` unless ``a (..., r, k)``, ``b (..., d, r)`` and the steps agree."""
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


#: Order of the six r×r Gram blocks in the stacked tensor of :func:`lora_grams`.
GRAM_BLOCKS = ("A·Aᵀ", "A·dAᵀ", "dA·dAᵀ", "BᵀB", "dBᵀB", "dBᵀdB")


def lora_grams(a: Tensor, b: Tensor, da: Tensor, db: Tensor, *, out: Tensor | None = None) -> Tensor:
    """The six r×r Gram blocks of a LoRA step, stacked as ``(6, ..., r, r)`` (:data:`GRAM_BLOCKS`).

    Six batched matmuls, written straight into ``out`` when given (the meter passes a slice of
    one buffer per rank, so no Gram is copied). Inputs must already be in the compute dtype.

    Args:
        a: Pre-step ``A`` factors, shape ``(..., r, k)``.
        b: Pre-step ``B`` factors, shape ``(..., d, r)``.
        da: Step taken by ``A``, same shape as ``a``.
        db: Step taken by ``B``, same shape as ``b``.
        out: Optional ``(6, ..., r, r)`` tensor to write into.

    Returns:
        ``out`` (or a new tensor) holding the blocks.
    """
    if out is None:
        out = a.new_empty((6, *a.shape[:-1], a.shape[-2]))
    # bmm for a stack of layers (the meter's case): matmul would add view and expand calls per
    # product, and on an accelerator each call costs about what the small product does.
    mm = torch.bmm if a.dim() == 3 else torch.matmul
    mm(a, a.mT, out=out[0])
    mm(a, da.mT, out=out[1])
    mm(da, da.mT, out=out[2])
    mm(b.mT, b, out=out[3])
    mm(db.mT, b, out=out[4])
    mm(db.mT, db, out=out[5])
    return out


def norms_from_grams(grams: Tensor) -> DriftNorms:
    """Signal and drift norms from the stacked Grams of :func:`lora_grams`: the identities above.

    Args:
        grams: ``(6, ..., r, r)`` in the order of :data:`GRAM_BLOCKS`.

    Returns:
        ``DriftNorms`` of shape ``(...,)``.
    """
    aat, adat, dadat, btb, dbtb, dbtdb = grams.unbind(0)
    signal_sq = (dbtdb * aat + 2.0 * dbtb * adat + btb * dadat).sum(dim=(-2, -1))
    drift_sq = (dbtdb * dadat).sum(dim=(-2, -1))
    # Cancellation in the expanded sums can leave tiny negative values; sqrt would make NaN.
    return DriftNorms(signal_sq.clamp_min(0.0).sqrt(), drift_sq.clamp_min(0.0).sqrt())


def drift_norms(a: Tensor, b: Tensor, da: Tensor, db: Tensor) -> DriftNorms:
    """Signal and drift norms of a LoRA step via r×r Gram matrices, batched over leading dims.

    The one kernel of the library: :func:`lora_grams` then :func:`norms_from_grams`, as the
    meter (:class:`alpha_tuner.measure.DriftMeter`) runs them chunk by chunk.

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
    check_shapes(a, b, da, db)
    dtype = common_dtype(a, b, da, db)
    return norms_from_grams(lora_grams(a.to(dtype), b.to(dtype), da.to(dtype), db.to(dtype)))


def drift_ratio(norms: DriftNorms, *, eps: float = 1e-30) -> Tensor:
    """Drift ratio ``ρ = drift / signal`` computed without host syncs.

    Args:
        norms: Output of ``drift_norms`` (or of ``norms_from_grams``).
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
