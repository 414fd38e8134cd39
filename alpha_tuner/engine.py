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

The settings are :mod:`alpha_tuner.options`; what the step law reads from the layers and writes
back outside the hot path (placement, the schedule's shift, gradient units) is
:mod:`alpha_tuner.lawlayers`, and its maths :mod:`alpha_tuner.steplaw`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .adamstate import AppliedStep
from .control import ControlConfig, ControlState, init_control, observe, update_alpha
from .discovery import LoraTarget, display_names, find_lora_targets, param_ids
from .distributed import broadcast_state, unwrap_model
from .gradunits import GradUnits
from .heads import find_head_parameters, lift_head_lr_
from .lawlayers import (
    LawLayers,
    all_factors,
    layer_norms,
    place_layers,
    remove_units,
    restore_units,
    schedule_shifted,
    start_law,
    unit_rows,
)
from .lawschedule import LawSchedule
from .measure import DriftMeter
from .options import EngineOptions, check_optimizer, resolve_steps
from .persistence import pack_tuner_state, unpack_tuner_state
from .principled import principled_alphas
from .rescale import rescale_targets_, update_adapter_config, write_alpha
from .rule import AlphaRule
from .steplaw import StepLaw, StepState, decide_steps, observe_steps, schedule_shift
from .telemetry import summarize

__all__ = ["TunerState", "TuningEngine"]

#: Relative change of α below which a control step leaves a layer alone (float32 round-off).
_ALPHA_RTOL = 1e-6


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
        step_law = resolve_steps(options, optimizer)
        if isinstance(options.steps, StepLaw) and step_law is None:
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
        self.device = self.targets[0].weight_b.device
        #: The step law and the LR schedule it holds its targets over (read at the first step).
        lora_ids = param_ids(p for t in self.targets for p in (t.weight_a, t.weight_b))
        self.law_schedule = LawSchedule(optimizer, step_law, lora_ids, self.device)
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
        self._units = GradUnits(all_factors(self.targets)) if self.step_law is not None else None
        placed = [False] * len(self.targets)  # layers the law placed (re-placed for the schedule)
        # (2, L) for the law: ‖A‖ before placement and ‖W₀‖ of every layer
        norms = layer_norms(self.targets) if self.step_law is not None else None
        if options.init == "principled":
            alphas = principled_alphas(self.targets, optimizer.param_groups, self.rule)
            balances = [1.0] * len(self.targets)
            if norms is not None and self.step_law is not None:
                alphas, balances, placed = place_layers(self.targets, optimizer, self.step_law, norms)
            factors = [p for t in self.targets for p in t.factor_params()]
            with torch.no_grad():  # construction time: one host read for all layers
                trained = bool(torch.stack([p.detach().ne(0).any() for p in factors]).any())
                if trained:
                    self._before_init = [(p, p.detach().clone()) for p in factors]
            self._rescale(self.targets, alphas, balances)
        # In-place writes to B since init (load_state_dict of the adapter bumps this counter).
        self._b_versions = [t.weight_b._version for t in self.targets]
        update_adapter_config(model, self.targets)

        alpha0 = torch.tensor([t.alpha for t in self.targets], dtype=torch.float32, device=self.device)
        self.meter = self._new_meter() if self.measuring else None
        self._slots = [slot for t in self.targets for slot in t.factor_slots()]
        self._meter_params = self._factor_ids()
        rho = torch.full((len(self.targets),), math.nan, dtype=torch.float32, device=self.device)
        law = None
        #: The law's per-layer constants (‖W₀‖, α's divisors, which layers it placed).
        self._law_layers: LawLayers | None = None
        if norms is not None:  # the step law
            law, self._law_layers = start_law(
                self.targets, alpha0, norms, recipe_alphas=recipe_alphas, placed=placed,
                balances=balances if options.init == "principled" else None,
            )  # fmt: skip
        self.state = TunerState(
            steps=0, phase=0, control=init_control(alpha0), rho=rho, measured_once=False, law=law
        )
        self._measuring_now = False
        #: Adam's normalised step of each factor, read from the measurements; only where the
        #: step law's floor or collapse level uses it (StepLaw.adam_floor, .adam_collapse; the
        #: schedule's law keeps both).
        self._adam_step = (
            AppliedStep(optimizer, self.targets, self.device)
            if self.step_law is not None and self.step_law.reads_adam
            else None
        )
        #: The fast start's one-phase meter (see _fast_now), dropped when the fast start ends.
        self._full_meter = self._new_start_meter()

    # ------------------------------------------------------------------------ construction
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
        if self.law_schedule.shape is None and self.step_law is not None:
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
            if state.law is not None and self.step_law is not None and self._law_layers is not None:
                adam_rms = None if self._adam_step is None else self._adam_step.rms(m.traces)
                update = self._law_layers.update(state.law.log_alpha, m.signal)
                factor = self.law_schedule.factor()
                law = observe_steps(
                    state.law, m.a_step, update, factor, self.step_law, m.measured, a_norm=m.a_norm,
                    adam_rms=adam_rms,
                )  # fmt: skip
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
        shape = self.law_schedule.read(stacklevel=4)
        law, layers = self.state.law, self._law_layers
        if shape.mean == 1.0 or law is None or layers is None or self.options.init != "principled":
            return  # init="keep": the control steps move the layers to the new targets
        m, mu = schedule_shift(shape.mean)
        moved = [t for t, placed in zip(self.targets, layers.placed, strict=True) if placed]
        self._rescale(moved, [t.alpha * m for t in moved], balances=[mu] * len(moved))
        update_adapter_config(self.model, self.targets)
        self.state = self.state._replace(law=schedule_shifted(law, layers.placed_mask, m, mu))

    # ------------------------------------------------------------------- the law's schedule
    @property
    def step_law(self) -> StepLaw | None:
        """The step law in force (its peak targets once the schedule is known), or None."""
        return self.law_schedule.law

    def _control_step(self) -> None:
        if self.state.law is not None and self.step_law is not None:
            self._law_step(self.state.law, self.step_law)
            return
        # Multi-process: every rank takes rank 0's state (one collective; none on other steps).
        control = broadcast_state(update_alpha(self.state.control, self.control_config))
        self.state = self.state._replace(control=control)
        # The one host transfer of a control interval: PEFT keeps its scalings as floats. The
        # device log α already holds these values, so no host-to-device copy follows.
        self._apply(torch.exp(control.log_alpha).tolist())

    def _law_step(self, law: StepState, config: StepLaw) -> None:
        layers = self._law_layers
        # With a pooled law, the layers the law can measure move together.
        movable = layers.measurable() if layers is not None and config.pool else None
        new, d_a = decide_steps(law, config, movable)
        new = broadcast_state(new)  # every rank takes rank 0's decision
        # The one host transfer of a control interval: PEFT's scalings and the rescale take floats.
        values = torch.stack((torch.exp(new.log_alpha), torch.exp(d_a))).tolist()
        self.state = self.state._replace(law=new)
        self._apply(*values)

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

    def _sync_units(self, saved: Mapping[int, Sequence[float]] | None) -> None:
        """Set the factors' gradient units after a checkpoint is loaded (:func:`restore_units`)."""
        if self.state.law is not None and self._units is not None:
            restore_units(self.targets, self._units, self.state.law, saved)

    def close(self) -> None:
        """Remove the gradient hooks, putting the moments of hooked factors back in raw units."""
        if self._units is not None:
            remove_units(self.targets, self._units, self.optimizer)
            self._units = None

    def _apply(self, alphas: Sequence[float], balances: Sequence[float] | None = None) -> None:
        """Rescale the layers whose α (or balance) a control step moved beyond round-off."""
        mus = [1.0] * len(alphas) if balances is None else balances
        changed = [
            (target, alpha, mu)
            for target, alpha, mu in zip(self.targets, alphas, mus, strict=True)
            if abs(alpha / target.alpha - 1.0) > _ALPHA_RTOL or abs(mu - 1.0) > _ALPHA_RTOL
        ]
        if not changed:
            return
        moved, new_alphas, new_mus = zip(*changed, strict=True)
        self._rescale(moved, new_alphas, balances=None if balances is None else new_mus)
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
            shape = self.law_schedule.shape
            out["law_schedule_mean"] = math.nan if shape is None else shape.mean
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
            units=None if self._units is None else unit_rows(self.targets, self._units),
            schedule=None if (shape := self.law_schedule.shape) is None else (shape.mean, shape.source),
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
        self.law_schedule.restore(restored.schedule, resumed=bool(restored.steps))
        self._sync_units(restored.units)
