"""Reference drift computations for the tests and the step benchmark (not the library's kernel).

``dense_drift_norms`` forms the d×k matrices; ``drift_norms_grouped`` runs the library's batched
``drift_norms`` once per distinct layer shape, without the meter's chunking, phases or buffers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from alpha_tuner.drift import DriftNorms, check_shapes, common_dtype, drift_norms

__all__ = ["dense_drift_norms", "drift_norms_grouped"]


def dense_drift_norms(a: Tensor, b: Tensor, da: Tensor, db: Tensor) -> DriftNorms:
    """Reference ``drift_norms`` that forms the d×k matrices (for tests and benchmarks only).

    Args:
        a: ``(..., r, k)``. b: ``(..., d, r)``. da: like ``a``. db: like ``b``.

    Returns:
        ``DriftNorms`` of shape ``(...,)`` in the same compute dtype as ``drift_norms``.
    """
    check_shapes(a, b, da, db)
    dtype = common_dtype(a, b, da, db)
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
        check_shapes(a, b, da, db)
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
