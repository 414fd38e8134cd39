"""Read-outs of the tuner's state for logging: the one place where device values reach the host.

The tuner keeps its telemetry (per-layer ρ, measurement and back-off counters) as tensors on the
training device; :func:`summarize` gathers them in a single device-to-host transfer at a time the
caller chooses (a logging callback every N steps), never inside ``step()``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .control import ControlState
from .steplaw import StepState

__all__ = ["summarize"]


def summarize(
    *,
    alphas: Sequence[float],
    steps: int,
    control: ControlState,
    rho: Tensor | None,
    names: Sequence[str],
    per_layer: bool = False,
    law: StepState | None = None,
) -> dict[str, float]:
    """A flat summary of the tuner's state, read in one device-to-host transfer.

    Args:
        alphas: Each layer's α (host floats, PEFT's own convention).
        steps: Optimizer steps taken.
        control: The rule's controller state (counters are per-layer tensors on the device;
            with the step law on, ``measurements`` and ``skipped`` are the law's counters).
        rho: Each layer's most recent ρ (NaN where not measured yet), or ``None`` before the
            first measurement.
        names: Display names of the layers, in the order of ``alphas`` and ``rho``.
        per_layer: Also return ``rho[<name>]`` for every layer.
        law: The step law's state, when it is on.

    Returns:
        ``alpha_mean/min/max``, ``steps``, ``measurements``, ``skipped``, ``backoffs`` (summed
        over layers) and, when some ρ is finite, ``rho_mean/min/max`` over those layers. With the
        step law: ``collapsed`` (measurements, summed over layers, in which Adam's step had
        collapsed and the law backed off: :attr:`StepLaw.adam_collapse`), ``balance_mean``
        (geometric mean of the online balance μ) and, over the layers
        it has measured, the geometric means ``a_step`` and ``update`` of its measured A step and
        relative update (at the schedule's peak).
    """
    stats: dict[str, float] = {
        "alpha_mean": math.fsum(alphas) / len(alphas),
        "alpha_min": min(alphas),
        "alpha_max": max(alphas),
        "steps": float(steps),
    }
    # With the step law on, its own counters are the measurements (the rule's controller is idle).
    counted = control if law is None else law
    counters = torch.stack([counted.n_measured.sum(), counted.n_skipped.sum(), control.n_backoffs.sum()])
    dtype = torch.float32 if counters.device.type == "mps" else torch.float64  # MPS has no float64
    parts = [counters.to(dtype)]
    if law is not None:
        seen = (law.n_measured > 0).to(dtype)
        count = seen.sum().clamp(min=1)
        parts.append(torch.stack([
            law.log_balance.to(dtype).mean(),
            (law.log_a_step.to(dtype) * seen).sum() / count,
            (law.log_update.to(dtype) * seen).sum() / count,
            seen.sum(),
            law.n_collapsed.sum().to(dtype),
        ]))  # fmt: skip
    if rho is not None:
        parts.append(rho.to(dtype))
    values = torch.cat(parts).tolist()  # the one transfer
    if law is not None:
        balance, a_step, update, seen_count, collapsed = values[3:8]
        del values[3:8]
        stats.update(balance_mean=math.exp(balance), collapsed=collapsed)
        if seen_count:
            stats.update(a_step=math.exp(a_step), update=math.exp(update))
    stats.update(measurements=values[0], skipped=values[1], backoffs=values[2])
    layer_rho = values[3:]
    finite = [r for r in layer_rho if math.isfinite(r)]
    if finite:
        stats.update(rho_mean=math.fsum(finite) / len(finite), rho_min=min(finite), rho_max=max(finite))
    if per_layer and layer_rho:
        stats.update({f"rho[{name}]": r for name, r in zip(names, layer_rho, strict=True)})
    return stats
