"""Measure each LoRA layer's signal, drift and drift ratio from the step just taken.

:class:`DriftMeter` copies the factors before the inner optimizer's step and, after it,
evaluates the Gram identities of :mod:`alpha_tuner.drift` on ``(A, B, dA, dB)``. Layers whose
factors share shape, dtype and device form a group, and each group is cut into chunks of at
most ``chunk_bytes``. A chunk costs two stacked copies, two subtractions and six batched r×r
products written straight into one buffer of Grams per rank; the norms of all layers of a rank
then come out of one short chain of elementwise kernels. The kernel count grows with the
number of chunks (a few dozen for a 7B model), not with the number of layers. Nothing leaves
the device and nothing here reads a tensor value on the host.

Memory: the snapshot, exactly one copy of the measured factors in their own dtype, lives from
:meth:`DriftMeter.snapshot` to :meth:`DriftMeter.measure` (across the inner step) and is freed
chunk by chunk as it is measured; on CPU its storage is kept for the next snapshot instead
(``keep_snapshot``). The updates are formed in place in a workspace of one chunk (at most
``chunk_bytes``, compute dtype), allocated at the first measurement and kept; bf16/fp16 factors
add an upcast copy of one chunk's snapshot. A measurement therefore needs one times the LoRA
factor bytes plus about one chunk (by default at most 1/16 of them) and the r×r Grams. The
snapshot is the floor of any exact measurement: the inner optimizer updates the factors in
place, and ``dA`` cannot be recovered without the pre-step values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .discovery import LoraTarget
from .drift import DriftNorms, compute_dtype, drift_ratio, lora_matrices

__all__ = ["DriftMeter", "Measurement"]

#: Default chunk budget: this fraction of the LoRA factor bytes, clamped to the bounds below.
_CHUNK_FRACTION = 16
_MIN_CHUNK_BYTES = 1 << 20
# On CPU a chunk of a few MiB stays in cache from stacking through the Gram products, and its
# snapshot stays below glibc's mmap threshold (measured in benchmarks/bench_step.py). On
# accelerators larger chunks mean fewer kernel launches.
_MAX_CHUNK_BYTES_CPU = 4 << 20
_MAX_CHUNK_BYTES = 64 << 20

_Key = tuple[int, torch.dtype, torch.device]  # (rank, compute dtype, device) of a Gram buffer


@dataclass(frozen=True)
class Measurement:
    """Per-layer results of one measurement, each a 1-D float32 tensor over the targets.

    Attributes:
        signal: ``‖dB·A + B·dA‖_F`` per layer.
        drift: ``‖dB·dA‖_F`` per layer.
        rho: ``drift / signal``; NaN where a norm is not finite (a NaN/inf or overflowing
            step), which the controller skips and counts.
    """

    signal: Tensor
    drift: Tensor
    rho: Tensor


@dataclass
class _Chunk:
    a: list[Tensor]  # 2-D views (r, k) of the A factors, all of one shape
    b: list[Tensor]  # 2-D views (d, r) of the B factors
    key: _Key  # the Gram buffer this chunk writes into ...
    start: int  # ... at rows start : start + len(a)
    snap_a: Tensor | None = None  # (n, r, k) pre-step copy, factor dtype
    snap_b: Tensor | None = None  # (n, d, r)
    kept: tuple[Tensor, Tensor] | None = None  # the snapshot's storage, when it is kept

    @property
    def numel(self) -> int:
        return len(self.a) * (self.a[0].numel() + self.b[0].numel())


def _norms_from_grams(grams: Tensor) -> DriftNorms:
    """Signal and drift norms from stacked Grams ``[AAᵀ, A·dAᵀ, dA·dAᵀ, BᵀB, dBᵀB, dBᵀdB]``.

    The identities of :mod:`alpha_tuner.drift`; ``grams`` has shape ``(6, n, r, r)``.
    """
    aat, adat, dadat, btb, dbtb, dbtdb = grams.unbind(0)
    signal_sq = (dbtdb * aat + 2.0 * dbtb * adat + btb * dadat).sum(dim=(-2, -1))
    drift_sq = (dbtdb * dadat).sum(dim=(-2, -1))
    # Cancellation in the expanded sum can leave tiny negative values; sqrt would make NaN.
    return DriftNorms(signal_sq.clamp_min(0.0).sqrt(), drift_sq.clamp_min(0.0).sqrt())


def _default_chunk_bytes(total_bytes: int, device: torch.device) -> int:
    """The default chunk budget for factors totalling ``total_bytes`` (compute dtype)."""
    cap = _MAX_CHUNK_BYTES_CPU if device.type == "cpu" else _MAX_CHUNK_BYTES
    return min(max(total_bytes // _CHUNK_FRACTION, _MIN_CHUNK_BYTES), cap)


class DriftMeter:
    """Snapshot-then-measure of the drift ratio for a fixed list of LoRA targets.

    Args:
        targets: The LoRA targets, in the order of the result vectors.
        device: Where the result vectors live (the controller's device).
        chunk_bytes: Largest size of one chunk's factors in the compute dtype. It bounds the
            workspace that :meth:`measure` allocates once and keeps, and so the memory a
            measurement needs beyond the snapshot. A layer larger than this forms a chunk of
            its own. Default: 1/16 of all factor bytes, at least 1 MiB and at most 4 MiB on
            CPU (cache-sized) or 64 MiB on accelerators.
        keep_snapshot: Keep the snapshot's storage between measurements instead of freeing it
            after each. Default: on CPU only, where freed buffers go back to the operating
            system and are page-faulted in again at every snapshot, together with the inner
            step's temporaries beside them: on a 7B-shaped LoRA set a measurement step next to
            foreach AdamW took 2.4–2.7 bare steps instead of 1.6. A caching device allocator
            has no such cost, and there the freed memory serves the forward pass.

    Raises:
        ValueError: If ``chunk_bytes`` is not a positive integer.
    """

    def __init__(
        self,
        targets: Sequence[LoraTarget],
        device: torch.device,
        *,
        chunk_bytes: int | None = None,
        keep_snapshot: bool | None = None,
    ) -> None:
        self.device = device
        self.num_layers = len(targets)
        views = [lora_matrices(t.weight_a, t.weight_b) for t in targets]
        factor_device = views[0][0].device if views else device
        groups: dict[tuple[object, ...], list[int]] = {}
        for i, (a, b) in enumerate(views):
            shape = (tuple(a.shape), tuple(b.shape), a.dtype, b.dtype, a.device, b.device)
            groups.setdefault(shape, []).append(i)
        dtypes = [compute_dtype(torch.promote_types(a.dtype, b.dtype)) for a, b in views]
        sizes = [(a.numel() + b.numel()) * dt.itemsize for (a, b), dt in zip(views, dtypes, strict=True)]
        if chunk_bytes is None:
            chunk_bytes = _default_chunk_bytes(sum(sizes), factor_device)
        if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be a positive integer, got {chunk_bytes!r}.")
        self.chunk_bytes = chunk_bytes
        self.keep_snapshot = factor_device.type == "cpu" if keep_snapshot is None else bool(keep_snapshot)
        self._num_groups = len(groups)

        self._chunks: list[_Chunk] = []
        rows: dict[_Key, list[int]] = {}  # per Gram buffer: the target index of each row
        for idx in groups.values():
            a, _ = views[idx[0]]
            key = (a.shape[0], dtypes[idx[0]], a.device)
            per_chunk = max(1, chunk_bytes // sizes[idx[0]])
            for start in range(0, len(idx), per_chunk):
                part = idx[start : start + per_chunk]
                taken = rows.setdefault(key, [])
                chunk = _Chunk([views[i][0] for i in part], [views[i][1] for i in part], key, len(taken))
                self._chunks.append(chunk)
                taken.extend(part)
        # Where each Gram buffer's rows go in the result vectors.
        self._rows = {key: torch.tensor(idx, dtype=torch.long, device=device) for key, idx in rows.items()}
        # One workspace per compute dtype and device, sized for the largest chunk, allocated at
        # the first measurement and kept: no fresh buffer per chunk and measurement.
        self._workspace_numel: dict[tuple[torch.dtype, torch.device], int] = {}
        for c in self._chunks:
            ws_key = c.key[1:]
            self._workspace_numel[ws_key] = max(self._workspace_numel.get(ws_key, 0), c.numel)
        self._workspaces: dict[tuple[torch.dtype, torch.device], Tensor] = {}

    @property
    def num_groups(self) -> int:
        """Number of shape groups (distinct factor shapes, dtypes and devices)."""
        return self._num_groups

    @property
    def num_chunks(self) -> int:
        """Number of chunks, i.e. stacked copies and batched Gram calls per measurement."""
        return len(self._chunks)

    def snapshot(self) -> None:
        """Copy the factors before the inner optimizer's step (one stacked copy per chunk)."""
        with torch.no_grad():
            for c in self._chunks:
                if c.kept is not None:
                    c.snap_a = torch.stack(c.a, out=c.kept[0])
                    c.snap_b = torch.stack(c.b, out=c.kept[1])
                    continue
                c.snap_a = torch.stack(c.a)
                c.snap_b = torch.stack(c.b)
                if self.keep_snapshot:
                    c.kept = (c.snap_a, c.snap_b)

    def discard(self) -> None:
        """Drop a snapshot without measuring (frees its memory unless it is kept)."""
        for c in self._chunks:
            c.snap_a = c.snap_b = None

    def _updates(self, c: _Chunk, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """``dA``, ``dB`` of chunk ``c`` (pre-step ``a``, ``b``), as views of the workspace."""
        ws_key = c.key[1:]
        ws = self._workspaces.get(ws_key)
        if ws is None:
            ws = torch.empty(self._workspace_numel[ws_key], dtype=c.key[1], device=c.key[2])
            self._workspaces[ws_key] = ws
        out_a = ws[: a.numel()].view(a.shape)
        out_b = ws[a.numel() : a.numel() + b.numel()].view(b.shape)
        for out, views, old in ((out_a, c.a, a), (out_b, c.b, b)):
            if views[0].dtype == out.dtype:
                torch.stack(views, out=out)
            else:  # half-precision factors: upcast before subtracting, so dA is exact
                out.copy_(torch.stack(views))
            out.sub_(old)
        return out_a, out_b

    def measure(self) -> Measurement:
        """Compute signal, drift and ρ of the step taken since :meth:`snapshot`.

        The snapshot is consumed: each chunk's copy is released as soon as it is measured.

        Returns:
            The per-layer :class:`Measurement`, on ``device``.

        Raises:
            RuntimeError: If no snapshot was taken.
        """
        if any(c.snap_a is None or c.snap_b is None for c in self._chunks):
            raise RuntimeError("DriftMeter.measure() needs a snapshot(): call it before the step.")
        signal = torch.zeros(self.num_layers, dtype=torch.float32, device=self.device)
        drift = torch.zeros_like(signal)
        with torch.no_grad():
            grams = {
                key: torch.empty(6, len(idx), key[0], key[0], dtype=key[1], device=key[2])
                for key, idx in self._rows.items()
            }
            for c in self._chunks:
                assert c.snap_a is not None and c.snap_b is not None  # checked above
                a, b = c.snap_a.to(c.key[1]), c.snap_b.to(c.key[1])
                c.snap_a = c.snap_b = None
                da, db = self._updates(c, a, b)
                g = grams[c.key][:, c.start : c.start + len(c.a)]
                torch.matmul(a, a.mT, out=g[0])
                torch.matmul(a, da.mT, out=g[1])
                torch.matmul(da, da.mT, out=g[2])
                torch.matmul(b.mT, b, out=g[3])
                torch.matmul(db.mT, b, out=g[4])
                torch.matmul(db.mT, db, out=g[5])
                del a, b, da, db
            for key, g in grams.items():
                norms = _norms_from_grams(g)
                signal.index_copy_(0, self._rows[key], norms.signal.to(self.device, torch.float32))
                drift.index_copy_(0, self._rows[key], norms.drift.to(self.device, torch.float32))
        rho = drift_ratio(DriftNorms(signal=signal, drift=drift))
        # A non-finite norm (NaN/inf gradients, an overflowing step) is not a measurement:
        # inf/inf or finite/inf would otherwise read as a valid ρ (NaN or 0). NaN makes the
        # controller skip the layer and count it.
        rho = torch.where(torch.isfinite(signal) & torch.isfinite(drift), rho, math.nan)
        return Measurement(signal=signal, drift=drift, rho=rho)
