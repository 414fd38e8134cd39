"""Adam's own step size, without a host sync.

Adam moves each element by ``lr · m̂ / (√v̂ + ε)``. The RMS of ``m̂ / (√v̂ + ε)`` over a tensor is
its step in units of the learning rate: 1 at Adam's first step (the gradient's sign), about
``√((1 − β₁)/(1 + β₁))`` (0.23 for β₁ = 0.9) where the gradient is pure noise, and lower still
when the gradient's sign flips from step to step (an overshooting step) or ``v̂`` remembers larger
gradients than the present ones. :class:`~alpha_tuner.StepLaw` reads it to tell a step that is
small because the LR is small from one that is small because Adam is being cautious
(``StepLaw.adam_floor``).

Two ways to get it, equal in exact arithmetic:

* :class:`AppliedStep`, what the tuner uses: from the step the factor actually took, which the
  drift meter has already measured. AdamW's step is ``dP = −lr·(m̂/(√v̂ + ε)) − lr·λ·P`` (λ its
  decoupled weight decay; Adam's coupled decay is inside ``m̂``), so
  ``RMS(m̂/(√v̂ + ε)) = ‖dP + lr·λ·P‖ / (lr·√n)``, and ``‖dP + c·P‖² = ‖dP‖² + 2c⟨P, dP⟩ + c²‖P‖²``
  comes from the Gram traces of the measurement. No optimizer state is read: nothing beyond a
  few kernels on ``(2, L)`` tensors.
* :func:`adam_step_rms`: from the optimizer's moments, one pass over each factor's state (a
  diagnostic, and the reference the tests hold the first to).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .discovery import LoraTarget
from .distributed import local_tensor

__all__ = [
    "AppliedStep",
    "adam_step_rms",
    "applied_step_rms",
    "noise_rms",
    "oscillation_rms",
    "steps_like_adam",
]


def noise_rms(beta1: float) -> float:
    """Adam's normalised step RMS for a pure-noise gradient, ``√((1 − β₁)/(1 + β₁))``."""
    return math.sqrt((1.0 - beta1) / (1.0 + beta1))


def oscillation_rms(beta1: float) -> float:
    """Adam's normalised step for a gradient whose sign flips at every step, ``(1 − β₁)/(1 + β₁)``
    (``m`` settles at that fraction of the gradient, ``v̂`` at its square): the smallest step a
    gradient that is still as large as ``v̂`` remembers can give."""
    return (1.0 - beta1) / (1.0 + beta1)


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


def applied_step_rms(traces: Tensor, lr: Tensor, decay: Tensor, numel: Tensor) -> Tensor:
    """``RMS(m̂/(√v̂ + ε))`` of each layer's A and B step, from the step they took.

    Args:
        traces: ``(6, L)``: ``‖A‖²``, ``⟨A, dA⟩``, ``‖dA‖²``, ``‖B‖²``, ``⟨dB, B⟩``, ``‖dB‖²``
            per layer (:attr:`alpha_tuner.measure.Measurement.traces`).
        lr: ``(2, L)``: the learning rate of each factor's step.
        decay: ``(2, L)``: ``lr·λ`` of each factor's decoupled weight decay (0 without one).
        numel: ``(2, L)``: elements of each factor.

    Returns:
        ``(2, L)`` float32; NaN or inf where a layer was not measured or its LR is 0.
    """
    norm, cross, step = traces[0::3], traces[1::3], traces[2::3]  # (2, L) each: A's row, then B's
    adam_sq = step + 2.0 * decay * cross + decay.square() * norm
    return adam_sq.clamp(min=0.0).sqrt() / (lr * numel.sqrt())


#: Class names (bitsandbytes' among them) whose step is Adam's ``lr·m̂/(√v̂ + ε)``.
_ADAM_NAMES = re.compile(r"(Paged)?AdamW?(8bit|32bit)?")


def steps_like_adam(optimizer: Optimizer) -> bool:
    """Whether the optimizer's step is Adam's or AdamW's, ``lr·m̂/(√v̂ + ε)`` (plus a decay).

    Other Adam-family steps are not: RAdam's first steps are SGD's (``lr·m̂``, far below the
    noise level), Adamax divides by an infinity norm, NAdam mixes in the raw gradient; for those
    :class:`AppliedStep` reads nothing and the floor does not act.
    """
    return isinstance(optimizer, torch.optim.Adam) or bool(_ADAM_NAMES.fullmatch(type(optimizer).__name__))


def _decoupled(optimizer: Optimizer, group: dict[str, Any]) -> bool:
    """Whether a group's weight decay is AdamW's (decoupled) rather than an L2 term in the gradient."""
    return bool(group.get("decoupled_weight_decay", "AdamW" in type(optimizer).__name__))


class AppliedStep:
    """Adam's normalised step of every layer's A and B, read from a measurement (module docstring).

    Args:
        optimizer: The inner (Adam-family) optimizer.
        targets: The tuner's LoRA layers.
        device: The tuner's device.

    Made once per tuner: the factors' param groups (A and B may be in different ones, as LoRA+
    puts them) and sizes are looked up here, so a measurement copies nothing to the device.
    """

    def __init__(self, optimizer: Optimizer, targets: Sequence[LoraTarget], device: torch.device) -> None:
        self.optimizer = optimizer
        group_of = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
        where = [[group_of.get(id(f), -1) for f in factors] for factors in (
            [t.weight_a for t in targets], [t.weight_b for t in targets])]  # fmt: skip
        index = torch.tensor(where, device=device)
        #: (group index, (2, L) mask of the factors it holds, whether its weight decay is
        #: decoupled) for every group holding one; none
        #: where the step is not Adam's (every reading is then NaN: the floor does not act).
        held = sorted({g for row in where for g in row} - {-1}) if steps_like_adam(optimizer) else []
        groups = optimizer.param_groups
        self.groups = [(g, index == g, _decoupled(optimizer, groups[g])) for g in held]
        sizes = [[t.weight_a.numel() for t in targets], [t.weight_b.numel() for t in targets]]
        self.numel = torch.tensor(sizes, dtype=torch.float32, device=device)

    def rms(self, traces: Tensor) -> Tensor:
        """``(2, L)``: RMS of Adam's normalised step of A and B in the measured step (NaN where
        not measured, where a factor is in no group of the optimizer, or where the optimizer's
        step is not Adam's, :func:`steps_like_adam`)."""
        lr = torch.full_like(self.numel, math.nan)
        decay = torch.zeros_like(self.numel)
        for g, mask, decoupled in self.groups:
            group = self.optimizer.param_groups[g]
            lr = torch.where(mask, group["lr"], lr)
            if decoupled:  # (no truth test of a value: the decay may be a tensor)
                decay = torch.where(mask, group["lr"] * group.get("weight_decay", 0.0), decay)
        return applied_step_rms(traces, lr, decay, self.numel)
