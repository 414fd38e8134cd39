"""Per-layer control law that moves each LoRA layer's scaling factor α online.

Every layer starts at a principled α₀. Each ``measure_every`` optimizer steps the caller measures
the *drift ratio* ρ = ‖dB·dA‖ / ‖dB·A + B·dA‖ of that step for one phase of the layers (a
``mask`` says which; with ``measure_phases`` phases each layer is measured every
``measure_every·measure_phases`` steps, so a control decision sees a fresh ρ of every layer).
ρ says how large the second-order (product) part of the update is compared with the first-order
part. ρ is the sentinel for the edge
of the stable regime: while ρ stays near its own long-run level, α is fine (and may grow back), but
when a layer's recent ρ climbs well above that level, or above an absolute ceiling, the layer is
about to leave the regime where the update behaves linearly, so its α is backed off
multiplicatively. Each ``control_every`` steps the law below moves α once.

The law, per layer, with ε = 1e-30 guarding log(0)::

    valid   = isfinite(ρ) ∧ ρ ≥ 0                       (invalid ρ: nothing changes, n_skipped += 1)
    n ← n + 1                                            (valid measurements of this layer)
    ρ_fast ← b_f·ρ_fast + (1 − b_f)·ρ,  b_f = min(β_fast, 1 − 1/n)
    ρ_slow ← b_s·ρ_slow + (1 − b_s)·ρ,  b_s = min(β_slow, 1 − 1/n)
    log target = min(log tolerance + log max(ρ_slow, ε), log ρ_max)
    e = log max(ρ_fast, ε) − log target                  (e = 0 while n < max(warmup, 1))
    Δ = −min(gain·e, log max_decrease)    if e > 0       (back off, at most ÷max_decrease)
    Δ = +min(gain·(−e), log recovery)     otherwise      (recover, at most ×recovery)
    log α ← clamp(log α + Δ, log α₀ + log min_factor, log α₀ + log max_factor)

Parameters (see :class:`ControlConfig`): ``beta_fast``/``beta_slow`` set how recent "recent" and
"long-run" are, in measurements; ``tolerance`` is how far above its own long-run level a layer's ρ
may rise before it counts as a spike; ``rho_max`` is an absolute ceiling (ρ = 1: the drift is as
large as the signal); ``gain`` is the proportional gain on the log-error; ``max_decrease`` and
``recovery`` cap one control step in each direction, so back-off is fast and recovery slow;
``min_factor``/``max_factor`` keep α within [α₀·min_factor, α₀·max_factor]; ``warmup`` is the
number of measurements a layer needs before its α may move. The averaging factors start at 0 and
grow to β (``min(β, 1 − 1/n)``: the running mean of the first measurements), so the long-run level
is not anchored to the first step's ρ: with B = 0 at initialisation that ρ is degenerate (A has no
gradient yet, so dA ≈ 0) and orders of magnitude below the level that follows. At the target the
step is zero (fixed point), Δ is non-increasing in ρ_fast, and layers never interact.

Why it looks like this:

* α is multiplicative, so the law works in log α: steps are ratios and the bounds are symmetric.
* This module only decides the new α. Applying it to a layer without changing the function the
  network computes (rescaling B when α changes) happens elsewhere.
* All state is tensors on the measuring device and every function is pure (it returns a new
  :class:`ControlState` and never mutates its inputs; fields may be shared between states, so do
  not modify them in place). None of them reads a tensor value on the host (no ``.item()``,
  ``float()``, ``bool()``, ``.tolist()``, ``.cpu()`` or Python ``if`` on values): branches are
  ``torch.where``/``clamp``/``minimum``, so the training hot path never waits for the device.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "ControlConfig",
    "ControlState",
    "control_error",
    "init_control",
    "observe",
    "update_alpha",
]

_RHO_FLOOR = 1e-30  # ε: ρ values are floored here before taking logs, so log(0) stays finite.
_RHO_CEIL = 1e30  # valid ρ are clamped here so the EMAs (and float32 casts) stay finite.

# field name -> (lower, lower inclusive, upper, upper inclusive, human-readable range)
_RANGES: dict[str, tuple[float, bool, float, bool, str]] = {
    "beta_fast": (0.0, True, 1.0, False, "0 <= beta_fast < 1"),
    "beta_slow": (0.0, True, 1.0, False, "0 <= beta_slow < 1"),
    "tolerance": (1.0, True, math.inf, False, "1 <= tolerance < inf"),
    "rho_max": (0.0, False, math.inf, True, "0 < rho_max <= inf"),
    "gain": (0.0, False, math.inf, False, "0 < gain < inf"),
    "max_decrease": (1.0, True, math.inf, False, "1 <= max_decrease < inf"),
    "recovery": (1.0, True, math.inf, False, "1 <= recovery < inf"),
    "min_factor": (0.0, False, 1.0, True, "0 < min_factor <= 1"),
    "max_factor": (1.0, True, math.inf, False, "1 <= max_factor < inf"),
    "warmup": (0.0, True, math.inf, False, "warmup an integer >= 0"),
}
_INTEGER_FIELDS = frozenset({"warmup"})


@dataclass(frozen=True)
class ControlConfig:
    """Parameters of the control law (see the module docstring for the equations).

    Attributes:
        beta_fast: EMA factor of the recent level ρ_fast, per measurement, in [0, 1).
        beta_slow: EMA factor of the long-run level ρ_slow, per measurement, in [0, 1).
        tolerance: Spike threshold relative to ρ_slow; target = min(tolerance·ρ_slow, rho_max). ≥ 1.
        rho_max: Absolute ceiling on ρ, > 0 (``inf`` disables it).
        gain: Proportional gain on the log-error e when above target, > 0 (also used for recovery).
        max_decrease: Largest divisor of α in one control step, ≥ 1.
        recovery: Largest multiplier of α in one control step, ≥ 1.
        min_factor: Lower bound of α as a fraction of α₀, in (0, 1].
        max_factor: Upper bound of α as a multiple of α₀, in [1, inf).
        warmup: Valid measurements a layer needs before the law may move its α, integer ≥ 0.

    Raises:
        ValueError: If a field is not a real number in its valid range; the message names the
            field, the bad value and the range.
    """

    beta_fast: float = 0.5
    beta_slow: float = 0.95
    tolerance: float = 2.0
    rho_max: float = 1.0
    gain: float = 1.0
    max_decrease: float = 2.0
    recovery: float = 1.1
    min_factor: float = 1.0 / 16.0
    max_factor: float = 1.0
    warmup: int = 3

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            lo, lo_incl, hi, hi_incl, valid = _RANGES[f.name]
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
            if f.name in _INTEGER_FIELDS:
                ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
            if ok:
                v = float(value)
                ok = (lo <= v if lo_incl else lo < v) and (v <= hi if hi_incl else v < hi)
            if not ok:
                raise ValueError(f"ControlConfig.{f.name} must satisfy {valid}, got {value!r}")


class ControlState(NamedTuple):
    """Per-layer controller state; every field has shape (L,) and lives on one device.

    Attributes:
        log_alpha: Current log α, float32.
        log_alpha0: Log of the principled start α₀, float32.
        rho_fast: EMA of recent ρ, float32 (0 before the first valid measurement).
        rho_slow: EMA of long-run ρ, float32 (0 before the first valid measurement).
        n_measured: Valid measurements so far, int64.
        n_skipped: Non-finite or negative measurements skipped, int64.
        n_backoffs: Control steps that lowered α, int64.
    """

    log_alpha: Tensor
    log_alpha0: Tensor
    rho_fast: Tensor
    rho_slow: Tensor
    n_measured: Tensor
    n_skipped: Tensor
    n_backoffs: Tensor


def init_control(alpha0: Tensor) -> ControlState:
    """Creates the state of L layers that start at α = α₀.

    Args:
        alpha0: Shape (L,), the principled start α₀ of each layer. Must be positive and finite
            (not checked, since checking would read values on the host).

    Returns:
        A fresh state on ``alpha0.device`` with no measurements.

    Raises:
        ValueError: If ``alpha0`` is not 1-D.
    """
    if alpha0.ndim != 1:
        raise ValueError(f"alpha0 must be 1-D with shape (L,), got shape {tuple(alpha0.shape)}")
    log_alpha0 = torch.log(alpha0.detach().to(torch.float32))
    zeros_f = torch.zeros_like(log_alpha0)
    zeros_i = torch.zeros(log_alpha0.shape, dtype=torch.int64, device=log_alpha0.device)
    return ControlState(log_alpha0.clone(), log_alpha0, zeros_f, zeros_f, zeros_i, zeros_i, zeros_i)


def observe(
    state: ControlState, rho: Tensor, config: ControlConfig, mask: Tensor | None = None
) -> ControlState:
    """Folds one measurement of the layers' drift ratio ρ into the EMAs.

    Args:
        state: Current state.
        rho: Shape (L,), this step's ρ per layer, on the state's device; may hold NaN/inf.
        config: Control parameters (uses ``beta_fast`` and ``beta_slow``).
        mask: Optional bool, shape (L,): the layers this measurement covered. Where it is
            False the layer is not observed at all: its EMAs and counters are unchanged and it
            is not counted as skipped, whatever ``rho`` holds there. ``None``: every layer.

    Returns:
        The new state. Where an observed ρ is non-finite or negative the EMAs and
        ``n_measured`` are unchanged and ``n_skipped`` grows by one; α is never changed here.

    Raises:
        ValueError: If ``rho`` or ``mask`` does not have the state's shape (L,).
    """
    shape = state.rho_fast.shape
    if rho.shape != shape:
        raise ValueError(f"rho must have shape {tuple(shape)}, got {tuple(rho.shape)}")
    if mask is not None and mask.shape != shape:
        raise ValueError(f"mask must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    rho = rho.detach()
    if not rho.is_floating_point():
        rho = rho.to(torch.float32)
    valid = torch.isfinite(rho) & (rho >= 0)
    skipped = ~valid
    if mask is not None:
        observed = mask.detach().to(torch.bool)
        valid = valid & observed
        skipped = skipped & observed
    r = torch.where(valid, rho, 0).to(torch.float32).clamp(max=_RHO_CEIL)
    # 1 - 1/n: the running mean until it reaches beta (0 at the first measurement).
    mean_weight = 1.0 - 1.0 / (state.n_measured + 1).to(torch.float32)

    def ema(old: Tensor, beta: float) -> Tensor:
        b = mean_weight.clamp(max=beta)
        return torch.where(valid, b * old + (1.0 - b) * r, old)

    return state._replace(
        rho_fast=ema(state.rho_fast, config.beta_fast),
        rho_slow=ema(state.rho_slow, config.beta_slow),
        n_measured=state.n_measured + valid.to(torch.int64),
        n_skipped=state.n_skipped + skipped.to(torch.int64),
    )


def control_error(state: ControlState, config: ControlConfig) -> Tensor:
    """Returns the log-error e = log ρ_fast − log target of every layer.

    Args:
        state: Current state.
        config: Control parameters (uses ``tolerance``, ``rho_max`` and ``warmup``).

    Returns:
        Shape (L,) float32, finite: positive above target, negative below, 0 where the layer has
        fewer than ``max(warmup, 1)`` valid measurements. ρ values are floored at 1e-30 before
        the logs.
    """
    log_fast = torch.log(state.rho_fast.clamp(min=_RHO_FLOOR))
    log_slow = torch.log(state.rho_slow.clamp(min=_RHO_FLOOR))
    log_target = torch.clamp(log_slow + math.log(config.tolerance), max=math.log(config.rho_max))
    return torch.where(state.n_measured >= max(config.warmup, 1), log_fast - log_target, 0.0)


def update_alpha(state: ControlState, config: ControlConfig) -> ControlState:
    """Applies one control step to every layer's α.

    Args:
        state: Current state.
        config: Control parameters.

    Returns:
        The new state: α backed off by at most ``max_decrease`` where ρ_fast is above target,
        recovered by at most ``recovery`` where it is below, kept within
        [α₀·min_factor, α₀·max_factor]; ``n_backoffs`` counts the layers whose α went down.
    """
    e = control_error(state, config)
    down = -torch.clamp(config.gain * e, max=math.log(config.max_decrease))
    up = torch.clamp(config.gain * -e, max=math.log(config.recovery))
    delta = torch.where(e > 0, down, up)
    lo = state.log_alpha0 + math.log(config.min_factor)
    hi = state.log_alpha0 + math.log(config.max_factor)
    new = torch.minimum(torch.maximum(state.log_alpha + delta, lo), hi)
    return state._replace(
        log_alpha=new,
        n_backoffs=state.n_backoffs + (new < state.log_alpha).to(torch.int64),
    )
