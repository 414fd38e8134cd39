"""Measure each LoRA layer's signal, drift and drift ratio from the step just taken.

:class:`DriftMeter` copies the factors before the inner optimizer's step and, after it,
evaluates the Gram identities of :mod:`alpha_tuner.drift` on ``(A, B, dA, dB)``. Layers whose
factors share shape, dtype and device form a group, and each group is cut into chunks of at
most ``chunk_bytes``. A chunk costs two stacked copies, two subtractions and six batched r×r
products written straight into one buffer of Grams per rank; the norms of all layers of a rank
then come out of one short chain of elementwise kernels. The kernel count grows with the
number of chunks (a few dozen for a 7B model), not with the number of layers. Nothing leaves
the device and nothing here reads a tensor value on the host.

Phases: with ``phases`` > 1 the chunks are dealt into that many disjoint subsets of about
equal bytes, and each snapshot/measurement covers one of them (``snapshot(phase)``); the other
layers read NaN in that measurement's ρ and False in its ``measured`` mask. A caller that
cycles through the phases measures every layer once per cycle at 1/``phases`` of the cost and
memory of a full measurement.

Sharded factors: factors that are DTensors (FSDP2 ``fully_shard``) are snapshotted and
differenced on the local shards, without communication; a chunk's pre-step factors and
updates are then gathered into full tensors by :func:`alpha_tuner.distributed.gather_full`
(one all-gather per side and chunk), so every rank computes the single-process ρ through the
same code path.

Memory: the snapshot, exactly one copy of the measured factors in their own dtype, lives from
:meth:`DriftMeter.snapshot` to :meth:`DriftMeter.measure` (across the inner step) and is freed
chunk by chunk as it is measured; on CPU its storage is kept for the next snapshot instead
(``keep_snapshot``), in one buffer shared by all phases and sized for the largest. The updates
are formed in place in a workspace of one chunk (at most ``chunk_bytes``, compute dtype),
allocated at the first measurement and kept; bf16/fp16 factors add an upcast copy of one
chunk's snapshot. A measurement therefore needs the factor bytes of its phase (1/``phases`` of
all of them) plus about one chunk (by default at most 1/16 of them on CPU, 1/4 on an
accelerator) and the r×r Grams. The
snapshot is the floor of any exact measurement: the inner optimizer updates the factors in
place, and ``dA`` cannot be recovered without the pre-step values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ._checks import check_int
from .discovery import LoraTarget
from .distributed import gather_full, is_sharded, layout, local_tensor
from .drift import DriftNorms, compute_dtype, drift_ratio, lora_grams, lora_matrices, norms_from_grams

__all__ = ["DriftMeter", "Measurement"]

#: Default chunk budget: this fraction of the LoRA factor bytes (CPU, accelerators), clamped
#: to the bounds below.
_CHUNK_FRACTION_CPU = 16
_CHUNK_FRACTION = 4
_MIN_CHUNK_BYTES = 1 << 20
# On CPU a chunk of a few MiB stays in cache from stacking through the Gram products, and its
# snapshot stays below glibc's mmap threshold (measured in benchmarks/bench_step.py). On an
# accelerator the arithmetic is cheap and each chunk's dozen kernel launches are the cost (on an
# H200, chunks of 1/16 of a 7B LoRA set took 9.3 ms per full measurement against 3.4 ms for one
# chunk per shape): a quarter of the bytes makes one chunk per shape group and phase at the
# default four phases, for a workspace of a quarter of the factor bytes.
_MAX_CHUNK_BYTES_CPU = 4 << 20
_MAX_CHUNK_BYTES = 256 << 20
_ALIGN = 64  # byte alignment of the snapshots inside the kept buffer

_Key = tuple[int, torch.dtype, torch.device]  # (rank, compute dtype, device) of a Gram buffer


@dataclass(frozen=True)
class Measurement:
    """Per-layer results of one measurement, each a 1-D tensor over the targets.

    Attributes:
        signal: ``‖dB·A + B·dA‖_F`` per layer, float32 (NaN where not measured).
        drift: ``‖dB·dA‖_F`` per layer, float32 (NaN where not measured).
        rho: ``drift / signal``, float32; NaN where the layer was not measured in this phase,
            its factors did not change, or a norm is not finite (a NaN/inf or overflowing
            step), which the controller skips and counts.
        measured: Bool, True for the layers of the phase this measurement covered.
        a_step: ``‖dA‖_F / ‖A‖_F`` per layer, A's relative step, float32 (NaN where not
            measured).
        a_norm: ``‖A‖_F`` before the step per layer, float32 (NaN where not measured).
        traces: ``(6, L)`` float32, the traces of the six Gram blocks (:data:`GRAM_BLOCKS`):
            ``‖A‖²``, ``⟨A, dA⟩``, ``‖dA‖²``, ``‖B‖²``, ``⟨dB, B⟩``, ``‖dB‖²`` per layer (NaN
            where not measured).
    """

    signal: Tensor
    drift: Tensor
    rho: Tensor
    measured: Tensor
    a_step: Tensor
    a_norm: Tensor
    traces: Tensor


@dataclass
class _Chunk:
    a: list[Tensor]  # 2-D views (r, k) of the A factors, all of one shape (DTensors if sharded)
    b: list[Tensor]  # 2-D views (d, r) of the B factors
    key: _Key  # the Gram buffer of its phase this chunk writes into ...
    start: int  # ... at rows start : start + len(a)
    nbytes: int  # the full factors' bytes in the compute dtype (for chunking and phases)
    sharded: bool  # a factor is a DTensor: measured on gathered full tensors
    snap_a: Tensor | None = None  # (n, r, k) pre-step copy of the local shards, factor dtype
    snap_b: Tensor | None = None  # (n, d, r)
    kept: tuple[Tensor, Tensor] | None = None  # the snapshot's storage, when it is kept
    offset: int = 0  # where that storage starts in the kept buffer of its device (bytes)

    def locals(self) -> tuple[list[Tensor], list[Tensor]]:
        """The local shards (the tensors themselves when not sharded)."""
        if not self.sharded:
            return self.a, self.b
        return [local_tensor(x) for x in self.a], [local_tensor(x) for x in self.b]

    @property
    def numel(self) -> int:
        """Elements of the local factors (what the workspace holds)."""
        a, b = self.locals()
        return len(a) * (a[0].numel() + b[0].numel())

    def snapshot_bytes(self) -> tuple[int, int]:
        """Bytes of the local snapshots of A and B, each rounded up to the alignment."""
        a, b = self.locals()
        return tuple(  # type: ignore[return-value]
            -(-len(x) * x[0].numel() * x[0].element_size() // _ALIGN) * _ALIGN for x in (a, b)
        )


def _default_chunk_bytes(total_bytes: int, device: torch.device) -> int:
    """The default chunk budget for factors totalling ``total_bytes`` (compute dtype)."""
    if device.type == "cpu":
        return min(max(total_bytes // _CHUNK_FRACTION_CPU, _MIN_CHUNK_BYTES), _MAX_CHUNK_BYTES_CPU)
    return min(max(total_bytes // _CHUNK_FRACTION, _MIN_CHUNK_BYTES), _MAX_CHUNK_BYTES)


def _deal(sizes: Sequence[int], phases: int) -> list[int]:
    """The phase of each item: largest first onto the lightest phase (balanced by size)."""
    load = [0] * phases
    phase_of = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        p = min(range(phases), key=lambda p: load[p])
        phase_of[i] = p
        load[p] += sizes[i]
    return phase_of


class DriftMeter:
    """Snapshot-then-measure of the drift ratio for a fixed list of LoRA targets.

    Args:
        targets: The LoRA targets, in the order of the result vectors. Factors may be
            DTensors (FSDP2); every rank then gets the single-process result.
        device: Where the result vectors live (the controller's device).
        chunk_bytes: Largest size of one chunk's factors in the compute dtype. It bounds the
            workspace that :meth:`measure` allocates once and keeps, and so the memory a
            measurement needs beyond the snapshot. A layer larger than this forms a chunk of
            its own. Default: at least 1 MiB, and on CPU 1/16 of all factor bytes up to 4 MiB
            (cache-sized), on accelerators 1/4 up to 256 MiB (fewer kernel launches).
        keep_snapshot: Keep the snapshot's storage between measurements instead of freeing it
            after each. Default: on CPU only, where freed buffers go back to the operating
            system and are page-faulted in again at every snapshot, together with the inner
            step's temporaries beside them: on a 7B-shaped LoRA set a measurement step next to
            foreach AdamW took 2.4–2.7 bare steps instead of 1.6. A caching device allocator
            has no such cost, and there the freed memory serves the forward pass.
        phases: Number of disjoint subsets of whole chunks, balanced by bytes, that a
            measurement covers one at a time (see :meth:`snapshot`). Chunks are capped at
            1/``phases`` of all factor bytes so that small models split too; with fewer chunks
            than that (fewer layers than phases), :attr:`num_phases` is the number of chunks.

    Raises:
        ValueError: If ``chunk_bytes`` or ``phases`` is not a positive integer.
    """

    def __init__(
        self,
        targets: Sequence[LoraTarget],
        device: torch.device,
        *,
        chunk_bytes: int | None = None,
        keep_snapshot: bool | None = None,
        phases: int = 1,
    ) -> None:
        check_int("phases", phases, 1)
        self.device = device
        self.num_layers = len(targets)
        self.num_phases = phases
        views = [lora_matrices(t.weight_a, t.weight_b) for t in targets]
        factor_device = local_tensor(views[0][0]).device if views else device
        groups: dict[tuple[object, ...], list[int]] = {}
        for i, (a, b) in enumerate(views):
            shape = (tuple(a.shape), tuple(b.shape), a.dtype, b.dtype, layout(a), layout(b))
            groups.setdefault(shape, []).append(i)
        dtypes = [compute_dtype(torch.promote_types(a.dtype, b.dtype)) for a, b in views]
        # Full (global) sizes: the same chunks and phases on every rank and in one process.
        sizes = [(a.numel() + b.numel()) * dt.itemsize for (a, b), dt in zip(views, dtypes, strict=True)]
        if chunk_bytes is None:
            chunk_bytes = _default_chunk_bytes(sum(sizes), factor_device)
        check_int("chunk_bytes", chunk_bytes, 1)
        self.chunk_bytes = chunk_bytes
        self.keep_snapshot = factor_device.type == "cpu" if keep_snapshot is None else bool(keep_snapshot)
        self._num_groups = len(groups)
        budget = chunk_bytes if phases == 1 else min(chunk_bytes, -(-sum(sizes) // phases))

        pairs: list[tuple[_Chunk, list[int]]] = []  # each chunk with its target indices
        for idx in groups.values():
            a, b = views[idx[0]]
            sharded = is_sharded(a) or is_sharded(b)
            key = (a.shape[0], dtypes[idx[0]], local_tensor(a).device)
            per_chunk = max(1, budget // sizes[idx[0]])
            for start in range(0, len(idx), per_chunk):
                part = idx[start : start + per_chunk]
                a_views, b_views = [views[i][0] for i in part], [views[i][1] for i in part]
                pairs.append((_Chunk(a_views, b_views, key, 0, len(part) * sizes[idx[0]], sharded), part))
        # Fewer chunks than phases (a small model): one chunk per phase, none left empty, so
        # every layer is still measured once per cycle of num_phases measurements.
        phases = self.num_phases = max(1, min(phases, len(pairs)))
        phase_of = _deal([c.nbytes for c, _ in pairs], phases)
        self._chunks = [c for c, _ in pairs]
        self._phase_chunks: list[list[_Chunk]] = [[] for _ in range(phases)]
        # Per phase and Gram buffer: the target index of each row; per phase: its layers.
        self._rows: list[dict[_Key, Tensor]] = []
        self._measured: list[Tensor] = []
        kept_bytes: dict[torch.device, int] = {}
        for p in range(phases):
            rows: dict[_Key, list[int]] = {}
            offsets: dict[torch.device, int] = {}
            for (c, part), q in zip(pairs, phase_of, strict=True):
                if q != p:
                    continue
                taken = rows.setdefault(c.key, [])
                c.start = len(taken)
                taken.extend(part)
                c.offset = offsets.get(c.key[2], 0)
                offsets[c.key[2]] = c.offset + sum(c.snapshot_bytes())
                self._phase_chunks[p].append(c)
            for dev, n in offsets.items():
                kept_bytes[dev] = max(kept_bytes.get(dev, 0), n)
            self._rows.append({k: torch.tensor(v, dtype=torch.long, device=device) for k, v in rows.items()})
            mask = torch.zeros(self.num_layers, dtype=torch.bool, device=device)
            mask[[i for v in rows.values() for i in v]] = True
            self._measured.append(mask)
        # On CPU (keep_snapshot): one buffer per device for the snapshot of any one phase.
        self._kept_bytes = kept_bytes
        self._kept: dict[torch.device, Tensor] = {}
        # One workspace per compute dtype and device, sized for the largest chunk, allocated at
        # the first measurement and kept: no fresh buffer per chunk and measurement.
        self._workspace_numel: dict[tuple[torch.dtype, torch.device], int] = {}
        for c in self._chunks:
            ws_key = c.key[1:]
            self._workspace_numel[ws_key] = max(self._workspace_numel.get(ws_key, 0), c.numel)
        self._workspaces: dict[tuple[torch.dtype, torch.device], Tensor] = {}
        self._pending: int | None = None  # the phase whose snapshot is held

    @property
    def num_groups(self) -> int:
        """Number of shape groups (distinct factor shapes, dtypes and devices)."""
        return self._num_groups

    @property
    def num_chunks(self) -> int:
        """Number of chunks, i.e. stacked copies and batched Gram calls per full cycle."""
        return len(self._chunks)

    @property
    def held_bytes(self) -> int:
        """Bytes kept between measurements: the workspaces and the kept snapshot storage."""
        return sum(t.numel() * t.element_size() for d in (self._workspaces, self._kept) for t in d.values())

    def phase_layers(self, phase: int) -> Tensor:
        """Bool mask over the targets of the layers that ``phase`` measures."""
        return self._measured[phase]

    def _check_phase(self, phase: int) -> int:
        if isinstance(phase, bool) or not isinstance(phase, int) or not 0 <= phase < self.num_phases:
            raise ValueError(f"phase must be an integer in [0, {self.num_phases}), got {phase!r}.")
        return phase

    def _kept_storage(self, c: _Chunk, a: Sequence[Tensor], b: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        dev = c.key[2]
        buf = self._kept.get(dev)
        if buf is None:
            buf = torch.empty(self._kept_bytes[dev], dtype=torch.uint8, device=dev)
            self._kept[dev] = buf
        size_a, _ = c.snapshot_bytes()
        out = []
        for x, off in ((a, c.offset), (b, c.offset + size_a)):
            n = len(x) * x[0].numel() * x[0].element_size()
            out.append(buf[off : off + n].view(x[0].dtype).view(len(x), *x[0].shape))
        return out[0], out[1]

    def snapshot(self, phase: int = 0) -> None:
        """Copy the factors of ``phase`` before the inner optimizer's step.

        One stacked copy per chunk of the phase, of the local shards if sharded (no
        communication).

        Args:
            phase: Which subset of the layers the next :meth:`measure` covers, in
                ``[0, num_phases)``.

        Raises:
            ValueError: If ``phase`` is out of range.
        """
        self._check_phase(phase)
        self.discard()
        with torch.no_grad():
            for c in self._phase_chunks[phase]:
                a, b = c.locals()
                if self.keep_snapshot:
                    if c.kept is None:
                        c.kept = self._kept_storage(c, a, b)
                    c.snap_a = torch.stack(a, out=c.kept[0])
                    c.snap_b = torch.stack(b, out=c.kept[1])
                else:
                    c.snap_a = torch.stack(a)
                    c.snap_b = torch.stack(b)
        self._pending = phase

    def discard(self) -> None:
        """Drop a snapshot without measuring (frees its memory unless it is kept)."""
        for c in self._chunks:
            c.snap_a = c.snap_b = None
        self._pending = None

    def _updates(self, c: _Chunk, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """``dA``, ``dB`` of chunk ``c`` (pre-step local ``a``, ``b``), as workspace views."""
        ws_key = c.key[1:]
        ws = self._workspaces.get(ws_key)
        if ws is None:
            ws = torch.empty(self._workspace_numel[ws_key], dtype=c.key[1], device=c.key[2])
            self._workspaces[ws_key] = ws
        out_a = ws[: a.numel()].view(a.shape)
        out_b = ws[a.numel() : a.numel() + b.numel()].view(b.shape)
        for out, views, old in zip((out_a, out_b), c.locals(), (a, b), strict=True):
            if views[0].dtype == out.dtype:
                torch.stack(views, out=out)
            else:  # half-precision factors: upcast before subtracting, so dA is exact
                out.copy_(torch.stack(views))
            out.sub_(old)
        return out_a, out_b

    def measure(self) -> Measurement:
        """Compute signal, drift and ρ of the step taken since :meth:`snapshot`.

        Only the layers of the snapshot's phase are measured; the others read NaN. The
        snapshot is consumed: each chunk's copy is released as soon as it is measured.

        Returns:
            The per-layer :class:`Measurement`, on ``device``.

        Raises:
            RuntimeError: If no snapshot was taken.
        """
        phase = self._pending
        if phase is None:
            raise RuntimeError("DriftMeter.measure() needs a snapshot(): call it before the step.")
        self._pending = None
        signal = torch.full((self.num_layers,), math.nan, dtype=torch.float32, device=self.device)
        drift = signal.clone()
        # The Grams' traces (‖A‖², ⟨A, dA⟩, ‖dA‖², ...) of every layer, gathered per group and
        # turned into a_step and a_norm once for all layers (fewer small kernels than per group).
        traces = torch.full((6, self.num_layers), math.nan, dtype=torch.float32, device=self.device)
        with torch.no_grad():
            grams = {
                key: torch.empty(6, len(idx), key[0], key[0], dtype=key[1], device=key[2])
                for key, idx in self._rows[phase].items()
            }
            for c in self._phase_chunks[phase]:
                assert c.snap_a is not None and c.snap_b is not None  # set by snapshot()
                a, b = c.snap_a.to(c.key[1]), c.snap_b.to(c.key[1])
                c.snap_a = c.snap_b = None
                da, db = self._updates(c, a, b)
                if c.sharded:  # the full tensors: one gather per side
                    a, da = gather_full(torch.stack((a, da)), c.a[0]).unbind(0)
                    b, db = gather_full(torch.stack((b, db)), c.b[0]).unbind(0)
                lora_grams(a, b, da, db, out=grams[c.key][:, c.start : c.start + len(c.a)])
                del a, b, da, db
            for key, g in grams.items():
                norms = norms_from_grams(g)
                signal.index_copy_(0, self._rows[phase][key], norms.signal.to(self.device, torch.float32))
                drift.index_copy_(0, self._rows[phase][key], norms.drift.to(self.device, torch.float32))
                trace = g.diagonal(dim1=-2, dim2=-1).sum(-1)  # (6, n)
                traces.index_copy_(1, self._rows[phase][key], trace.to(self.device, torch.float32))
            a_norm = traces[0].sqrt()
            a_step = (traces[2] / traces[0]).sqrt()
        rho = drift_ratio(DriftNorms(signal=signal, drift=drift))
        # A non-finite norm (NaN/inf gradients, an overflowing step) is not a measurement:
        # inf/inf or finite/inf would otherwise read as a valid ρ (NaN or 0). Nor is a step that
        # left the factors unchanged (learning rate 0 in a warm-up, a frozen group), whose ρ would
        # read as 0. NaN makes the controller skip the layer and count it; layers of other
        # phases are NaN as well.
        measured = self._measured[phase]
        moved = (signal > 0) | (drift > 0)
        rho = torch.where(measured & torch.isfinite(signal) & torch.isfinite(drift) & moved, rho, math.nan)
        return Measurement(
            signal=signal, drift=drift, rho=rho, measured=measured, a_step=a_step, a_norm=a_norm,
            traces=traces,
        )  # fmt: skip
