"""Adam's own step size, read from the optimizer's state without a host sync.

Adam moves each element by ``lr · m̂ / (√v̂ + ε)``. The RMS of ``m̂ / (√v̂ + ε)`` over a tensor is
its step in units of the learning rate: 1 at Adam's first step (the gradient's sign), about
``√((1 − β₁)/(1 + β₁))`` (0.23 for β₁ = 0.9) where the gradient is pure noise, and lower still
when the gradient's sign flips from step to step (an overshooting step) or ``v̂`` remembers larger
gradients than the present ones. :class:`~alpha_tuner.StepLaw` reads it to tell a step that is
small because the LR is small from one that is small because Adam is being cautious
(``StepLaw.adam_floor``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .distributed import local_tensor

__all__ = ["adam_step_rms", "noise_rms"]


def noise_rms(beta1: float) -> float:
    """Adam's normalised step RMS for a pure-noise gradient, ``√((1 − β₁)/(1 + β₁))``."""
    return math.sqrt((1.0 - beta1) / (1.0 + beta1))


@torch.no_grad()
def adam_step_rms(optimizer: torch.optim.Optimizer, params: Sequence[Tensor], device: torch.device) -> Tensor:
    """``RMS(m̂ / (√v̂ + ε))`` of each parameter's last Adam step, shape ``(len(params),)``.

    Args:
        optimizer: An Adam-family optimizer (groups with ``betas`` and ``eps``; state with
            ``exp_avg``, ``exp_avg_sq`` and ``step``, as torch's Adam and AdamW keep them).
        params: The parameters to read.
        device: Where the result lives (the tuner's device).

    Returns:
        float32 values; NaN for a parameter without that state (not stepped yet, or another
        optimizer's layout). Nothing reads a value on the host: the bias corrections are
        tensor operations on the ``step`` counter, wherever torch keeps it (the host by
        default, the device for capturable and fused Adam).
    """
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    out = []
    nan = torch.full((), math.nan, device=device)  # a fill kernel: no host-to-device copy
    for p in params:
        state = optimizer.state.get(p, {})
        group = groups.get(id(p))
        if group is None or not {"exp_avg", "exp_avg_sq", "step"} <= state.keys() or "betas" not in group:
            out.append(nan)
            continue
        beta1, beta2 = group["betas"]
        # FSDP2's sharded state: this rank's shard (no collective; rank 0's decisions are broadcast).
        m, v = local_tensor(state["exp_avg"]).float(), local_tensor(state["exp_avg_sq"]).float()
        # A tensor wherever torch keeps it: on the host by default (a value in host memory, no
        # device to wait for), on the device for capturable/fused Adam (no transfer either way).
        step = state["step"]
        step = step.double() if isinstance(step, Tensor) else float(step)  # as torch's Adam: in double
        ratio = (m / (1.0 - beta1**step)) / ((v / (1.0 - beta2**step)).sqrt() + group.get("eps", 1e-8))
        out.append(ratio.square().mean().sqrt().to(device))
    if not out:
        return torch.empty(0, device=device)
    return torch.stack(out)
