"""The shape of the LR schedule, read once: how much of its peak a run gets on average.

The step law (:mod:`alpha_tuner.steplaw`) measures each layer's step at the schedule's peak (it
divides by the factor ``lr / initial_lr``), so a warm-up or a decay still acts as the user set it.
Its targets are the *mean* step over the run, the quantity its constants were chosen for at a
constant LR: a run whose schedule gives ``f̄`` of the peak on average moves its factors
``f̄·T`` peak steps in ``T`` steps, so the law sets the peak to ``target / f̄``. The Trainer's
warm-up of 10 % followed by a linear or cosine decay to zero has ``f̄ ≈ 0.5``; a constant LR
has ``f̄ = 1``, where nothing changes.

Where the schedule comes from, in order:

* ``StepLaw(schedule_mean=...)``, given by the user;
* the :class:`torch.optim.lr_scheduler.LambdaLR` driving the optimizer (every schedule of the
  Hugging Face ``Trainer`` and of ``transformers.get_scheduler`` but ReduceLROnPlateau), found at
  the first step; its horizon is the ``num_training_steps`` (or warm-up + stable + decay steps)
  the Trainer built it with, or ``total_steps`` given by the caller; a lambda that names no
  horizon (``constant_with_warmup``) is averaged over ``default_steps``, the run's length where
  it is known (:class:`~alpha_tuner.integrations.transformers.AlphaTunerCallback` passes the
  Trainer's ``max_steps``);
* no scheduler: a constant LR, ``f̄ = 1``.

A scheduler that cannot be evaluated ahead (another class, a lambda without a horizon, several
schedulers that disagree) gives ``f̄ = 1``, the peak semantics, and a warning that names the fix.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

__all__ = ["ScheduleShape", "find_schedulers", "lambda_horizon", "mean_factor", "read_schedule"]

#: Horizons longer than this are averaged on an even subsample (the mean changes by < 1e-6).
_MAX_EVALUATIONS = 100_000


class ScheduleShape(NamedTuple):
    """What the law knows of the schedule.

    Attributes:
        mean: ``f̄``, the mean of ``lr / peak`` over the run's steps, in (0, 1] for a schedule
            that never exceeds its base LR (1.0 when unknown or constant).
        source: How it was found: ``"given"``, ``"none"`` (no scheduler), the scheduler's class
            name, or ``"unknown: <reason>"`` (then ``mean`` is 1.0).
    """

    mean: float
    source: str


def mean_factor(factors: Sequence[float]) -> float:
    """The mean of a schedule's factors, each clamped at 0 (a factor below 0 moves nothing).

    Raises:
        ValueError: If ``factors`` is empty or holds a non-finite value.
    """
    if not factors:
        raise ValueError("mean_factor needs at least one step's factor")
    if not all(math.isfinite(f) for f in factors):
        raise ValueError("mean_factor: the schedule gave a non-finite factor")
    return math.fsum(max(f, 0.0) for f in factors) / len(factors)


def lambda_horizon(fn: Callable[[int], float]) -> int | None:
    """The number of steps a Hugging Face schedule lambda was built for (``None`` if it says none).

    The schedules of ``transformers.optimization`` are ``functools.partial`` objects whose keywords
    name their horizon: ``num_training_steps``, or warm-up + stable + decay steps (WSD).
    """
    keywords = getattr(fn, "keywords", None) or {}
    if isinstance(keywords.get("num_training_steps"), int):
        return int(keywords["num_training_steps"])
    parts = ("num_warmup_steps", "num_stable_steps", "num_decay_steps")
    if all(isinstance(keywords.get(k), int) for k in parts):
        return sum(int(keywords[k]) for k in parts)
    return None


def _referrers(owner: object) -> list[Any]:
    """Objects that hold ``owner``: an instance directly, or through its materialised __dict__."""
    out: list[Any] = []
    for ref in gc.get_referrers(owner):
        out.append(ref)
        if isinstance(ref, dict) and any(v is owner for v in ref.values()):
            out += gc.get_referrers(ref)
    return out


def find_schedulers(optimizers: Sequence[torch.optim.Optimizer]) -> list[LRScheduler]:
    """The LR schedulers that drive any of ``optimizers`` (a wrapper and its inner optimizer).

    A scheduler keeps a reference to its optimizer and the optimizer none to it, so they are
    found through the garbage collector's referrers, once, at the first step (host work only; no
    tensor is read). Optimizers that wrap these (Accelerate's ``AcceleratedOptimizer``, whose
    ``.optimizer`` is one of them, is what the Trainer's scheduler holds) are followed too.
    """
    owners: dict[int, object] = {id(o): o for o in optimizers}
    found: dict[int, LRScheduler] = {}
    frontier = list(optimizers)
    for _ in range(3):  # wrappers of wrappers, a few deep
        wrappers = []
        for owner in frontier:
            for ref in _referrers(owner):
                if isinstance(ref, LRScheduler) and id(ref.optimizer) in owners:
                    found.setdefault(id(ref), ref)
                elif (
                    isinstance(ref, torch.optim.Optimizer)
                    and getattr(ref, "optimizer", None) is owner
                    and id(ref) not in owners
                ):
                    owners[id(ref)] = ref
                    wrappers.append(ref)
        if not wrappers:
            break
        frontier = wrappers
    return list(found.values())


def _lambda_shape(
    scheduler: LambdaLR, group: int, total_steps: int | None, default_steps: int | None = None
) -> ScheduleShape:
    fn = scheduler.lr_lambdas[group]
    if getattr(fn, "__name__", "") == "_get_constant_lambda":  # transformers' constant schedule
        return ScheduleShape(1.0, "LambdaLR (constant)")
    horizon = total_steps if total_steps is not None else lambda_horizon(fn)
    if horizon is None:
        horizon = default_steps
    if horizon is None or horizon < 1:
        return ScheduleShape(
            1.0,
            "unknown: the LambdaLR's lambda names no horizon (pass total_steps or schedule_mean, or add "
            "AlphaTunerCallback to the Trainer, which tells the run's length)",
        )
    stride = max(1, horizon // _MAX_EVALUATIONS)
    factors = [float(fn(t)) for t in range(0, horizon, stride)]  # step t runs at fn(t)
    return ScheduleShape(mean_factor(factors), type(scheduler).__name__)


def read_schedule(
    optimizers: Sequence[torch.optim.Optimizer],
    *,
    group: int = 0,
    total_steps: int | None = None,
    default_steps: int | None = None,
) -> ScheduleShape:
    """The schedule's mean factor over the run, from the scheduler driving ``optimizers``.

    Args:
        optimizers: The optimizer the scheduler may hold (the wrapper and the inner optimizer).
        group: Index of the param group whose LR the law follows (the LoRA factors' group).
        total_steps: The run's number of optimizer steps, when the caller knows it; otherwise a
            Hugging Face schedule's own horizon.
        default_steps: The run's number of steps, used only for a lambda that names no horizon
            of its own (a warm-up then constant LR).

    Returns:
        The shape; ``mean`` is 1.0 without a scheduler or when it cannot be evaluated ahead.
    """
    schedulers = find_schedulers(optimizers)
    if not schedulers:
        return ScheduleShape(1.0, "none")
    shapes = []
    for scheduler in schedulers:
        if not isinstance(scheduler, LambdaLR) or group >= len(scheduler.lr_lambdas):
            shapes.append(ScheduleShape(1.0, f"unknown: {type(scheduler).__name__} is not a LambdaLR"))
        else:
            shapes.append(_lambda_shape(scheduler, group, total_steps, default_steps))
    if len({round(s.mean, 9) for s in shapes}) > 1:
        names = ", ".join(type(s).__name__ for s in schedulers)
        return ScheduleShape(1.0, f"unknown: several schedulers disagree ({names})")
    return shapes[0]
