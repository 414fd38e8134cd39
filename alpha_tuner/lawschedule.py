"""The LR schedule as the step law sees it: its shape, read once, and each step's factor.

The step law holds its targets as means over the run (:func:`alpha_tuner.steplaw.for_schedule`)
and measures each step at the schedule's peak. :class:`LawSchedule` keeps what that needs
between steps, apart from the engine's hot path:

* the law the user gave and the law in force, its peak targets for the schedule's shape;
* the shape (:class:`~alpha_tuner.schedule.ScheduleShape`): given by the user, read at the first
  step (the Trainer builds its scheduler after the optimizer), or restored from a checkpoint;
* the factor ``lr / initial_lr`` of each measured step, read from the first param group that
  holds LoRA factors: a host float, or a device tensor when the LR is a tensor (never a host
  read inside ``step()``).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import Tensor

from .schedule import ScheduleShape, read_schedule
from .steplaw import StepLaw, for_schedule

__all__ = ["LawSchedule"]


class LawSchedule:
    """The step law's schedule for one inner optimizer.

    Args:
        optimizer: The inner optimizer (its param groups carry ``lr`` and ``initial_lr``).
        law: The step law the user gave (``None``: the law is off and nothing is read).
        lora_ids: ``id()`` of every LoRA factor: the first group holding one sets the factor.
        device: Where a tensor LR's factor is put (the tuner's device).

    Attributes:
        given: The law as given.
        law: The law in force: ``given`` with its targets at the schedule's peak once the shape
            is known (``given`` before).
        shape: The schedule's shape, or ``None`` until it is given, read or restored.
        owners: Optimizers a scheduler may drive besides the inner one (the wrapper adds itself).
        run_length: The run's number of optimizer steps when known before the first step (the
            Trainer's ``max_steps``): the horizon of a schedule that names none.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        law: StepLaw | None,
        lora_ids: Iterable[int],
        device: torch.device,
    ) -> None:
        self.optimizer = optimizer
        self.given = self.law = law
        self.lora_ids = frozenset(lora_ids)
        self.device = device
        self.shape: ScheduleShape | None = None
        self.owners: list[torch.optim.Optimizer] = []
        self.run_length: int | None = None
        self._index: int | None = None
        self._index_key: tuple[int, int] | None = None  # (id, length) of the groups it was found in
        if law is not None and law.schedule_mean is not None:
            self.use(ScheduleShape(law.schedule_mean, "given"))

    def use(self, shape: ScheduleShape) -> None:
        """Hold the user's targets as run means over a schedule of this shape."""
        if self.given is None:
            raise RuntimeError("LawSchedule.use() needs a step law; the law is off.")
        self.shape = shape
        self.law = for_schedule(self.given, shape.mean)

    def read(self, *, stacklevel: int = 2) -> ScheduleShape:
        """Read the shape from the schedulers driving the optimizer (at the first step) and use it.

        A shape it cannot read is used as the peak (``f̄ = 1``) with a ``RuntimeWarning`` that
        names the fix; ``stacklevel`` is counted from the caller.
        """
        shape = read_schedule(
            [self.optimizer, *self.owners], group=self.group_index() or 0, default_steps=self.run_length
        )
        self.use(shape)
        if shape.source.startswith("unknown"):
            why = shape.source.removeprefix("unknown: ")
            warnings.warn(
                f"The step law cannot read the LR schedule's shape ({why}); "
                "it holds its targets at the schedule's peak, which over-steps a constant-LR run and "
                "under-steps a decaying one. Pass steps=StepLaw(schedule_mean=<mean of lr/peak over the "
                "run>) to say it.",
                RuntimeWarning,
                stacklevel=stacklevel + 1,
            )
        return shape

    def restore(self, saved: tuple[float, str] | None, *, resumed: bool) -> None:
        """The shape from a checkpoint: its saved shape, or for a resumed run saved before the law
        read schedules, the peak semantics it ran with (mean 1). A fresh entry (nothing saved,
        not resumed) or a tuner without the law changes nothing: the shape is read as usual."""
        if self.given is None or (saved is None and not resumed):
            return
        self.use(ScheduleShape(*(saved if saved is not None else (1.0, "checkpoint"))))

    def group_index(self) -> int | None:
        """Index of the first param group holding LoRA factors (None if none does).

        Looked up once per list of groups (a measuring step would otherwise walk every
        parameter in Python); found again when the list is replaced or a group is added.
        """
        groups = self.optimizer.param_groups
        key = (id(groups), len(groups))
        if self._index_key != key:
            lora = self.lora_ids
            self._index = next(
                (i for i, g in enumerate(groups) if any(id(p) in lora for p in g["params"])), None
            )
            self._index_key = key
        return self._index

    def factor(self) -> float | Tensor:
        """``lr / initial_lr`` of the first group holding LoRA factors (1 without a scheduler).

        A tensor LR (fused or capturable optimizers) gives a 0-dim tensor on the tuner's device,
        never a host read: a tensor on the device is divided there, a CPU tensor is sent over
        without waiting for the device (``non_blocking``), and a Python float stays a scalar
        operand. An initial LR of 0 gives 0 (or a non-finite factor from a tensor), which
        :func:`alpha_tuner.steplaw.observe_steps` skips.
        """
        index = self.group_index()
        if index is None:
            return 1.0
        group = self.optimizer.param_groups[index]
        lr, initial = group["lr"], group.get("initial_lr", group["lr"])
        if not isinstance(lr, Tensor) and not isinstance(initial, Tensor):
            return float(lr) / float(initial) if initial else 0.0
        return self._on_device(lr) / self._on_device(initial)  # one of the two is a tensor

    def _on_device(self, value: float | Tensor) -> float | Tensor:
        if isinstance(value, Tensor):
            return value.detach().to(self.device, torch.float32, non_blocking=True)
        return float(value)
