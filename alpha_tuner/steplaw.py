"""The step law: the tuner owns both effective step sizes of every LoRA layer.

Under Adam (ε → 0, weight decay 0) the reparametrisation ``(s, A, B) → (m·s, A/μ, B·μ/m)``
leaves ``s·B·A`` unchanged and continues training as if A's learning rate were multiplied by μ
and B's by ``m/μ`` (:func:`alpha_tuner.rescale.rescale_target_`, DESIGN-NOTES "Two knobs"). So
the magnitude α (``m``) and where its changes are absorbed (the balance μ) span the whole
``(η_A, η_B)`` plane from any base LR and any ``lora_alpha``. This law puts each layer at two
dimensionless targets per optimizer step, as means over the run:

* A's relative step ``a = ‖dA‖_F / ‖A‖_F`` (the sweep's best cells sit at a drift ratio, which
  tracks it, of about 1e-2 whatever the rank; at a small LR A never leaves its random start);
* the relative update ``u = s·‖dB·A + B·dA‖_F / ‖W₀‖_F`` of the layer's weight, the first-order
  change the step makes to the frozen weight it adapts.

Both are ratios of a step to the tensor it changes, so neither depends on the base LR, on α or
on the width the way a learning rate does. The law holds them at the schedule's peak as
``target / f̄``, where ``f̄`` is the schedule's mean factor over the run
(:mod:`alpha_tuner.schedule`, read at the first step): a warm-up + decay schedule with
``f̄ = ½`` gets twice the constant-LR peak, so that the run moves its factors as far as a
constant-LR run at the targets does. At a constant LR ``f̄ = 1`` and nothing changes. (The
constants were chosen at a constant LR; held at the peak under the Trainer's warm-up + decay,
they under-stepped the 600-step MiniLM and the causal-LM benchmarks, benchmarks/FINDINGS.md.)

**At wrap time** (B = 0, so any balance is free) each layer is placed from Adam's first steps,
whose elements have size η: ``a ≈ η_A·√(r·k) / ‖A‖_F`` and ``u ≈ s·η_B·√d·‖A‖_F / ‖W₀‖_F`` for a
``d × k`` layer of rank r (:func:`placement`). **Online** (``adapt=True``) each measurement
folds the measured ``log a`` and ``log u``, divided by the schedule's factor ``lr / initial_lr``,
into an EMA; each control step moves, per layer,

    δ_A = clamp(gain·(log a* − log ā), ±log max_change)        (A's step: μ ← μ·e^{δ_A})
    δ_B = clamp(gain·(log u* − log ū), ±log max_change)        (B's step: m/μ ← e^{δ_B})
    log α ← log α + δ_A + δ_B,    log ā ← log ā + δ_A,    log ū ← log ū + δ_B

within ``[start/bound, start·bound]`` for both multipliers, and zero until ``warmup``
measurements. ``a`` responds to μ exactly (Adam's step does not depend on the factor's scale),
and ``u`` to ``m/μ`` while B's term dominates, so the EMAs are moved by the expected response
and the next step does not apply the same correction twice. Dividing by the schedule's factor
means a warm-up or a decay still acts as the user set it: the law fixes the peak, never the
shape.

**When it decides** is the engine's cadence, not this module's: a control step every
``control_every`` steps, and by default (``fast_start``) one after every measurement of the
first control interval, each of every layer. The placement's size-η elements overestimate
Adam's later steps (which average noisy signs) 2–4× on the benchmarks, so the first decisions
are the ones with the most to correct; made early, with every layer measured, they cost three
extra control steps in the whole run.

**Adam's caution** (``adam_floor``): the law holds *measured* steps, and assumes that a larger
LR gives a larger step. Past some size that fails: a step that overshoots makes the gradient's
sign flip from step to step, ``m̂`` averages to nothing, and Adam's normalised step
``RMS(m̂/(√v̂ + ε))`` falls from its usual 0.2–0.5 to 0.01–0.02. Read as steps that are too
small, that raised α ×90 on one benchmark run (MiniLM-600, r = 4, seed 107) and the model fell
to chance. So where a factor's normalised step is below the floor, the law takes its measured
step as if Adam's were at the floor. The floor is the pure-noise level ``√((1 − β₁)/(1 + β₁))``
(0.23 for β₁ = 0.9): healthy runs sit at or above it; an oscillating gradient, or a ``v̂`` that
remembers larger gradients, goes below it.

**Adam's collapse** (``adam_collapse``): holding the step is not enough after a burst of large
gradients (a loss spike). ``v̂`` remembers the burst for hundreds of steps (β₂ = 0.999), Adam's
normalised step falls to 0.001–0.01, and a run at the law's steps can stay where the burst threw
it: on MiniLM-600 two runs of sixteen from a wrong start fell to one class that way and stayed
there to the end, with the floor holding their (too large) steps. Below the level of a gradient
whose sign flips at *every* step, ``(1 − β₁)/(1 + β₁)`` (0.053 for β₁ = 0.9), oscillation
cannot explain Adam's step; only that memory can. There the law reads the measured step as
larger again by ``adam_collapse / rms``, so it backs both steps off until Adam's own steps come
back; above that level nothing changes. Healthy MiniLM-600 runs touch it in 3–13 layer
measurements each (the benchmark's ``law_collapsed``), most at the last measurement of the
cosine schedule, where the LR is below 0.1 % of its peak; against the same runs without it
(re-run with the same code) their results moved by −0.00 % ± 0.01 %. A run that never goes
below it is the same run bit for bit.

Every function is pure and reads no tensor value on the host.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields, replace
from typing import Literal, NamedTuple, get_args

import torch
from torch import Tensor

__all__ = [
    "UNPLACED",
    "StepLaw",
    "StepState",
    "adam_lift",
    "decide_steps",
    "for_schedule",
    "init_steps",
    "observe_steps",
    "placement",
    "schedule_shift",
]

_FLOOR = 1e-30
#: Smallest Adam step RMS :func:`adam_lift` divides by (both levels over it stay finite in float32).
_RMS_MIN = 1e-12
#: What :func:`placement` returns for a layer it cannot place (compare with ``is``).
UNPLACED = (1.0, 1.0)

#: What A's step can be measured against (:attr:`StepLaw.a_reference`).
AReference = Literal["current", "initial"]
_REFERENCES = get_args(AReference)
#: Fields that may be ``None`` (off, or read at the first step).
_OPTIONAL = ("schedule_mean", "adam_floor", "adam_collapse")
# field -> (lower bound (exclusive), upper bound (exclusive), readable range)
_RANGES: dict[str, tuple[float, float, str]] = {
    "a_step": (0.0, math.inf, "0 < a_step < inf"),
    "update": (0.0, math.inf, "0 < update < inf"),
    "gain": (0.0, math.inf, "0 < gain < inf"),
    "max_change": (1.0, math.inf, "1 < max_change < inf"),
    "bound": (1.0, math.inf, "1 < bound < inf"),
    "beta": (-1e-300, 1.0, "0 <= beta < 1"),
    "warmup": (-1e-300, math.inf, "warmup an integer >= 0"),
    "schedule_mean": (0.0, math.inf, "schedule_mean None or 0 < schedule_mean < inf"),
    "step_rms": (0.0, math.inf, "0 < step_rms < inf"),
    "adam_floor": (0.0, math.inf, "adam_floor None or 0 < adam_floor < inf"),
    "adam_collapse": (0.0, math.inf, "adam_collapse None or 0 < adam_collapse < inf"),
}


@dataclass(frozen=True)
class StepLaw:
    """Targets and gains of the step law (the module docstring has the equations).

    Attributes:
        a_step: Target relative step of A per optimizer step, the mean over the run (at the
            schedule's peak: ``a_step / schedule_mean``), > 0.
        update: Target relative first-order update of the adapted weight per step, the mean
            over the run likewise, > 0.
        gain: Proportional gain on the log-errors, > 0 (1: correct the whole error at once).
        max_change: Largest factor one control step applies to either step size, > 1.
        bound: Each multiplier stays within ``[start/bound, start·bound]``, > 1.
        beta: EMA factor of the log measurements, per measurement, in [0, 1).
        warmup: Valid measurements a layer needs before the law moves it, integer ≥ 0.
        schedule_mean: The LR schedule's mean factor ``f̄`` over the run (mean of
            ``lr / peak``); the targets are mean steps, so the law holds ``target / f̄`` at the
            peak. ``None`` (default): read from the scheduler at the first step
            (:mod:`alpha_tuner.schedule`; 1 without one).
        a_reference: What A's step is relative to: ``"current"`` (default), ``‖A‖`` before the
            step; ``"initial"``, A's norm at wrap time in the current balance's units, so that
            the law holds A's absolute step and its relative step falls as A grows, as plain
            Adam's does.
        step_rms: The size of Adam's per-element step, as a fraction of its learning rate,
            that the wrap-time placement assumes, > 0. 1 (default): Adam's first steps, whose
            elements all move by the full LR. Later steps average noisy gradient signs and are
            smaller, down to ``√((1 − β₁)/(1 + β₁))`` (0.23 for β₁ = 0.9) where noise
            dominates; a smaller value places both steps higher by ``1/step_rms``.
        adam_floor: Where Adam's own normalised step ``RMS(m̂/(√v̂ + ε))`` of a factor
            (:mod:`alpha_tuner.adamstate`) is below it, the law takes that factor's measured
            step as if Adam's were at the floor, so a step that is small because Adam is
            cautious (a gradient whose sign flips from step to step, or a ``v̂`` that
            remembers larger gradients) is not answered by a larger LR. 0.23 (default): the
            level of pure noise, ``√((1 − β₁)/(1 + β₁))`` for β₁ = 0.9 (set
            :func:`~alpha_tuner.adamstate.noise_rms` of yours for other betas). ``None``: the
            law holds the measured steps whatever makes them small. Acts where the inner
            optimizer's step is Adam's or AdamW's
            (:func:`~alpha_tuner.adamstate.steps_like_adam`), not with RAdam, NAdam or Adamax.
        adam_collapse: Where Adam's normalised step of a factor is below it, the law also reads
            that factor's measured step as larger by ``adam_collapse / rms``, so it backs the
            steps off after a burst of large gradients has left Adam's ``v̂`` far above the
            present gradients (the module docstring). 0.053 (default): the level of a gradient
            whose sign flips at every step, ``(1 − β₁)/(1 + β₁)`` for β₁ = 0.9
            (:func:`~alpha_tuner.adamstate.oscillation_rms`); below it only that memory explains
            Adam's step. ``None``: off. Independent of ``adam_floor``: with both, the lifts
            multiply. Acts where ``adam_floor`` does (Adam's and AdamW's steps).
        pool: ``False`` (default): every layer is placed and moved to the targets on its own.
            ``True``: the layers share one move, the geometric mean of their own (over the
            layers measured so far, at every control step; over the placed layers at wrap
            time), so they keep the proportions the recipe gives them, as plain LoRA's one α
            and one LR do, and the law tunes only the model's two step sizes.

    Raises:
        ValueError: If a field is not a real number in its range; the message names it.
    """

    a_step: float = 1e-2
    update: float = 3e-4
    gain: float = 1.0
    max_change: float = 4.0
    bound: float = 1e4
    beta: float = 0.5
    warmup: int = 1
    schedule_mean: float | None = None
    a_reference: AReference = "current"
    step_rms: float = 1.0
    adam_floor: float | None = 0.23
    adam_collapse: float | None = 0.053
    pool: bool = False

    def __post_init__(self) -> None:
        if self.a_reference not in _REFERENCES:
            raise ValueError(f"StepLaw.a_reference must be one of {_REFERENCES}, got {self.a_reference!r}")
        if not isinstance(self.pool, bool):
            raise ValueError(f"StepLaw.pool must be True or False, got {self.pool!r}")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("a_reference", "pool") or (f.name in _OPTIONAL and value is None):
                continue
            lo, hi, valid = _RANGES[f.name]
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
            if f.name == "warmup":
                ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
            if not (ok and lo < float(value) < hi):
                raise ValueError(f"StepLaw.{f.name} must satisfy {valid}, got {value!r}")

    @property
    def reads_adam(self) -> bool:
        """Whether the law reads Adam's normalised step (``adam_floor`` or ``adam_collapse`` set)."""
        return self.adam_floor is not None or self.adam_collapse is not None


def for_schedule(config: StepLaw, mean: float) -> StepLaw:
    """The law whose peak targets give ``config``'s targets as the mean over a schedule of mean
    factor ``mean`` (``f̄``): ``a_step / f̄`` and ``update / f̄``, with ``schedule_mean = f̄``.

    Raises:
        ValueError: If ``mean`` is not finite and positive.
    """
    if not (math.isfinite(mean) and mean > 0):
        raise ValueError(f"the schedule's mean factor must be finite and > 0, got {mean!r}")
    return replace(config, a_step=config.a_step / mean, update=config.update / mean, schedule_mean=mean)


def schedule_shift(mean: float) -> tuple[float, float]:
    """``(m, μ)`` that move a layer placed for a constant LR to the peak targets of a schedule of
    mean factor ``mean``: both steps ×1/f̄, i.e. A's by ``μ = 1/f̄`` and B's by ``m/μ = 1/f̄``."""
    return 1.0 / mean**2, 1.0 / mean


class StepState(NamedTuple):
    """Per-layer state of the step law; every field has shape (L,) on one device.

    Attributes:
        log_alpha: Current log α, float32.
        log_alpha0: Log α at the start (after placement), float32.
        log_alpha_recipe: Log of the recipe's α (before placement), float32.
        log_balance: Log of the balance μ applied since wrap time (A divided by e^it), float32.
        log_balance0: Log of the balance of the placement, float32.
        log_a_step: EMA of log(a / schedule factor), float32 (0 before a measurement).
        log_update: EMA of log(u / schedule factor), float32 (0 before a measurement).
        n_measured: Valid measurements so far, int64.
        n_skipped: Non-finite, non-positive or unscaled measurements skipped, int64.
        a_norm0: ``‖A‖_F`` at wrap time, before placement, float32 (1 where not given); with
            ``log_balance`` it gives A's wrap-time norm in today's units
            (``a_reference="initial"``).
        n_collapsed: Valid measurements in which Adam's normalised step of A or B was below
            ``adam_collapse``, so that the law read them as too large (it backed off), int64.
    """

    log_alpha: Tensor
    log_alpha0: Tensor
    log_alpha_recipe: Tensor
    log_balance: Tensor
    log_balance0: Tensor
    log_a_step: Tensor
    log_update: Tensor
    n_measured: Tensor
    n_skipped: Tensor
    a_norm0: Tensor
    n_collapsed: Tensor


def init_steps(
    alpha0: Tensor,
    *,
    balance0: Tensor | None = None,
    alpha_recipe: Tensor | None = None,
    a_norm0: Tensor | None = None,
) -> StepState:
    """The state of L layers starting at α = ``alpha0`` (shape (L,), positive), unmeasured.

    Args:
        alpha0: α after placement.
        balance0: The placement's balance μ (default 1).
        alpha_recipe: The recipe's α before placement (default ``alpha0``).
        a_norm0: ``‖A‖_F`` of each layer at wrap time, before placement (default 1).

    Raises:
        ValueError: If ``alpha0`` is not 1-D.
    """
    if alpha0.ndim != 1:
        raise ValueError(f"alpha0 must be 1-D with shape (L,), got shape {tuple(alpha0.shape)}")
    log_alpha0 = torch.log(alpha0.detach().to(torch.float32))
    zeros = torch.zeros_like(log_alpha0)
    log_mu = zeros if balance0 is None else torch.log(balance0.detach().to(log_alpha0))
    log_recipe = log_alpha0 if alpha_recipe is None else torch.log(alpha_recipe.detach().to(log_alpha0))
    counts = torch.zeros(log_alpha0.shape, dtype=torch.int64, device=log_alpha0.device)
    norm0 = torch.ones_like(log_alpha0) if a_norm0 is None else a_norm0.detach().to(log_alpha0)
    return StepState(
        log_alpha0.clone(), log_alpha0, log_recipe, log_mu.clone(), log_mu, zeros, zeros, counts, counts,
        norm0, counts,
    )  # fmt: skip


def observe_steps(
    state: StepState,
    a_step: Tensor,
    update: Tensor,
    scale: float | Tensor,
    config: StepLaw,
    mask: Tensor | None = None,
    *,
    a_norm: Tensor | None = None,
    adam_rms: Tensor | None = None,
) -> StepState:
    """Fold one measurement of ``a`` and ``u`` (shape (L,)) taken at schedule factor ``scale``.

    Args:
        state: Current state.
        a_step: ``‖dA‖/‖A‖`` per layer; NaN where not measured.
        update: ``s·‖dB·A + B·dA‖/‖W₀‖`` per layer; NaN where not measured.
        scale: The schedule's factor ``lr / initial_lr`` of the measured step: a host float,
            or a 0-dim tensor when the optimizer's LR is a tensor (never read on the host).
        config: The law (uses ``beta`` and ``a_reference``).
        mask: Bool (L,): the layers this measurement covered (``None``: all).
        a_norm: ``‖A‖`` before the step per layer; needed with ``a_reference="initial"``,
            where ``a`` is measured against A's wrap-time norm in today's units instead,
            ``a·‖A‖ / (a_norm0·e^{−log_balance})``.
        adam_rms: (2, L): Adam's normalised step RMS of A and of B in this step
            (:func:`alpha_tuner.adamstate.adam_step_rms`); with ``config.adam_floor`` set, ``a``
            is multiplied by ``max(1, floor / rms_A)`` and ``u`` by ``max(1, floor / rms_B)``,
            and with ``config.adam_collapse`` set by ``max(1, collapse / rms)`` likewise (NaN:
            1), see :attr:`StepLaw.adam_floor` and :attr:`StepLaw.adam_collapse`.

    Returns:
        The new state. A layer whose ``a`` or ``u`` is not finite and positive, or any layer
        when ``scale`` is not positive (a step at LR 0), is skipped and counted.
    """
    shape = state.log_a_step.shape
    if a_step.shape != shape or update.shape != shape:
        raise ValueError(f"a_step and update must have shape {tuple(shape)}, got {tuple(a_step.shape)}")
    if config.a_reference == "initial":
        if a_norm is None:
            raise ValueError("observe_steps: a_reference='initial' needs a_norm, A's norm before the step")
        a_step = a_step * a_norm * torch.exp(state.log_balance) / state.a_norm0
    observed = torch.ones_like(state.n_measured, dtype=torch.bool) if mask is None else mask.to(torch.bool)
    # a and u as one (2, L) tensor: the same arithmetic per element in half the kernel launches,
    # which are what a measuring step costs on an accelerator.
    x = torch.stack((a_step.detach(), update.detach())).to(torch.float32)
    collapsed: Tensor | None = None
    if adam_rms is not None:
        rms = adam_rms.to(x)
        x = x * adam_lift(rms, config)
        if config.adam_collapse is not None:  # where the lift acted (rms 0 or NaN: not read)
            collapsed = ((rms > 0) & (rms < config.adam_collapse)).any(dim=0)
    valid = observed & (torch.isfinite(x) & (x > 0)).all(dim=0)
    log_scale: float | Tensor
    if isinstance(scale, Tensor):  # a tensor LR's factor: checked on the device, never read
        scale = scale.detach().to(x)
        usable = (scale > 0) & torch.isfinite(scale)
        valid = valid & usable
        log_scale = torch.where(usable, scale, 1.0).log()
    elif scale > 0 and math.isfinite(scale):
        log_scale = math.log(scale)
    else:
        valid, log_scale = torch.zeros_like(valid), 0.0
    weight = (1.0 - 1.0 / (state.n_measured + 1).to(torch.float32)).clamp(max=config.beta)
    old = torch.stack((state.log_a_step, state.log_update))
    new = torch.log(torch.where(valid, x, 1.0).clamp(min=_FLOOR)) - log_scale
    log_a_step, log_update = torch.where(valid, weight * old + (1.0 - weight) * new, old).unbind(0)
    return state._replace(
        log_a_step=log_a_step,
        log_update=log_update,
        n_measured=state.n_measured + valid.to(torch.int64),
        n_skipped=state.n_skipped + (observed & ~valid).to(torch.int64),
        n_collapsed=state.n_collapsed
        if collapsed is None
        else state.n_collapsed + (valid & collapsed).to(torch.int64),
    )


def adam_lift(rms: Tensor, config: StepLaw) -> Tensor | float:
    """What a measured step is multiplied by where Adam's normalised step is ``rms`` (any
    shape): ``max(1, adam_floor / rms) · max(1, adam_collapse / rms)``, each factor only where
    its field is set; 1 where ``rms`` is NaN, 0 or infinite (not read). Exactly 1 (a float) with
    neither. ``rms`` is taken as at least ``1e-12``, so that the deepest collapse still gives a
    finite (and the largest) lift instead of overflowing float32."""
    levels = [level for level in (config.adam_floor, config.adam_collapse) if level is not None]
    if not levels:
        return 1.0
    read = torch.isfinite(rms) & (rms > 0)
    safe = torch.where(read, rms, 1.0).clamp(min=_RMS_MIN)
    lift = (levels[0] / safe).clamp(min=1.0)
    for level in levels[1:]:
        lift = lift * (level / safe).clamp(min=1.0)
    return torch.where(read, lift, 1.0)


def decide_steps(
    state: StepState, config: StepLaw, movable: Tensor | None = None
) -> tuple[StepState, Tensor]:
    """One control step of every layer.

    With ``config.pool`` every layer in ``movable`` (bool (L,); ``None``: all) takes the mean of
    the ready layers' moves (none while no layer is ready), so those layers move together; the
    others stay where they are.

    Returns:
        The new state and ``δ_A`` (shape (L,)): the caller divides A by ``e^{δ_A}`` and sets α to
        ``e^{log_alpha}`` (B then takes ``e^{δ_A}·α_old/α_new``), which changes A's step by
        ``e^{δ_A}`` and B's by ``e^{δ_B}``.
    """
    ready = state.n_measured >= max(config.warmup, 1)
    cap = math.log(config.max_change)
    d_a = torch.clamp(config.gain * (math.log(config.a_step) - state.log_a_step), -cap, cap)
    d_b = torch.clamp(config.gain * (math.log(config.update) - state.log_update), -cap, cap)
    d_a, d_b = torch.where(ready, d_a, 0.0), torch.where(ready, d_b, 0.0)
    if config.pool:  # one move for all: the mean over the ready layers (each capped already)
        count = ready.sum().clamp(min=1).to(d_a.dtype)
        moving = torch.ones_like(ready) if movable is None else movable.to(torch.bool)
        d_a, d_b = (torch.where(moving, d.sum() / count, 0.0) for d in (d_a, d_b))
    # Bounds: μ within ±log bound of its start; α (= m·α₀) likewise around α₀·e^{log μ}.
    span = math.log(config.bound)
    balance = torch.clamp(state.log_balance + d_a, state.log_balance0 - span, state.log_balance0 + span)
    d_a = balance - state.log_balance
    log_alpha = state.log_alpha + d_a + d_b
    lo, hi = state.log_alpha0 - 2 * span, state.log_alpha0 + 2 * span
    log_alpha = torch.minimum(torch.maximum(log_alpha, lo), hi)
    d_b = log_alpha - state.log_alpha - d_a
    new = state._replace(
        log_alpha=log_alpha,
        log_balance=balance,
        log_a_step=state.log_a_step + d_a,
        log_update=state.log_update + d_b,
    )
    return new, d_a


def placement(
    *,
    lr_a: float,
    lr_b: float,
    scaling: float,
    rank: int,
    fan_in: int,
    fan_out: int,
    a_norm: float,
    weight_norm: float,
    config: StepLaw,
) -> tuple[float, float]:
    """The wrap-time ``(m, μ)`` that put a fresh layer (B = 0) at the law's targets under Adam.

    Adam moves every element by about ``k = step_rms`` times its learning rate (k = 1 for its
    first steps; :attr:`StepLaw.step_rms`), so a step of A is ``a ≈ k·lr_a·√(rank·fan_in)/a_norm``
    and one of B changes the weight by ``u ≈ k·scaling·lr_b·√fan_out·a_norm/weight_norm``. With
    μ = a*/a and ``m/μ = u*/u`` both are on target.

    Returns:
        ``(m, μ)``: multiply α by ``m`` and divide A by ``μ`` (:func:`rescale_target_`'s
        ``balance``). :data:`UNPLACED`, ``(1, 1)``, when a quantity is zero or not finite
        (nothing to place).
    """
    rms = config.step_rms
    a = rms * lr_a * math.sqrt(rank * fan_in) / a_norm if a_norm > 0 else math.nan
    u = rms * scaling * lr_b * math.sqrt(fan_out) * a_norm / weight_norm if weight_norm > 0 else math.nan
    if not all(math.isfinite(x) and x > 0 for x in (a, u)):
        return UNPLACED
    mu = config.a_step / a
    return mu * config.update / u, mu
