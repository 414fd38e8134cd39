"""The tuner's settings and the optimizers it accepts, validated once at construction.

:class:`EngineOptions` holds every setting of :class:`alpha_tuner.AlphaTunedOptimizer` and
:func:`alpha_tuner.attach`; :func:`check_optimizer` refuses optimizers the engine cannot tune
around; :func:`resolve_steps` decides between the step law and the α rule for an optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ._checks import check_int
from .control import ControlConfig
from .heads import HEAD_LR
from .rule import AlphaRule
from .steplaw import StepLaw

__all__ = ["EngineOptions", "check_optimizer", "resolve_steps"]

_CLOSURE_OPTIMIZERS = ("LBFGS",)


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
