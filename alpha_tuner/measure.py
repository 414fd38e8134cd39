"""Measure each LoRA layer's signal, drift and drift ratio from the step just taken.

:class:`DriftMeter` takes a snapshot of the factors before the inner optimizer's step and,
after it, evaluates the Gram identities of :mod:`alpha_tuner.drift` on ``(A, B, dA, dB)``.
Layers whose factors share shape, dtype and device form one group: its snapshot is a single
stacked copy and its norms one batched call, so the number of kernels grows with the number
of distinct shapes (a handful per model), not with the number of layers. Nothing leaves the
device; the per-layer results are scattered into one vector ordered like the targets.

Extra memory while measuring: the snapshot (one copy of the LoRA factors, in their dtype)
plus, for one group at a time, a stacked copy of the updated factors that becomes the
update in place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .discovery import LoraTarget
from .drift import DriftNorms, drift_norms, drift_ratio, lora_matrices

__all__ = ["DriftMeter", "Measurement"]


@dataclass(frozen=True)
class Measurement:
    """Per-layer results of one measurement, each a 1-D float32 tensor over the targets."""

    signal: torch.Tensor
    drift: torch.Tensor
    rho: torch.Tensor


@dataclass
class _Group:
    index: torch.Tensor  # positions of this group's layers in the target list
    a: list[torch.Tensor]  # 2-D views of the A factors
    b: list[torch.Tensor]  # 2-D views of the B factors
    snap_a: torch.Tensor | None = None
    snap_b: torch.Tensor | None = None


class DriftMeter:
    """Snapshot-then-measure of the drift ratio for a fixed list of LoRA targets.

    Args:
        targets: The LoRA targets, in the order of the result vectors.
        device: Where the result vectors live (the controller's device).
    """

    def __init__(self, targets: Sequence[LoraTarget], device: torch.device) -> None:
        self.device = device
        self.num_layers = len(targets)
        groups: dict[tuple[object, ...], list[int]] = {}
        views = [lora_matrices(t.weight_a, t.weight_b) for t in targets]
        for i, (a, b) in enumerate(views):
            key = (tuple(a.shape), tuple(b.shape), a.dtype, b.dtype, a.device, b.device)
            groups.setdefault(key, []).append(i)
        self._groups = [
            _Group(
                index=torch.tensor(idx, dtype=torch.long, device=device),
                a=[views[i][0] for i in idx],
                b=[views[i][1] for i in idx],
            )
            for idx in groups.values()
        ]

    @property
    def num_groups(self) -> int:
        """Number of shape groups, i.e. batched calls per measurement."""
        return len(self._groups)

    def snapshot(self) -> None:
        """Copy the factors before the inner optimizer's step (one stacked copy per group)."""
        with torch.no_grad():
            for g in self._groups:
                g.snap_a = torch.stack(g.a)
                g.snap_b = torch.stack(g.b)

    def discard(self) -> None:
        """Drop a snapshot without measuring (frees its memory)."""
        for g in self._groups:
            g.snap_a = g.snap_b = None

    def measure(self) -> Measurement:
        """Compute signal, drift and ρ of the step taken since :meth:`snapshot`.

        Raises:
            RuntimeError: If no snapshot was taken.
        """
        signal = torch.zeros(self.num_layers, dtype=torch.float32, device=self.device)
        drift = torch.zeros_like(signal)
        with torch.no_grad():
            for g in self._groups:
                if g.snap_a is None or g.snap_b is None:
                    raise RuntimeError("DriftMeter.measure() needs a snapshot(): call it before the step.")
                da = torch.stack(g.a).sub_(g.snap_a)
                db = torch.stack(g.b).sub_(g.snap_b)
                norms = drift_norms(g.snap_a, g.snap_b, da, db)
                del da, db
                g.snap_a = g.snap_b = None
                signal.index_copy_(0, g.index, norms.signal.to(self.device, torch.float32))
                drift.index_copy_(0, g.index, norms.drift.to(self.device, torch.float32))
        rho = drift_ratio(DriftNorms(signal=signal, drift=drift))
        return Measurement(signal=signal, drift=drift, rho=rho)
