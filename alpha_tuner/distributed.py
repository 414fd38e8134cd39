"""Multi-process training: the same α on every rank, and drift measured on sharded factors.

Data parallelism (DDP) keeps the LoRA factors identical on every rank, so every rank measures
the same ρ and its controller makes the same decision, as long as nothing breaks the symmetry
(non-deterministic kernels, a rank whose state was altered). Rather than rely on that,
:func:`broadcast_state` copies rank 0's controller state, α included, bit for bit to every
rank at each control step: one collective per control step, none on any other step, and the
α that is applied is identical everywhere by construction.

Fully sharded data parallelism (FSDP2, ``torch.distributed.fsdp.fully_shard``) turns the
factors into DTensors sharded on dim 0. The Gram ``A·Aᵀ`` of an ``A`` (r×k) split by rows is
not a sum of per-rank parts, so :class:`~alpha_tuner.measure.DriftMeter` snapshots and
differences the local shards (no communication), then, through :func:`gather_full`, gathers
``[A_old; dA]`` and ``[B_old; dB]`` of each chunk of same-shape layers (two all-gathers per chunk
and measurement, in all about twice the size of the measured factors, which FSDP itself gathers
every step) and measures the full tensors with the same code as a single process. Every rank
therefore computes the single-process ρ of the same factors.
(B's Grams alone could be all-reduced as partial sums over its rows; gathering both sides keeps
a single implementation of the maths, at a cost that is small next to FSDP's own traffic.)
The rescale of B and of its optimizer state is elementwise and acts on the local shards.

Contract: every rank of the default process group wraps the same LoRA layers, and calls
``step()`` (and ``rescale_``/``load_state_dict``) the same number of times, as DDP and FSDP
require anyway; a control step on one rank waits for the others.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .control import ControlState
from .steplaw import StepState

__all__ = [
    "broadcast_state",
    "gather_full",
    "is_distributed",
    "is_sharded",
    "layout",
    "local_tensor",
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


_State = TypeVar("_State", ControlState, StepState)


def broadcast_state(state: _State, *, group: Any = None) -> _State:
    """Give every rank the first rank's copy of ``state``, bit for bit, in one collective.

    Without an initialised process group of two or more ranks, ``state`` is returned as is
    and nothing is communicated. The call does not read tensor values on the host.

    Args:
        state: A tuner state tuple (:class:`ControlState` or :class:`StepState`), with the same
            field shapes and dtypes on every rank.
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
    return type(state)(*unpack_tensors(buffer, fields))


def unwrap_model(model: Any) -> Any:
    """The module inside ``DistributedDataParallel``/``DataParallel`` wrappers (others as is).

    The tuner must see the PEFT model itself: its module names key the tuner state and the
    adapter config's ``alpha_pattern``, which a ``module.`` prefix would break.
    """
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


@functools.cache
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


def layout(t: Tensor) -> tuple[object, ...]:
    """What must match for two factors to be batched: device mesh and placements, or device."""
    if is_sharded(t):
        return (t.device_mesh, tuple(t.placements))  # type: ignore[attr-defined]
    return (t.device,)


def local_tensor(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (a view, no copy); a plain tensor as is."""
    return t.to_local() if is_sharded(t) else t  # type: ignore[attr-defined]


def gather_full(local: Tensor, like: Tensor) -> Tensor:
    """The full tensor of a stack of local shards laid out like the DTensor ``like``.

    The hook through which :class:`~alpha_tuner.measure.DriftMeter` measures sharded factors:
    ``local`` has leading stack dimensions followed by the shape of ``like``'s local shard
    (e.g. ``[A_old; dA]`` of a chunk, shape ``(2, n, r_local, k)``), and the result has those
    leading dimensions followed by ``like``'s full shape, on every rank (one all-gather per
    sharded mesh dimension; uneven shards are handled). A plain ``like`` returns ``local``.

    Args:
        local: The stacked local shards.
        like: A factor (view) with the placements to undo.

    Returns:
        The full tensor, a plain tensor on ``local``'s device.
    """
    if not is_sharded(like):
        return local
    from torch.distributed.tensor import DTensor, Shard

    lead = local.ndim - like.ndim
    placements = [Shard(p.dim + lead) if isinstance(p, Shard) else p for p in like.placements]  # type: ignore[attr-defined]
    shape = torch.Size((*local.shape[:lead], *like.shape))
    stride = torch.empty(shape, device="meta").stride()
    full = DTensor.from_local(local, like.device_mesh, placements, shape=shape, stride=stride)  # type: ignore[attr-defined]
    return full.full_tensor()
