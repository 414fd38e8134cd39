"""Multi-process training: the same α on every rank, and drift measured on sharded factors.

Data parallelism (DDP) keeps the LoRA factors identical on every rank, so every rank measures
the same ρ and its controller makes the same decision, as long as nothing breaks the symmetry
(non-deterministic kernels, a rank whose state was altered). Rather than rely on that,
:func:`broadcast_state` copies rank 0's controller state, α included, bit for bit to every
rank at each control step: one collective per control step, none on any other step, and the
α that is applied is identical everywhere by construction.

Fully sharded data parallelism (FSDP2, ``torch.distributed.fsdp.fully_shard``) turns the
factors into DTensors sharded on dim 0. The Gram ``A·Aᵀ`` of an ``A`` (r×k) split by rows is
not a sum of per-rank parts, so :class:`ShardedDriftMeter` snapshots and differences the local
shards (no communication), then gathers ``[A_old; dA]`` and ``[B_old; dB]`` of each group of
same-shape layers (two all-gathers per group and measurement, about twice the size of the LoRA
factors, which FSDP itself gathers every step) and applies :func:`~alpha_tuner.drift.drift_norms`
to the full tensors. Every rank therefore computes the single-process ρ of the same factors.
(B's Grams alone could be all-reduced as partial sums over its rows; gathering both sides keeps
a single implementation of the maths, at a cost that is small next to FSDP's own traffic.)
The rescale of B and of its optimizer state is elementwise and acts on the local shards.

Contract: every rank of the default process group wraps the same LoRA layers, and calls
``step()`` (and ``rescale_``/``load_state_dict``) the same number of times, as DDP and FSDP
require anyway; a control step on one rank waits for the others.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .control import ControlState
from .discovery import LoraTarget
from .drift import DriftNorms, compute_dtype, drift_norms, drift_ratio, lora_matrices
from .measure import DriftMeter, Measurement

__all__ = [
    "ShardedDriftMeter",
    "broadcast_state",
    "drift_meter",
    "is_distributed",
    "is_sharded",
    "pack_tensors",
    "unpack_tensors",
    "unwrap_model",
]


def is_distributed(group: Any = None) -> bool:
    """Whether a process group of more than one rank is initialised.

    Args:
        group: The process group (``None``: the default group).
    """
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def pack_tensors(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate the bytes of ``tensors`` (any dtypes, one device) into one uint8 vector."""
    return torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors])


def unpack_tensors(buffer: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Inverse of :func:`pack_tensors`: tensors with the shapes and dtypes of ``like``.

    Raises:
        ValueError: If ``buffer`` does not hold exactly the bytes of ``like``.
    """
    sizes = [t.numel() * t.element_size() for t in like]
    if buffer.numel() != sum(sizes):
        raise ValueError(f"buffer holds {buffer.numel()} bytes, the tensors need {sum(sizes)}.")
    chunks = torch.split(buffer, sizes)
    # clone() first: a fresh, aligned storage for each dtype view.
    return [c.clone().view(t.dtype).reshape(t.shape) for c, t in zip(chunks, like, strict=True)]


def broadcast_state(state: ControlState, *, group: Any = None) -> ControlState:
    """Give every rank the first rank's copy of ``state``, bit for bit, in one collective.

    Without an initialised process group of two or more ranks, ``state`` is returned as is
    and nothing is communicated. The call does not read tensor values on the host.

    Args:
        state: The controller state, with the same field shapes and dtypes on every rank.
        group: The process group (``None``: the default group); its first rank is the source.

    Returns:
        A new state of the same type holding the source rank's values.
    """
    if not is_distributed(group):
        return state
    fields = list(state)
    buffer = pack_tensors(fields)
    src = 0 if group is None else dist.get_global_rank(group, 0)
    dist.broadcast(buffer, src=src, group=group)
    return ControlState(*unpack_tensors(buffer, fields))


def unwrap_model(model: Any) -> Any:
    """The module inside ``DistributedDataParallel``/``DataParallel`` wrappers (others as is).

    The tuner must see the PEFT model itself: its module names key the tuner state and the
    adapter config's ``alpha_pattern``, which a ``module.`` prefix would break.
    """
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return None
    return DTensor


def is_sharded(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (e.g. a parameter of an FSDP2 ``fully_shard`` module)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def _layout(t: Tensor) -> tuple[object, ...]:
    if is_sharded(t):
        return (t.device_mesh, tuple(t.placements))  # type: ignore[attr-defined]
    return (t.device,)


def _full(t: Tensor) -> Tensor:
    return t.full_tensor() if is_sharded(t) else t  # type: ignore[attr-defined]


@dataclass
class _Group:
    index: Tensor
    a: list[Tensor]
    b: list[Tensor]
    snap_a: Tensor | None = None
    snap_b: Tensor | None = None


class ShardedDriftMeter:
    """Snapshot-then-measure of the drift ratio for LoRA factors that may be DTensors.

    The interface of :class:`~alpha_tuner.measure.DriftMeter`. Snapshots and differences stay
    local to each rank's shard; :meth:`measure` gathers the pre-step factors and the steps of
    each same-shape group (two all-gathers per group) and returns, on every rank, the ρ that a
    single process holding the full factors computes. Plain-tensor factors are measured locally.

    Args:
        targets: The LoRA targets, in the order of the result vectors.
        device: Where the result vectors live (the controller's device).
    """

    def __init__(self, targets: Sequence[LoraTarget], device: torch.device) -> None:
        self.device = device
        self.num_layers = len(targets)
        views = [lora_matrices(t.weight_a, t.weight_b) for t in targets]
        keyed: dict[tuple[object, ...], list[int]] = {}
        for i, (a, b) in enumerate(views):
            key = (tuple(a.shape), tuple(b.shape), a.dtype, b.dtype, _layout(a), _layout(b))
            keyed.setdefault(key, []).append(i)
        self._groups = [
            _Group(
                index=torch.tensor(idx, dtype=torch.long, device=device),
                a=[views[i][0] for i in idx],
                b=[views[i][1] for i in idx],
            )
            for idx in keyed.values()
        ]

    @property
    def num_groups(self) -> int:
        """Number of shape groups, i.e. batched calls (and gather pairs) per measurement."""
        return len(self._groups)

    def snapshot(self) -> None:
        """Copy the local shards before the inner optimizer's step (no communication)."""
        with torch.no_grad():
            for g in self._groups:
                g.snap_a = torch.stack(g.a)
                g.snap_b = torch.stack(g.b)

    def discard(self) -> None:
        """Drop a snapshot without measuring (frees its memory)."""
        for g in self._groups:
            g.snap_a = g.snap_b = None

    def measure(self) -> Measurement:
        """Compute signal, drift and ρ of the step taken since :meth:`snapshot`, on every rank.

        Raises:
            RuntimeError: If no snapshot was taken.
        """
        signal = torch.zeros(self.num_layers, dtype=torch.float32, device=self.device)
        drift = torch.zeros_like(signal)
        with torch.no_grad():
            for g in self._groups:
                if g.snap_a is None or g.snap_b is None:
                    raise RuntimeError("measure() needs a snapshot(): call it before the step.")
                dtype = compute_dtype(torch.promote_types(g.snap_a.dtype, g.snap_b.dtype))
                snap_a, snap_b = g.snap_a.to(dtype), g.snap_b.to(dtype)
                g.snap_a = g.snap_b = None
                # Old factors and their steps side by side: one gather per side and group.
                a, da = _full(torch.stack((snap_a, torch.stack(g.a).to(dtype) - snap_a))).unbind(0)
                b, db = _full(torch.stack((snap_b, torch.stack(g.b).to(dtype) - snap_b))).unbind(0)
                norms = drift_norms(a, b, da, db)
                signal.index_copy_(0, g.index, norms.signal.to(self.device, torch.float32))
                drift.index_copy_(0, g.index, norms.drift.to(self.device, torch.float32))
        rho = drift_ratio(DriftNorms(signal=signal, drift=drift))
        # As DriftMeter: a non-finite norm is no measurement (NaN: the controller skips it).
        rho = torch.where(torch.isfinite(signal) & torch.isfinite(drift), rho, math.nan)
        return Measurement(signal=signal, drift=drift, rho=rho)


def drift_meter(targets: Sequence[LoraTarget], device: torch.device) -> DriftMeter | ShardedDriftMeter:
    """The meter for ``targets``: :class:`ShardedDriftMeter` if a factor is a DTensor.

    Args:
        targets: The LoRA targets, in the order of the result vectors.
        device: Where the result vectors live.
    """
    if any(is_sharded(t.weight_a) or is_sharded(t.weight_b) for t in targets):
        return ShardedDriftMeter(targets, device)
    return DriftMeter(targets, device)
