"""AlphaTunedOptimizer: the wiring of discovery, principled α, drift measurement and control.

The inner optimizer does all the parameter updates; this wrapper only (1) sets each LoRA
layer's α once at construction, (2) snapshots and measures the drift ratio on measurement
steps, and (3) on control steps moves α through the function-preserving rescale.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch
from torch import nn

from ._checks import check_int
from .control import ControlConfig, ControlState, init_control, observe, update_alpha
from .discovery import LoraTarget, display_names, find_lora_targets, param_ids
from .distributed import broadcast_state, unwrap_model
from .heads import HEAD_LR, find_head_parameters, lift_head_lr_
from .measure import DriftMeter
from .persistence import pack_tuner_state, unpack_tuner_state
from .principled import principled_alphas
from .rescale import rescale_target_, update_adapter_config, write_alpha
from .rule import AlphaRule
from .telemetry import summarize

__all__ = ["AlphaTunedOptimizer"]

#: Relative change of α below which a control step leaves a layer alone (float32 round-off).
_ALPHA_RTOL = 1e-6
_CLOSURE_OPTIMIZERS = ("LBFGS",)


def _resolve_rule(rule: AlphaRule | None, **fields: float | None) -> AlphaRule:
    given = {k: v for k, v in fields.items() if v is not None}
    if rule is None:
        return AlphaRule(**given)
    if not isinstance(rule, AlphaRule):
        raise TypeError(f"rule must be an alpha_tuner.AlphaRule, got {type(rule).__name__}.")
    if given:
        raise TypeError(
            f"Pass either rule= or the rule's fields ({', '.join(sorted(given))}), not both: "
            "e.g. rule=dataclasses.replace(rule, c=...)."
        )
    return rule


class AlphaTunedOptimizer(torch.optim.Optimizer):
    """Wrap a ``torch.optim.Optimizer`` so that every LoRA layer trains at a tuned α.

    Update rule: the inner optimizer's step, unchanged. Around it, at construction each
    trainable LoRA layer's α is set to the measured LoRA-α rule ``α = c(η)·r^p(η)``
    (:mod:`alpha_tuner.principled`; ``p ≡ ½`` is the paper's ``α = c·√r``) with ``η`` the base
    learning rate of the layer's A factor;
    every ``measure_every`` steps the drift ratio ``ρ = ‖dB·dA‖/‖dB·A + B·dA‖`` of one of
    ``measure_phases`` subsets of the layers is measured on the device (each layer every
    ``measure_every·measure_phases`` steps); every ``control_every`` steps the control law
    (:mod:`alpha_tuner.control`) moves α, and each change rescales B, B's bias and B's
    optimizer state so that the model's function does not change. Steps that are not control
    steps never synchronise with the host; a control step performs one batched transfer.
    The modules PEFT trains in full (``modules_to_save``, e.g. a fresh classifier) get a
    learning rate of at least ``head_lr`` (:mod:`alpha_tuner.heads`): α does not reach them,
    and at the small learning rates of LoRA-α a fresh head hardly trains.

    Contract with the training loop: call :meth:`step` once per optimizer step (the Trainer,
    Accelerate and ``GradScaler`` do); the wrapper shares the inner optimizer's
    ``param_groups`` and ``state``, so LR schedulers and gradient clipping act on it as on
    the inner optimizer. Its ``state_dict`` is the inner one plus an ``"alpha_tuner"`` entry;
    load it after the model's adapter weights from the same checkpoint.

    Args:
        optimizer: A constructed optimizer holding the LoRA parameters (others are fine and
            untouched).
        model: The PEFT model whose LoRA layers are tuned.
        init: ``"principled"`` sets α = c(η)·r^p(η) at construction; ``"keep"`` keeps the
            model's current α (adaptation then starts from it).
        adapt: Adapt α online from the drift ratio. ``False`` keeps α fixed after ``init``.
        measure: Measure the drift ratio even when not adapting (for telemetry).
            Defaults to ``adapt``.
        measure_every: Steps between drift measurements (each costs one snapshot of the
            factors of its phase).
        measure_phases: Number of disjoint subsets of the LoRA layers, balanced by bytes,
            that successive measurements cover in rotation: each measurement snapshots and
            measures 1/``measure_phases`` of the factor bytes, so its extra memory and time
            shrink by that factor, and each layer is measured every
            ``measure_every·measure_phases`` steps. ``1`` measures all layers every time. A
            model with fewer chunks of layers than this (a few small layers) uses one phase
            per chunk.
        control_every: Steps between control decisions; a multiple of
            ``measure_every·measure_phases``, so that every decision sees a fresh ρ of every
            layer.
        rule: The α rule (:class:`~alpha_tuner.rule.AlphaRule`); default: the measured one.
        c, reference_lr, lr_exponent, rank_exponent, rank_exponent_slope: Shorthand for
            ``rule=AlphaRule(c=..., ...)`` with the other fields at their defaults; not
            together with ``rule``.
        control: Parameters of the control law.
        head_lr: The least learning rate of the parameters of PEFT's ``modules_to_save``
            (groups at a higher rate keep it; a group mixing them with other parameters is
            split, once, at construction). ``None`` leaves their learning rate alone. Wrap
            the optimizer before creating its LR scheduler.

    Raises:
        TypeError: If ``optimizer`` is not a torch optimizer, needs a closure (LBFGS), or
            ``model`` is not a module.
        ValueError: For a model without trainable LoRA layers, LoRA parameters missing from
            the optimizer, or invalid options.

    Example:
        >>> opt = AlphaTunedOptimizer(torch.optim.AdamW(model.parameters(), lr=2e-5), model)  # doctest: +SKIP
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        *,
        init: Literal["principled", "keep"] = "principled",
        adapt: bool = True,
        measure: bool | None = None,
        measure_every: int = 10,
        measure_phases: int = 4,
        control_every: int = 40,
        rule: AlphaRule | None = None,
        c: float | None = None,
        reference_lr: float | None = None,
        lr_exponent: float | None = None,
        rank_exponent: float | None = None,
        rank_exponent_slope: float | None = None,
        control: ControlConfig | None = None,
        head_lr: float | None = HEAD_LR,
    ) -> None:
        if isinstance(optimizer, AlphaTunedOptimizer):
            raise TypeError("optimizer is already an AlphaTunedOptimizer; wrap the inner optimizer once.")
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
        if init not in ("principled", "keep"):
            raise ValueError(f"init must be 'principled' or 'keep', got {init!r}.")
        self.measure_every = check_int("measure_every", measure_every, 1)
        self.measure_phases = check_int("measure_phases", measure_phases, 1)
        self.control_every = check_int("control_every", control_every, 1)
        cycle = measure_every * measure_phases
        if control_every % cycle:
            fix = -(-control_every // cycle) * cycle  # the next multiple
            raise ValueError(
                f"control_every ({control_every}) must be a multiple of measure_every × measure_phases "
                f"({measure_every} × {measure_phases} = {cycle}) so that every control decision sees a fresh "
                f"measurement of every layer: use control_every={fix}, "
                "or change measure_every or measure_phases."
            )
        self.rule = _resolve_rule(
            rule, c=c, reference_lr=reference_lr, lr_exponent=lr_exponent,
            rank_exponent=rank_exponent, rank_exponent_slope=rank_exponent_slope,
        )  # fmt: skip
        if control is not None and not isinstance(control, ControlConfig):
            raise TypeError(f"control must be an alpha_tuner.ControlConfig, got {type(control).__name__}.")
        self.adapt = bool(adapt)
        self.measuring = self.adapt if measure is None else bool(measure)
        if self.adapt and not self.measuring:
            raise ValueError("adapt=True needs measure=True: the controller acts on measured drift ratios.")
        self.control_config = control or ControlConfig()
        self.optimizer = optimizer
        self.model = model = unwrap_model(model)  # DDP's `module.` prefix would break state keys
        self.targets: list[LoraTarget] = find_lora_targets(model)
        self._names = display_names(self.targets)
        self._check_in_optimizer()
        self.head_lr = head_lr
        heads = [] if head_lr is None else [p for _, p in find_head_parameters(model)]
        #: How many parameters of ``modules_to_save`` had their learning rate raised to ``head_lr``.
        self.head_params_lifted = 0 if head_lr is None else lift_head_lr_(optimizer, heads, head_lr)

        # Optimizer.__init__ creates the hook dictionaries and profiling wrapper; the param
        # groups and state are then the inner optimizer's own objects.
        super().__init__([dict(g) for g in optimizer.param_groups], optimizer.defaults)
        self._share_inner()
        self._ready = True

        if init == "principled":
            alphas = principled_alphas(self.targets, optimizer.param_groups, self.rule)
            for target, alpha in zip(self.targets, alphas, strict=True):
                rescale_target_(target, alpha, optimizer)
        update_adapter_config(model, self.targets)

        self.device = self.targets[0].weight_b.device
        alpha0 = torch.tensor([t.alpha for t in self.targets], dtype=torch.float32, device=self.device)
        self._control: ControlState = init_control(alpha0)
        self._meter = self._new_meter() if self.measuring else None
        self._meter_params = self._factor_ids()
        # Each layer's most recent ρ (NaN before its first measurement), kept on the device.
        self._rho = torch.full((len(self.targets),), math.nan, dtype=torch.float32, device=self.device)
        self._measured_once = False
        self._steps = 0
        self._phase = 0  # the phase the next measurement covers (host-side, saved)

    # ----------------------------------------------------------------- construction helpers
    def _share_inner(self) -> None:
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        self.defaults = self.optimizer.defaults

    def _new_meter(self) -> DriftMeter:
        return DriftMeter(self.targets, self.device, phases=self.measure_phases)

    def _factor_ids(self) -> tuple[int, ...]:
        return tuple(id(p) for t in self.targets for p in (t.weight_a, t.weight_b))

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

    # ------------------------------------------------------------------------- hot path
    @torch.no_grad()
    def _after_measure(self) -> None:
        if self._meter is None:
            return
        m = self._meter.measure()
        self._control = observe(self._control, m.rho, self.control_config, mask=m.measured)
        self._rho = torch.where(m.measured, m.rho, self._rho)
        self._measured_once = True
        self._phase = (self._phase + 1) % self._meter.num_phases

    def step(self, closure: Callable[[], float] | None = None) -> Any:
        """Take the inner optimizer's step, measuring and controlling α on their cadences.

        Args:
            closure: Passed to the inner optimizer's ``step``.

        Returns:
            Whatever the inner optimizer's ``step`` returns.
        """
        # Measure the last step of each interval, so a control decision sees the freshest ρ.
        measuring = self._meter is not None and (self._steps + 1) % self.measure_every == 0
        if measuring:
            if self._factor_ids() != self._meter_params:
                # Parameters were replaced after wrapping (FSDP2 via Accelerate): re-group.
                self._meter = self._new_meter()
                self._meter_params = self._factor_ids()
            self._meter.snapshot(self._phase)  # type: ignore[union-attr]
        loss = self.optimizer.step() if closure is None else self.optimizer.step(closure)
        if measuring:
            self._after_measure()
        self._steps += 1
        if self.adapt and self._steps % self.control_every == 0:
            self._control_step()
        return loss

    def _control_step(self) -> None:
        # Multi-process: every rank takes rank 0's state (one collective; none on other steps).
        self._control = broadcast_state(update_alpha(self._control, self.control_config))
        # The one host transfer of a control interval: PEFT keeps its scalings as floats.
        proposed = torch.exp(self._control.log_alpha).tolist()
        self._apply_alphas(proposed, reference=False)

    def _apply_alphas(self, alphas: Iterable[float], *, reference: bool) -> None:
        changed = False
        for target, alpha in zip(self.targets, alphas, strict=True):
            if abs(alpha / target.alpha - 1.0) > _ALPHA_RTOL:
                rescale_target_(target, alpha, self.optimizer)
                changed = True
        if changed:
            update_adapter_config(self.model, self.targets)
        # A control step's α came from the device log α, which therefore already holds it (a
        # layer whose change was below the tolerance keeps its host α within 1e-6 of it): no
        # host-to-device copy on the hot path.
        if reference:
            self._sync_control_alpha()

    def _sync_control_alpha(self) -> None:
        """Make the host α the controller's α and reference α₀ (a host-to-device copy)."""
        current = torch.tensor([t.alpha for t in self.targets], dtype=torch.float32, device=self.device)
        log_alpha = current.log()
        self._control = self._control._replace(log_alpha=log_alpha, log_alpha0=log_alpha)

    # ------------------------------------------------------------------------ user API
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients through the inner optimizer."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group to the inner optimizer (shared with this wrapper)."""
        if not self.__dict__.get("_ready", False):
            # Optimizer.__init__ filling its throw-away copy of the groups.
            super().add_param_group(param_group)
            return
        self.optimizer.add_param_group(param_group)

    def alphas(self) -> dict[str, float]:
        """The effective α of every tuned LoRA layer, in the model's own convention.

        Keys are module names, with ``[adapter]`` appended when several adapters train.
        """
        return {name: t.alpha for name, t in zip(self._names, self.targets, strict=True)}

    def rescale_(self, alpha: float | Mapping[str, float]) -> None:
        """Set α (one value for all layers, or per layer) without changing the model.

        B, B's bias and their optimizer state are rescaled so that ``s·B·A`` and the next
        steps stay consistent. The new values also become the controller's reference α₀.

        Args:
            alpha: A positive number, or a mapping from the names of :meth:`alphas` (or
                state keys ``"module::adapter"``) to positive numbers.

        Raises:
            KeyError: For a name that is not a tuned LoRA layer.
            ValueError: For a value that is not finite and positive.
        """
        if isinstance(alpha, Mapping):
            lookup = {n: i for i, n in enumerate(self._names)}
            lookup.update({t.key: i for i, t in enumerate(self.targets)})
            unknown = [k for k in alpha if k not in lookup]
            if unknown:
                raise KeyError(
                    f"Not tuned LoRA layers: {unknown[:3]}. Valid names are the keys of opt.alphas(), "
                    f"e.g. {self._names[0]!r}."
                )
            values = [t.alpha for t in self.targets]
            for name, value in alpha.items():
                values[lookup[name]] = value
        else:
            values = [alpha] * len(self.targets)
        for target, value in zip(self.targets, values, strict=True):
            rescale_target_(target, value, self.optimizer)
        update_adapter_config(self.model, self.targets)
        self._sync_control_alpha()

    def drift_ratios(self) -> dict[str, float]:
        """ρ of every layer at its most recent measurement (NaN before it). Synchronises.

        With ``measure_phases`` > 1 the layers were last measured at different steps, up to
        ``measure_every·measure_phases`` steps apart.
        """
        return dict(zip(self._names, self._rho.tolist(), strict=True))

    def diagnostics(self, *, per_layer: bool = False) -> dict[str, float]:
        """A flat summary for logging, read in one device-to-host transfer.

        Args:
            per_layer: Also return ``rho[<layer>]`` for every layer (names as in :meth:`alphas`).

        Returns:
            ``alpha_mean/min/max`` (α lives on the host), ``steps``, ``measurements``,
            ``skipped``, ``backoffs`` (summed over layers) and, after the first measurement,
            ``rho_mean/min/max`` over the layers whose most recent ρ is finite.
        """
        return summarize(
            alphas=[t.alpha for t in self.targets],
            steps=self._steps,
            control=self._control,
            rho=self._rho if self._measured_once else None,
            names=self._names,
            per_layer=per_layer,
        )

    # ---------------------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict plus the tuner's state under ``"alpha_tuner"``.

        The tuner's state is keyed by ``"module::adapter"`` and holds only tensors, numbers
        and strings, so ``torch.load(..., weights_only=True)`` accepts it.
        """
        sd = dict(self.optimizer.state_dict())
        sd["alpha_tuner"] = pack_tuner_state(
            steps=self._steps,
            phase=self._phase,
            keys=[t.key for t in self.targets],
            alphas=[t.alpha for t in self.targets],
            control=self._control,
            rho=self._rho,
        )
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict` (or a bare inner one). Idempotent.

        α is written into the model as saved, without rescaling B: the model's adapter
        weights must come from the same checkpoint (as the Trainer's resume does).

        Raises:
            ValueError: If the tuner state is of an unknown version or malformed.
        """
        sd = dict(state_dict)
        tuner = sd.pop("alpha_tuner", None)
        self.optimizer.load_state_dict(sd)
        self._share_inner()  # load_state_dict replaces the inner containers
        if tuner is None:
            return
        restored = unpack_tuner_state(
            tuner, keys=[t.key for t in self.targets], control=self._control, rho=self._rho
        )
        if restored.missing:
            warnings.warn(
                f"{len(restored.missing)} LoRA layer(s) have no saved tuner state "
                f"(e.g. {restored.missing[0]}); they keep their current alpha.",
                RuntimeWarning,
                stacklevel=2,
            )
        for i, alpha in restored.alphas.items():
            write_alpha(self.targets[i], alpha)
        update_adapter_config(self.model, self.targets)
        self._control = restored.control
        if restored.rho is not None:
            self._rho = restored.rho
            self._measured_once = True
        if restored.steps is not None:
            self._steps = restored.steps
        # Checkpoints before measurement phases have none: the rotation starts at phase 0.
        self._phase = restored.phase % (self._meter.num_phases if self._meter else self.measure_phases)

    # --------------------------------------------------------------------------- misc
    def __getattr__(self, name: str) -> Any:
        # Forward methods such as train()/eval() of schedule-free optimizers.
        inner = self.__dict__.get("optimizer")
        if inner is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(inner, name)

    def __repr__(self) -> str:
        return (
            f"AlphaTunedOptimizer({type(self.optimizer).__name__}, layers={len(self.targets)}, "
            f"adapt={self.adapt}, measure_every={self.measure_every}, measure_phases={self.measure_phases}, "
            f"control_every={self.control_every}, head_lr={self.head_lr})"
        )
