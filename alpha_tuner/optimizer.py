"""AlphaTunedOptimizer: the ``torch.optim.Optimizer`` adapter around the tuning engine.

The inner optimizer does all the parameter updates and :class:`~alpha_tuner.engine.TuningEngine`
all the tuning; this class makes the pair one optimizer that LR schedulers, ``GradScaler``,
Accelerate and the Trainer accept: it passes ``isinstance(opt, torch.optim.Optimizer)``, shares
the inner ``param_groups`` and ``state``, and nests the inner state dict in its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import nn

from .control import ControlConfig, ControlState
from .engine import TuningEngine
from .heads import HEAD_LR
from .measure import DriftMeter
from .options import EngineOptions
from .readout import TunerReadout
from .rule import AlphaRule, resolve_rule
from .steplaw import StepLaw

__all__ = ["AlphaTunedOptimizer"]


class AlphaTunedOptimizer(TunerReadout, torch.optim.Optimizer):
    """Wrap a ``torch.optim.Optimizer`` so that every LoRA layer trains at tuned step sizes.

    Update rule: the inner optimizer's step, unchanged. Around it, with an Adam-family
    optimizer (the default ``steps="auto"``), the step law (:mod:`alpha_tuner.steplaw`) owns
    both effective step sizes of every trainable LoRA layer: at construction it places A's
    relative step and the weight's relative update on their targets from Adam's first steps,
    through α and a function-preserving balance between A and B; every ``measure_every``
    steps one of ``measure_phases`` subsets of the layers is measured on the device (each
    layer every ``measure_every·measure_phases`` steps); every ``control_every`` steps the law
    corrects both. The run then does not depend on the base learning rate or the recipe's
    ``lora_alpha``; an LR schedule still acts as set. With ``steps=None`` (and with other
    optimizers) α is set to the measured LoRA-α rule ``α = c(η)·r^p(η)``
    (:mod:`alpha_tuner.principled`) with ``η`` the base learning rate of the layer's A factor,
    and the back-off law (:mod:`alpha_tuner.control`) moves it from the drift ratio
    ``ρ = ‖dB·dA‖/‖dB·A + B·dA‖``. Every change rescales the factors, their biases and their
    optimizer state so that the model's function does not change. Steps that are not control
    steps never synchronise with the host; a control step performs one batched transfer.
    The modules PEFT trains in full (``modules_to_save``, e.g. a fresh classifier) train at
    ``head_lr`` (:mod:`alpha_tuner.heads`; with the rule: at least ``head_lr``): α does not
    reach them.

    The tuning itself is :class:`~alpha_tuner.engine.TuningEngine`; this class only makes it a
    ``torch.optim.Optimizer`` (:func:`alpha_tuner.attach` puts the same engine on an optimizer
    that already exists, through torch's step hooks).

    Contract with the training loop: call :meth:`step` once per optimizer step (the Trainer,
    Accelerate and ``GradScaler`` do); the wrapper shares the inner optimizer's
    ``param_groups`` and ``state``, so LR schedulers and gradient clipping act on it as on
    the inner optimizer. Its ``state_dict`` is the inner one plus an ``"alpha_tuner"`` entry;
    load it after the model's adapter weights from the same checkpoint.

    Args:
        optimizer: A constructed optimizer holding the LoRA parameters (others are fine and
            untouched).
        model: The PEFT model whose LoRA layers are tuned.
        init: ``"principled"`` places each layer at construction (the step law's placement,
            or α = c(η)·r^p(η) under the rule); ``"keep"`` keeps the model's current α and
            balance (adaptation then starts from it).
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
        steps: The step law (:class:`alpha_tuner.StepLaw`): the tuner places and holds both
            effective step sizes of every layer (A's relative step and the weight's relative
            update) instead of α alone, whatever the base LR and ``lora_alpha``; the rule and
            ``control`` are then not used. ``"auto"`` (default): ``StepLaw()`` for an
            Adam-family optimizer (groups with ``betas``: AdamW, Adam, NAdam, RAdam, Adamax)
            unless ``rule``, a rule field or ``control`` is given, else the rule. ``None``: the
            rule and the back-off law. An explicit ``StepLaw`` with another optimizer warns
            and keeps the rule.
        fast_start: With the adaptive step law, measure every layer at each measurement of
            the first control interval (every ``measure_every`` steps, all phases at once) and
            decide after each, instead of one decision at the interval's end: a start far
            from the targets (a recipe's α far off, a placement that misjudges Adam's later
            steps) is corrected within the first interval rather than over several, each
            capped at ``StepLaw.max_change``. Costs one full measurement (the snapshot of
            every factor) and one control step per ``measure_every`` steps in that interval
            only. On by default (the placement under-steps Adam's later steps 2–4×, and the
            first interval is where that is cheapest to correct); ``False`` keeps the regular
            cadence from the first step. Does nothing under the α rule or with ``adapt=False``.

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
        steps: StepLaw | Literal["auto"] | None = "auto",
        fast_start: bool = True,
    ) -> None:
        if isinstance(optimizer, AlphaTunedOptimizer):
            raise TypeError("optimizer is already an AlphaTunedOptimizer; wrap the inner optimizer once.")
        options = EngineOptions(
            init=init, adapt=adapt, measure=measure, measure_every=measure_every,
            measure_phases=measure_phases, control_every=control_every, control=control, head_lr=head_lr,
            steps=steps, fast_start=fast_start, rule=resolve_rule(
                rule, c=c, reference_lr=reference_lr, lr_exponent=lr_exponent,
                rank_exponent=rank_exponent, rank_exponent_slope=rank_exponent_slope,
            ),
        )  # fmt: skip
        self.engine = TuningEngine(optimizer, model, options)
        self.optimizer = optimizer
        # Optimizer.__init__ creates the hook dictionaries and profiling wrapper; the param
        # groups and state are then the inner optimizer's own objects.
        super().__init__([dict(g) for g in optimizer.param_groups], optimizer.defaults)
        self._share_inner()
        self.engine.law_schedule.owners.append(self)  # a scheduler built on the wrapper drives it
        self._ready = True

    def _share_inner(self) -> None:
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        self.defaults = self.optimizer.defaults

    @property
    def _control(self) -> ControlState:
        return self.engine.state.control

    @_control.setter
    def _control(self, control: ControlState) -> None:
        self.engine.state = self.engine.state._replace(control=control)

    @property
    def _meter(self) -> DriftMeter | None:
        return self.engine.meter

    # ------------------------------------------------------------------------- hot path
    def step(self, closure: Callable[[], float] | None = None) -> Any:
        """Take the inner optimizer's step, measuring and controlling α on their cadences.

        Args:
            closure: Passed to the inner optimizer's ``step``.

        Returns:
            Whatever the inner optimizer's ``step`` returns.
        """
        self.engine.before_step()
        loss = self.optimizer.step() if closure is None else self.optimizer.step(closure)
        self.engine.after_step()
        return loss

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

    # ---------------------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict plus the tuner's state under ``"alpha_tuner"``.

        The tuner's state is keyed by ``"module::adapter"`` and holds only tensors, numbers
        and strings, so ``torch.load(..., weights_only=True)`` accepts it.
        """
        sd = dict(self.optimizer.state_dict())
        sd["alpha_tuner"] = self.engine.pack()
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
        if tuner is not None:
            self.engine.load(tuner)

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
            f"control_every={self.control_every}, fast_start={self.fast_start}, head_lr={self.head_lr}, "
            f"law={'steps' if self.engine.step_law is not None else 'rule'})"
        )
