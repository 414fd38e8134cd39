"""The tuning engine: the tuner's state and what happens before and after each optimizer step.

:class:`TuningEngine` owns everything the tuner decides and keeps: the LoRA targets, the α rule
applied at construction, the drift meter and the controller. A training loop reaches it in one
of two ways, both of which only call :meth:`TuningEngine.before_step` and
:meth:`TuningEngine.after_step` around the inner optimizer's own ``step()``:

* :class:`alpha_tuner.AlphaTunedOptimizer`, a thin ``torch.optim.Optimizer`` adapter that a
  recipe builds and hands to the Trainer;
* :func:`alpha_tuner.attach`, which registers the two calls as torch's step pre/post hooks on an
  optimizer the recipe already built.

State (:class:`TunerState`, a typed tuple): host counters (steps, phase) and device tensors
(:class:`~alpha_tuner.control.ControlState`, the last ρ per layer). ``before_step`` snapshots
the factors on measurement steps; ``after_step`` measures ρ, folds it into the controller and,
on control steps, moves α through the function-preserving rescale. Steps that are not control
steps never read a device value on the host; a control step makes one batched transfer.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from ._checks import check_int
from .control import ControlConfig, ControlState, init_control, observe, update_alpha
from .discovery import LoraTarget, display_names, find_lora_targets, param_ids
from .distributed import broadcast_state, is_sharded, unwrap_model
from .drift import lora_matrices
from .gradunits import GradUnits
from .heads import HEAD_LR, find_head_parameters, lift_head_lr_
from .measure import DriftMeter
from .persistence import pack_tuner_state, unpack_tuner_state
from .principled import principled_alphas
from .rescale import group_map, rescale_state_, rescale_targets_, update_adapter_config, write_alpha
from .rule import AlphaRule
from .schedule import ScheduleShape, read_schedule
from .steplaw import (
    UNPLACED,
    StepLaw,
    StepState,
    decide_steps,
    for_schedule,
    init_steps,
    observe_steps,
    placement,
    schedule_shift,
)
from .telemetry import summarize

__all__ = ["EngineOptions", "TunerState", "TuningEngine"]

#: Relative change of α below which a control step leaves a layer alone (float32 round-off).
_ALPHA_RTOL = 1e-6
_CLOSURE_OPTIMIZERS = ("LBFGS",)


class TunerState(NamedTuple):
    """What the engine keeps between steps.

    Attributes:
        steps: Optimizer steps taken (host int).
        phase: The measurement phase the next measurement covers (host int).
        control: Per-layer controller state, every field of shape (L,) on the device.
        rho: Each layer's most recent ρ, shape (L,) float32 (NaN before its first measurement).
        measured_once: Whether any measurement has been taken.
        law: The step law's per-layer state (``None`` when the step law is off).
    """

    steps: int
    phase: int
    control: ControlState
    rho: Tensor
    measured_once: bool
    law: StepState | None = None


@dataclass(frozen=True)
class EngineOptions:
    """The engine's settings, validated once (see :class:`alpha_tuner.AlphaTunedOptimizer`)."""

    init: Literal["principled", "keep"] = "principled"
    adapt: bool = True
    measure: bool | None = None
    measure_every: int = 10
    measure_phases: int = 4
    control_every: int = 40
    rule: AlphaRule | None = None
    control: ControlConfig | None = None
    head_lr: float | None = HEAD_LR
    steps: StepLaw | Literal["auto"] | None = "auto"
    fast_start: bool = True

    def __post_init__(self) -> None:
        if self.init not in ("principled", "keep"):
            raise ValueError(f"init must be 'principled' or 'keep', got {self.init!r}.")
        check_int("measure_every", self.measure_every, 1)
        check_int("measure_phases", self.measure_phases, 1)
        check_int("control_every", self.control_every, 1)
        cycle = self.measure_every * self.measure_phases
        if self.control_every % cycle:
            fix = -(-self.control_every // cycle) * cycle  # the next multiple
            raise ValueError(
                f"control_every ({self.control_every}) must be a multiple of measure_every × "
                f"measure_phases ({self.measure_every} × {self.measure_phases} = {cycle}) so that every "
                f"control decision sees a fresh measurement of every layer: use control_every={fix}, "
                "or change measure_every or measure_phases."
            )
        if self.control is not None and not isinstance(self.control, ControlConfig):
            got = type(self.control).__name__
            raise TypeError(f"control must be an alpha_tuner.ControlConfig, got {got}.")
        if self.steps is not None and self.steps != "auto" and not isinstance(self.steps, StepLaw):
            raise TypeError(
                f"steps must be an alpha_tuner.StepLaw, 'auto' or None, got {type(self.steps).__name__}."
            )
        if self.rule is not None and not isinstance(self.rule, AlphaRule):
            raise TypeError(f"rule must be an alpha_tuner.AlphaRule, got {type(self.rule).__name__}.")
        if not isinstance(self.fast_start, bool):
            raise TypeError(f"fast_start must be True or False, got {self.fast_start!r}.")
        if self.adapt and self.measure is False:
            raise ValueError("adapt=True needs measure=True: the controller acts on measured drift ratios.")


def check_optimizer(optimizer: object) -> torch.optim.Optimizer:
    """``optimizer`` if the engine can tune around it.

    Raises:
        TypeError: If it is not a constructed torch optimizer, or needs a closure (LBFGS).
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a constructed torch.optim.Optimizer, got {type(optimizer).__name__}. "
            "Example: AlphaTunedOptimizer(torch.optim.AdamW(model.parameters(), lr=2e-5), model)."
        )
    if type(optimizer).__name__ in _CLOSURE_OPTIMIZERS:
        raise TypeError(
            f"{type(optimizer).__name__} re-evaluates the loss through a closure several times per "
            "step, so a step has no single LoRA update to measure or rescale. Use a first-order "
            "optimizer such as torch.optim.AdamW."
        )
    return optimizer


def _adam_family(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every group steps like Adam (``betas`` and a second-moment state): the step law's
    placement and response model assume that each element moves by about its learning rate."""
    return all("betas" in group for group in optimizer.param_groups)


def resolve_steps(options: EngineOptions, optimizer: torch.optim.Optimizer) -> StepLaw | None:
    """The step law this run uses, or ``None`` for the α rule and the back-off law.

    ``"auto"`` (the default) is :class:`StepLaw` with its defaults for an Adam-family optimizer
    and the rule otherwise; naming a ``rule`` or a ``control`` asks for the rule, so ``"auto"``
    gives the rule then too. An explicit :class:`StepLaw` applies to Adam-family optimizers
    only (the caller warns for the others).

    Args:
        options: The engine's options (``steps``, ``rule`` and ``control`` are read).
        optimizer: The inner optimizer.

    Returns:
        The step law to run, or ``None``.
    """
    if not _adam_family(optimizer):
        return None
    if options.steps == "auto":
        return None if options.rule is not None or options.control is not None else StepLaw()
    return options.steps


def _all_factors(targets: Iterable[LoraTarget]) -> list[nn.Parameter]:
    """A, B and B's bias of every target."""
    return [p for t in targets for p in (t.weight_a, *t.factor_params())]


def _weight_norm(target: LoraTarget) -> Tensor:
    """``‖W₀‖_F`` of the frozen weight the layer adapts (NaN when it is not a float tensor)."""
    weight = getattr(target.layer.get_base_layer(), "weight", None)
    if not isinstance(weight, Tensor) or not weight.is_floating_point() or weight.is_meta:
        # Quantised, absent or not materialised: the law leaves the layer alone. On A's device,
        # so that it stacks with the norms of the others (a QLoRA model on CUDA).
        return torch.tensor(math.nan, device=target.weight_a.device)
    return _norm(weight)


def _norm(tensor: Tensor) -> Tensor:
    """``‖tensor‖_F`` as a plain tensor (a sharded DTensor's norm is reduced over its shards)."""
    norm = tensor.detach().float().norm()
    return norm.full_tensor() if is_sharded(norm) else norm


class TuningEngine:
    """The tuner around one inner optimizer and one PEFT model.

    Args:
        optimizer: The inner optimizer (it does every parameter update).
        model: The PEFT model (DDP wrappers are unwrapped).
        options: The settings.

    Raises:
        TypeError: See :func:`check_optimizer`.
        ValueError: For a model without trainable LoRA layers or LoRA parameters missing from
            the optimizer.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, options: EngineOptions) -> None:
        self.optimizer = check_optimizer(optimizer)
        self.options = options
        self.rule = options.rule or AlphaRule()
        self.control_config = options.control or ControlConfig()
        #: The step law in force (its peak targets once the schedule is known), or None.
        self.step_law = resolve_steps(options, optimizer)
        self._given_law = self.step_law
        #: The LR schedule's shape (:mod:`alpha_tuner.schedule`); read at the first step unless given.
        self.schedule: ScheduleShape | None = None
        #: Optimizers a scheduler may drive besides the inner one (the wrapper adds itself).
        self.schedule_owners: list[torch.optim.Optimizer] = []
        #: The run's number of optimizer steps, when known before the first step (the Trainer's
        #: ``max_steps``, set by AlphaTunerCallback): the horizon of a schedule that names none.
        self.run_length: int | None = None
        if self.step_law is not None and self.step_law.schedule_mean is not None:
            self._use_schedule(ScheduleShape(self.step_law.schedule_mean, "given"))
        if isinstance(options.steps, StepLaw) and self.step_law is None:
            warnings.warn(
                f"The step law needs an Adam-family optimizer (its placement assumes Adam's step), got "
                f"{type(optimizer).__name__}; the tuner uses the alpha rule and the back-off law instead.",
                RuntimeWarning,
                stacklevel=3,
            )
        self.adapt = bool(options.adapt)
        self.measuring = self.adapt if options.measure is None else bool(options.measure)
        self.model = model = unwrap_model(model)  # DDP's `module.` prefix would break state keys
        self.targets: list[LoraTarget] = find_lora_targets(model)
        self.names = display_names(self.targets)
        self._check_in_optimizer()
        heads = [] if options.head_lr is None else [p for _, p in find_head_parameters(model)]
        #: How many parameters of ``modules_to_save`` had their learning rate raised to ``head_lr``
        #: (with the step law: set to it, lowered too, so the head does not follow the base LR).
        exact = self.step_law is not None
        self.head_params_lifted = (
            0 if options.head_lr is None else lift_head_lr_(optimizer, heads, options.head_lr, exact=exact)
        )
        # When B is already trained (an adapter loaded before wrapping), init's rescale changes it:
        # keep the weights as they were, so that a checkpoint loaded before the first step can
        # put them back exactly (see load()). Freed at the first step or load of a checkpoint.
        self._before_init: list[tuple[nn.Parameter, Tensor]] | None = None
        recipe_alphas = [t.alpha for t in self.targets]
        # With the step law, gradients of the rescaled factors are reported in the recipe's units.
        self._units = GradUnits(_all_factors(self.targets)) if self.step_law is not None else None
        placed = [False] * len(self.targets)  # layers the law placed (re-placed for the schedule)
        norms = None  # (2, L) for the law: ‖A‖ before placement and ‖W₀‖ of every layer
        if self.step_law is not None:
            with torch.no_grad():
                norms = torch.stack(
                    [torch.stack((_norm(t.weight_a), _weight_norm(t))) for t in self.targets], dim=1
                )
        if options.init == "principled":
            alphas = principled_alphas(self.targets, optimizer.param_groups, self.rule)
            balances = [1.0] * len(self.targets)
            if norms is not None:
                alphas, balances, placed = self._placements(norms)
            factors = [p for t in self.targets for p in t.factor_params()]
            with torch.no_grad():  # construction time: one host read for all layers
                trained = bool(torch.stack([p.detach().ne(0).any() for p in factors]).any())
                if trained:
                    self._before_init = [(p, p.detach().clone()) for p in factors]
            self._rescale(self.targets, alphas, balances)
        # In-place writes to B since init (load_state_dict of the adapter bumps this counter).
        self._b_versions = [t.weight_b._version for t in self.targets]
        update_adapter_config(model, self.targets)

        self.device = self.targets[0].weight_b.device
        alpha0 = torch.tensor([t.alpha for t in self.targets], dtype=torch.float32, device=self.device)
        self.meter = self._new_meter() if self.measuring else None
        self._slots = [slot for t in self.targets for slot in t.factor_slots()]
        self._meter_params = self._factor_ids()
        self._lora_ids = frozenset(self._meter_params)
        rho = torch.full((len(self.targets),), math.nan, dtype=torch.float32, device=self.device)
        law = None
        if norms is not None:  # the step law
            as_tensor = lambda values: torch.tensor(values, dtype=torch.float32, device=self.device)  # noqa: E731
            balance0 = as_tensor(balances) if options.init == "principled" else None
            a_norms0, self._weight_norms = norms.to(self.device).unbind(0)
            law = init_steps(
                alpha0, balance0=balance0, alpha_recipe=as_tensor(recipe_alphas), a_norm0=a_norms0
            )
            divisors = [t.divisor for t in self.targets]
            self._divisors = torch.tensor(divisors, dtype=torch.float32, device=self.device)
            # Which layers the law placed: the host list drives the first step's rescale, the
            # device mask its state update (made here, so that step copies nothing to the device).
            self._placed_list = placed
            self._placed = torch.tensor(placed, dtype=torch.bool, device=self.device)
        self.state = TunerState(
            steps=0, phase=0, control=init_control(alpha0), rho=rho, measured_once=False, law=law
        )
        self._measuring_now = False
        #: The fast start's one-phase meter (see _fast_now), dropped when the fast start ends.
        self._full_meter = self._new_start_meter()

    # ------------------------------------------------------------------------ construction
    def _placements(self, norms: Tensor) -> tuple[list[float], list[float], list[bool]]:
        """α, balance and whether it was placed, of every layer, from
        :func:`~alpha_tuner.steplaw.placement` and the (2, L) ``‖A‖``, ``‖W₀‖`` (one host read)."""
        assert self.step_law is not None  # only called with the step law on
        # The schedule's base LR: a scheduler made before wrapping has already lowered ``lr``.
        groups = self.optimizer.param_groups
        lr_of = {id(p): float(g.get("initial_lr", g["lr"])) for g in groups for p in g["params"]}
        alphas, balances, placed = [], [], []
        for t, (a_norm, w_norm) in zip(self.targets, norms.T.tolist(), strict=True):
            a2d, b2d = lora_matrices(t.weight_a, t.weight_b)
            m, mu = placement(
                lr_a=lr_of[id(t.weight_a)], lr_b=lr_of[id(t.weight_b)],
                scaling=t.scaling, rank=t.rank, fan_in=a2d.shape[1], fan_out=b2d.shape[0],
                a_norm=a_norm, weight_norm=w_norm, config=self.step_law,
            )  # fmt: skip
            alphas.append(t.alpha * m)
            balances.append(mu)
            placed.append((m, mu) is not UNPLACED)
        return alphas, balances, placed

    def _new_meter(self, phases: int | None = None) -> DriftMeter:
        return DriftMeter(self.targets, self.device, phases=phases or self.options.measure_phases)

    def _factor_ids(self) -> tuple[int, ...]:
        """Identity of the live A and B factors (checked at each measurement: cheap lookups)."""
        return tuple(id(module._parameters[name]) for module, name in self._slots)

    def _check_in_optimizer(self) -> None:
        in_opt = param_ids(p for g in self.optimizer.param_groups for p in g["params"])
        missing = [
            t.module_name
            for t in self.targets
            if id(t.weight_a) not in in_opt or id(t.weight_b) not in in_opt
        ]
        if missing:
            shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
            raise ValueError(
                f"{len(missing)} trainable LoRA layer(s) have factors that the optimizer does not update "
                f"({shown}). Build the optimizer from model.parameters() (or include every lora_A/lora_B "
                "parameter), or freeze those adapters before wrapping."
            )

    # ---------------------------------------------------------------------------- hot path
    def before_step(self) -> None:
        """Snapshot the factors of this measurement's phase if the coming step is measured."""
        options = self.options
        if self.schedule is None and self.step_law is not None:
            self._read_schedule()
        self._measuring_now = self.meter is not None and (self.state.steps + 1) % options.measure_every == 0
        if not self._measuring_now:
            return
        if self._factor_ids() != self._meter_params:
            # Parameters were replaced after wrapping (FSDP2 via Accelerate): re-group.
            self.meter = self._new_meter()
            self._full_meter = self._new_start_meter()
            self._meter_params = self._factor_ids()
        if self._fast_now():
            self._full_meter.snapshot(0)  # type: ignore[union-attr]
        else:
            self._full_meter = None  # the fast start is over: free its snapshot
            self.meter.snapshot(self.state.phase)  # type: ignore[union-attr]

    def _fast_now(self) -> bool:
        """Whether the coming step is in the fast start: the first control interval of an
        adaptive step law with ``fast_start``, where every measurement covers every layer and
        is followed by a control step."""
        return (
            self.options.fast_start
            and self.adapt
            and self.step_law is not None
            and self.state.steps < self.options.control_every
        )

    def _new_start_meter(self) -> DriftMeter | None:
        """The fast start's meter, one phase (every layer in each measurement): the rotation's
        own when it has one phase, else a new one, made outside the hot path (its index tensors
        are host-to-device copies); ``None`` when the fast start is not (or no longer) on."""
        if self.meter is None or not self._fast_now():
            return None
        return self.meter if self.meter.num_phases == 1 else self._new_meter(phases=1)

    @torch.no_grad()
    def after_step(self) -> None:
        """Measure ρ of the step just taken (if snapshotted) and act on the control cadence."""
        state = self.state
        fast = self._fast_now()
        if self._measuring_now and self.meter is not None:
            m = (self._full_meter if fast else self.meter).measure()  # type: ignore[union-attr]
            if state.law is not None and self.step_law is not None:
                scaling = torch.exp(state.law.log_alpha) / self._divisors
                update = scaling * m.signal / self._weight_norms
                factor = self._schedule_factor()
                law = observe_steps(
                    state.law, m.a_step, update, factor, self.step_law, m.measured, a_norm=m.a_norm
                )
                state = state._replace(law=law)
            else:  # the rule's controller (idle under the step law: its kernels would be wasted)
                control = observe(state.control, m.rho, self.control_config, mask=m.measured)
                state = state._replace(control=control)
            state = state._replace(
                rho=torch.where(m.measured, m.rho, state.rho),
                measured_once=True,
                # the fast start's measurements cover every layer: the rotation starts after it
                phase=state.phase if fast else (state.phase + 1) % self.meter.num_phases,
            )
        decide = self._measuring_now and fast  # the fast start decides after each measurement
        self._measuring_now = False
        state = state._replace(steps=state.steps + 1)
        self.state = state
        self._before_init = None  # only a load before the first step may need it
        if self.adapt and (decide or state.steps % self.options.control_every == 0):
            self._control_step()

    def _read_schedule(self) -> None:
        """At the first step (the Trainer makes its scheduler after the optimizer): read the
        schedule's mean factor and move every placed layer to the law's peak targets for it."""
        shape = read_schedule(
            [self.optimizer, *self.schedule_owners],
            group=self._lora_group_index() or 0,
            default_steps=self.run_length,
        )
        self._use_schedule(shape)
        if shape.source.startswith("unknown"):
            why = shape.source.removeprefix("unknown: ")
            warnings.warn(
                f"The step law cannot read the LR schedule's shape ({why}); "
                "it holds its targets at the schedule's peak, which over-steps a constant-LR run and "
                "under-steps a decaying one. Pass steps=StepLaw(schedule_mean=<mean of lr/peak over the "
                "run>) to say it.",
                RuntimeWarning,
                stacklevel=4,
            )
        law = self.state.law
        if shape.mean == 1.0 or law is None or self.options.init != "principled":
            return  # init="keep": the control steps move the layers to the new targets
        m, mu = schedule_shift(shape.mean)
        moved = [t for t, placed in zip(self.targets, self._placed_list, strict=True) if placed]
        self._rescale(moved, [t.alpha * m for t in moved], balances=[mu] * len(moved))
        update_adapter_config(self.model, self.targets)
        log_m, log_mu = math.log(m), math.log(mu)
        shift = lambda x, by: torch.where(self._placed, x + by, x)  # noqa: E731
        self.state = self.state._replace(
            law=law._replace(
                log_alpha=shift(law.log_alpha, log_m),
                log_alpha0=shift(law.log_alpha0, log_m),
                log_balance=shift(law.log_balance, log_mu),
                log_balance0=shift(law.log_balance0, log_mu),
            )
        )

    def _restore_schedule(self, saved: tuple[float, str] | None, *, resumed: bool) -> None:
        """The law's schedule from a checkpoint: its saved shape, or for a resumed run saved
        before the law read schedules, the peak semantics it ran with (mean 1)."""
        if self._given_law is None or (saved is None and not resumed):
            return  # a fresh entry: the schedule is read at the first step as usual
        self._use_schedule(ScheduleShape(*(saved if saved is not None else (1.0, "checkpoint"))))

    def _use_schedule(self, shape: ScheduleShape) -> None:
        """Hold the user's targets as run means over a schedule of this shape."""
        assert self._given_law is not None  # only called with the step law on
        self.schedule = shape
        self.step_law = for_schedule(self._given_law, shape.mean)

    def _lora_group_index(self) -> int | None:
        """Index of the first param group holding LoRA factors (None if none does)."""
        groups = self.optimizer.param_groups
        lora = self._lora_ids
        return next((i for i, g in enumerate(groups) if any(id(p) in lora for p in g["params"])), None)

    def _schedule_factor(self) -> float:
        """``lr / initial_lr`` of the first group holding LoRA factors (1 without a scheduler)."""
        index = self._lora_group_index()
        if index is None:
            return 1.0
        group = self.optimizer.param_groups[index]
        initial = group.get("initial_lr", group["lr"])
        return float(group["lr"]) / float(initial) if initial else 0.0

    def _control_step(self) -> None:
        if self.state.law is not None and self.step_law is not None:
            self._law_step(self.state.law, self.step_law)
            return
        # Multi-process: every rank takes rank 0's state (one collective; none on other steps).
        control = broadcast_state(update_alpha(self.state.control, self.control_config))
        self.state = self.state._replace(control=control)
        # The one host transfer of a control interval: PEFT keeps its scalings as floats. The
        # device log α already holds these values, so no host-to-device copy follows.
        self._apply_alphas(torch.exp(control.log_alpha).tolist())

    def _law_step(self, law: StepState, config: StepLaw) -> None:
        new, d_a = decide_steps(law, config)
        new = broadcast_state(new)  # every rank takes rank 0's decision
        # The one host transfer of a control interval: PEFT's scalings and the rescale take floats.
        values = torch.stack((torch.exp(new.log_alpha), torch.exp(d_a))).tolist()
        self.state = self.state._replace(law=new)
        changed = [
            (target, alpha, balance)
            for target, alpha, balance in zip(self.targets, *values, strict=True)
            if abs(alpha / target.alpha - 1.0) > _ALPHA_RTOL or abs(balance - 1.0) > _ALPHA_RTOL
        ]
        if changed:
            moved, alphas, balances = zip(*changed, strict=True)
            self._rescale(moved, alphas, balances=balances)
            update_adapter_config(self.model, self.targets)

    def _rescale(
        self,
        targets: Sequence[LoraTarget],
        alphas: Sequence[float],
        balances: Sequence[float] | None = None,
    ) -> None:
        """:func:`rescale_targets_` (a few fused kernels for all layers); for factors whose
        gradients are in recipe units (see :mod:`alpha_tuner.gradunits`) the moments already
        are too, so only the units move."""
        if targets:
            rescale_targets_(targets, alphas, self.optimizer, balances=balances, units=self._units)

    def _unit_row(self, target: LoraTarget) -> list[float]:
        units = self._units
        assert units is not None  # only called with the step law on
        bias = 1.0 if target.bias_b is None else units.scale(target.bias_b)
        return [units.scale(target.weight_a), units.scale(target.weight_b), bias]

    def _sync_units(self, saved: Mapping[int, Sequence[float]] | None) -> None:
        """Set the factors' gradient units after a checkpoint is loaded: the saved ones, else
        (an entry without them) as the law's state implies."""
        law, units = self.state.law, self._units
        if law is None or units is None:
            return
        log_a = -law.log_balance
        log_b = law.log_balance + law.log_alpha_recipe - law.log_alpha
        rows = torch.stack((log_a, log_b, law.log_alpha_recipe - law.log_alpha)).exp().T.tolist()
        for i, row in (saved or {}).items():
            rows[i] = list(row)
        for target, (k_a, k_b, k_bias) in zip(self.targets, rows, strict=True):
            units.set_(target.weight_a, k_a)
            units.set_(target.weight_b, k_b)
            if target.bias_b is not None:
                units.set_(target.bias_b, k_bias)

    def close(self) -> None:
        """Remove the gradient hooks, putting the moments of hooked factors back in raw units."""
        units = self._units
        if units is None:
            return
        groups = group_map(self.optimizer)
        for p in _all_factors(self.targets):
            k = units.scale(p)
            if units.hooked(p) and k != 1.0:
                rescale_state_(self.optimizer, p, k, groups.get(id(p), {}))
        units.remove()
        self._units = None

    def _apply_alphas(self, alphas: Iterable[float]) -> None:
        changed = [
            (target, alpha)
            for target, alpha in zip(self.targets, alphas, strict=True)
            if abs(alpha / target.alpha - 1.0) > _ALPHA_RTOL
        ]
        if not changed:
            return
        moved, alphas = zip(*changed, strict=True)
        self._rescale(moved, alphas)
        update_adapter_config(self.model, self.targets)

    def _sync_control_alpha(self) -> None:
        """Make the host α the controller's α and reference α₀ (a host-to-device copy)."""
        current = torch.tensor([t.alpha for t in self.targets], dtype=torch.float32, device=self.device)
        log_alpha = current.log()
        control = self.state.control._replace(log_alpha=log_alpha, log_alpha0=log_alpha)
        law = self.state.law
        if law is not None:
            law = law._replace(log_alpha=log_alpha, log_alpha0=log_alpha)
        self.state = self.state._replace(control=control, law=law)

    # ---------------------------------------------------------------------------- user API
    def alphas(self) -> dict[str, float]:
        """α of every tuned layer in the model's own convention, keyed by display name."""
        return {name: t.alpha for name, t in zip(self.names, self.targets, strict=True)}

    def rescale_(self, alpha: float | Mapping[str, float]) -> None:
        """Set α (one value, or per layer) without changing the model; it becomes the new α₀.

        Raises:
            KeyError: For a name that is not a tuned LoRA layer.
            ValueError: For a value that is not finite and positive.
        """
        if isinstance(alpha, Mapping):
            lookup = {n: i for i, n in enumerate(self.names)}
            lookup.update({t.key: i for i, t in enumerate(self.targets)})
            unknown = [k for k in alpha if k not in lookup]
            if unknown:
                raise KeyError(
                    f"Not tuned LoRA layers: {unknown[:3]}. Valid names are the keys of opt.alphas(), "
                    f"e.g. {self.names[0]!r}."
                )
            values = [t.alpha for t in self.targets]
            for name, value in alpha.items():
                values[lookup[name]] = value
        else:
            values = [alpha] * len(self.targets)
        self._rescale(self.targets, values)
        update_adapter_config(self.model, self.targets)
        self._sync_control_alpha()

    def drift_ratios(self) -> dict[str, float]:
        """ρ of every layer at its most recent measurement (NaN before it). Synchronises."""
        return dict(zip(self.names, self.state.rho.tolist(), strict=True))

    def diagnostics(self, *, per_layer: bool = False) -> dict[str, float]:
        """A flat summary for logging, read in one device-to-host transfer (see the adapter)."""
        state = self.state
        out = summarize(
            alphas=[t.alpha for t in self.targets],
            steps=state.steps,
            control=state.control,
            rho=state.rho if state.measured_once else None,
            names=self.names,
            per_layer=per_layer,
            law=state.law,
        )
        if state.law is not None:  # the schedule's mean factor the law divides its targets by
            out["law_schedule_mean"] = math.nan if self.schedule is None else self.schedule.mean
        return out

    # ------------------------------------------------------------------------- persistence
    def pack(self) -> dict[str, Any]:
        """The ``"alpha_tuner"`` entry of a state dict (plain tensors, numbers and strings)."""
        state = self.state
        return pack_tuner_state(
            steps=state.steps,
            phase=state.phase,
            keys=[t.key for t in self.targets],
            alphas=[t.alpha for t in self.targets],
            control=state.control,
            rho=state.rho,
            law=state.law,
            units=None if self._units is None else [self._unit_row(t) for t in self.targets],
            schedule=None if self.schedule is None else (self.schedule.mean, self.schedule.source),
        )

    def load(self, entry: object) -> None:
        """Restore a :meth:`pack` entry: α is written into the model without rescaling B.

        Raises:
            ValueError: If the entry is of an unknown version or malformed.
        """
        state = self.state
        restored = unpack_tuner_state(
            entry, keys=[t.key for t in self.targets], control=state.control, rho=state.rho, law=state.law
        )
        if restored.missing:
            warnings.warn(
                f"{len(restored.missing)} LoRA layer(s) have no saved tuner state "
                f"(e.g. {restored.missing[0]}); they keep their current alpha.",
                RuntimeWarning,
                stacklevel=3,
            )
        untouched = [t.weight_b._version for t in self.targets] == self._b_versions
        if restored.steps and state.steps == 0 and self._before_init is not None and untouched:
            # A resume that loaded the trained adapter *before* this engine was built (the Trainer's
            # optimizer_cls_and_kwargs path) and did not load it again since: put back the weights
            # init rescaled (the optimizer state just loaded is the checkpoint's), then write the
            # saved α. Weights loaded after wrapping (the README's order) have a newer version
            # counter and are left as loaded.
            with torch.no_grad():
                for param, saved in self._before_init:
                    param.copy_(saved)
        if restored.steps:  # a fresh entry (Accelerate's save → load at prepare) keeps the copy
            self._before_init = None
        for i, alpha in restored.alphas.items():
            write_alpha(self.targets[i], alpha)
        update_adapter_config(self.model, self.targets)
        phases = self.meter.num_phases if self.meter else self.options.measure_phases
        self.state = TunerState(
            steps=state.steps if restored.steps is None else restored.steps,
            # Checkpoints before measurement phases have none: the rotation starts at phase 0.
            phase=restored.phase % phases,
            control=restored.control,
            rho=state.rho if restored.rho is None else restored.rho,
            measured_once=state.measured_once or restored.rho is not None,
            law=restored.law,
        )
        self._full_meter = self._new_start_meter()  # the restored step may be in the fast start or past it
        self._restore_schedule(restored.schedule, resumed=bool(restored.steps))
        self._sync_units(restored.units)
