"""What a tuner shows its user: the engine's settings and read-outs, for every way of attaching it.

:class:`TunerReadout` is shared by :class:`alpha_tuner.AlphaTunedOptimizer` and the handle of
:func:`alpha_tuner.attach`; both delegate to their :class:`~alpha_tuner.engine.TuningEngine`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Generic, TypeVar, cast

import torch
from torch import nn

from .control import ControlConfig
from .discovery import LoraTarget
from .engine import TuningEngine
from .rule import AlphaRule

__all__ = ["TunerReadout"]

T = TypeVar("T")


class _Engine(Generic[T]):
    """A read-only attribute of ``self.engine`` at a dotted ``path`` (e.g. ``"options.head_lr"``)."""

    def __init__(self, path: str, doc: str) -> None:
        self.path = path.split(".")
        self.__doc__ = doc

    def __get__(self, obj: TunerReadout, owner: type | None = None) -> T:
        value: Any = obj.engine
        for part in self.path:
            value = getattr(value, part)
        return cast(T, value)


class TunerReadout:
    """Settings and read-outs of ``self.engine``."""

    engine: TuningEngine

    model: _Engine[nn.Module] = _Engine("model", "The PEFT model (DDP wrappers removed).")
    targets: _Engine[list[LoraTarget]] = _Engine("targets", "The tuned LoRA layers (vector order).")
    rule: _Engine[AlphaRule] = _Engine("rule", "The α rule applied at construction.")
    control_config: _Engine[ControlConfig] = _Engine("control_config", "The control law's parameters.")
    adapt: _Engine[bool] = _Engine("adapt", "Whether α is adapted online.")
    measuring: _Engine[bool] = _Engine("measuring", "Whether ρ is measured.")
    measure_every: _Engine[int] = _Engine("options.measure_every", "Steps between measurements.")
    measure_phases: _Engine[int] = _Engine("options.measure_phases", "Layer subsets measured in turn.")
    control_every: _Engine[int] = _Engine("options.control_every", "Steps between control decisions.")
    fast_start: _Engine[bool] = _Engine(
        "options.fast_start", "Whether the first interval decides after each measurement."
    )
    head_lr: _Engine[float | None] = _Engine("options.head_lr", "Least LR of ``modules_to_save``.")
    head_params_lifted: _Engine[int] = _Engine("head_params_lifted", "Head parameters whose LR was raised.")
    device: _Engine[torch.device] = _Engine("device", "Where the tuner's tensors live.")

    def alphas(self) -> dict[str, float]:
        """The effective α of every tuned LoRA layer, in the model's own convention.

        Keys are module names, with ``[adapter]`` appended when several adapters train.
        """
        return self.engine.alphas()

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
        self.engine.rescale_(alpha)

    def drift_ratios(self) -> dict[str, float]:
        """ρ of every layer at its most recent measurement (NaN before it). Synchronises.

        With ``measure_phases`` > 1 the layers were last measured at different steps, up to
        ``measure_every·measure_phases`` steps apart.
        """
        return self.engine.drift_ratios()

    def diagnostics(self, *, per_layer: bool = False) -> dict[str, float]:
        """A flat summary for logging, read in one device-to-host transfer.

        Args:
            per_layer: Also return ``rho[<layer>]`` for every layer (names as in :meth:`alphas`).

        Returns:
            ``alpha_mean/min/max`` (α lives on the host), ``steps``, ``measurements``,
            ``skipped``, ``backoffs`` (summed over layers) and, after the first measurement,
            ``rho_mean/min/max`` over the layers whose most recent ρ is finite; with the
            step law, its ``law_*`` figures and ``law_schedule_mean``, the LR schedule's mean
            factor it divides its targets by (NaN before the first step reads it).
        """
        return self.engine.diagnostics(per_layer=per_layer)
