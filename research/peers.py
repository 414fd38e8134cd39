"""Every method the benchmarks compare, built the way its users build it.

All methods train the same LoRA adapter (dropout 0, seeded A initialisation) with weight decay 0
and the Trainer's schedule. ``alpha`` is the recipe's ``lora_alpha``; a method that prescribes
its own (rsLoRA: 16) ignores the recipe's.

* ``lora``: vanilla LoRA with AdamW at the base LR (the oracle grid's cells, any α);
* ``rslora``: PEFT ``use_rslora=True`` with α = 16;
* ``loraplus``: PEFT ``create_loraplus_optimizer``, B's LR × 16 (its default ratio);
* ``prodigy``: ``prodigyopt.Prodigy(lr=1.0, safeguard_warmup=True, use_bias_correction=True)``,
  as its README recommends for fine-tuning with a warm-up; the Trainer's schedule multiplies
  its step (its README pairs it with an annealing schedule). The base LR is not used;
* ``dadapt``: ``dadaptation.DAdaptAdam(lr=1.0)``, its documented default, base LR not used;
* ``schedulefree``: ``schedulefree.AdamWScheduleFree(lr=base LR, warmup_steps=…)`` with its own
  warm-up and a constant Trainer schedule (it replaces the decay); the Trainer calls its
  ``train()``/``eval()``;
* ``alphatuned`` / ``alphatuned-static``: :class:`alpha_tuner.AlphaTunedOptimizer` around AdamW
  at the base LR, with its defaults (adaptive) or ``adapt=False``;
* ``steps`` / ``steps-static``: the same with the step law (``steps=StepLaw()``), adaptive or
  placed at wrap time only; ``steps-up16`` / ``steps-down16``: adaptive, started from a
  deliberately wrong α (the placement's α × 16 or ÷ 16, B's step moved by the same factor);
  ``steps-peak``: the step law holding its targets at the schedule's peak
  (``StepLaw(schedule_mean=1.0)``), as it did before it read the schedule's mean factor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from alpha_tuner.demo.models import LORAPLUS_RATIO, RSLORA_ALPHA

__all__ = ["LR_FREE", "METHODS", "PeerOptimizer", "build_peer", "lora_alpha", "uses_rslora"]

#: Methods that ignore the base LR (their step size is estimated).
LR_FREE = frozenset({"prodigy", "dadapt"})
METHODS = (
    "lora",
    "rslora",
    "loraplus",
    "prodigy",
    "dadapt",
    "schedulefree",
    "alphatuned",
    "alphatuned-static",
    "steps",
    "steps-static",
    "steps-up16",
    "steps-down16",
    "steps-peak",
    "lora-metered",
)


@dataclass
class PeerOptimizer:
    """A method's optimizer and the Trainer schedule it runs under.

    Attributes:
        optimizer: What the Trainer receives as ``optimizers=(optimizer, None)``.
        scheduler: The Trainer's ``lr_scheduler_type`` for this method.
        tuner: The AlphaTuned wrapper (to read α), or ``None``.
    """

    optimizer: torch.optim.Optimizer
    scheduler: str
    tuner: Any = None


def lora_alpha(method: str, rank: int, alpha: float | None) -> float:
    """The ``lora_alpha`` of the adapter: rsLoRA's 16, else the recipe's (2r if not given)."""
    if method == "rslora":
        return RSLORA_ALPHA
    return 2.0 * rank if alpha is None else alpha


def uses_rslora(method: str) -> bool:
    """Whether the adapter scales by α/√r."""
    return method == "rslora"


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def build_peer(
    method: str,
    model: nn.Module,
    *,
    lr: float,
    schedule: str,
    warmup_steps: int,
    tuner_options: dict[str, Any] | None = None,
) -> PeerOptimizer:
    """Build ``method``'s optimizer for ``model`` at base LR ``lr`` under the Trainer ``schedule``.

    Raises:
        ValueError: For an unknown method.
    """
    params = _trainable(model)
    builders: dict[str, Callable[[], PeerOptimizer]] = {
        "lora": lambda: PeerOptimizer(torch.optim.AdamW(params, lr=lr, weight_decay=0.0), schedule),
        "rslora": lambda: PeerOptimizer(torch.optim.AdamW(params, lr=lr, weight_decay=0.0), schedule),
        "loraplus": lambda: _loraplus(model, lr, schedule),
        "prodigy": lambda: _prodigy(params, schedule),
        "dadapt": lambda: _dadapt(params, schedule),
        "schedulefree": lambda: _schedulefree(params, lr, warmup_steps, schedule),
        "alphatuned": lambda: _alphatuned(model, params, lr, schedule, True, tuner_options),
        "alphatuned-static": lambda: _alphatuned(model, params, lr, schedule, False, tuner_options),
        "lora-metered": lambda: _metered(model, params, lr, schedule),
        "steps": lambda: _steps(model, params, lr, schedule, True, 1.0, tuner_options),
        "steps-static": lambda: _steps(model, params, lr, schedule, False, 1.0, tuner_options),
        "steps-up16": lambda: _steps(model, params, lr, schedule, True, 16.0, tuner_options),
        "steps-down16": lambda: _steps(model, params, lr, schedule, True, 1 / 16, tuner_options),
        "steps-peak": lambda: _steps(model, params, lr, schedule, True, 1.0, _at_peak(tuner_options)),
    }
    if method not in builders:
        raise ValueError(f"Unknown method {method!r}; choose one of {METHODS}.")
    return builders[method]()


def _loraplus(model: nn.Module, lr: float, schedule: str) -> PeerOptimizer:
    from peft.optimizers import create_loraplus_optimizer

    opt = create_loraplus_optimizer(
        model,  # type: ignore[arg-type]
        optimizer_cls=torch.optim.AdamW,
        lr=lr,
        loraplus_lr_ratio=LORAPLUS_RATIO,
        weight_decay=0.0,
    )
    return PeerOptimizer(opt, schedule)


def _prodigy(params: list[nn.Parameter], schedule: str) -> PeerOptimizer:
    from prodigyopt import Prodigy

    opt = Prodigy(params, lr=1.0, weight_decay=0.0, safeguard_warmup=True, use_bias_correction=True)
    return PeerOptimizer(opt, schedule)


def _dadapt(params: list[nn.Parameter], schedule: str) -> PeerOptimizer:
    from dadaptation import DAdaptAdam

    return PeerOptimizer(DAdaptAdam(params, lr=1.0, weight_decay=0.0), schedule)


def _schedulefree(params: list[nn.Parameter], lr: float, warmup_steps: int, schedule: str) -> PeerOptimizer:
    from schedulefree import AdamWScheduleFree

    del schedule  # schedule-free replaces the decay; its warm-up is its own
    opt = AdamWScheduleFree(params, lr=lr, warmup_steps=warmup_steps, weight_decay=0.0)
    return PeerOptimizer(opt, "constant")


def _alphatuned(
    model: nn.Module,
    params: list[nn.Parameter],
    lr: float,
    schedule: str,
    adapt: bool,
    options: dict[str, Any] | None,
) -> PeerOptimizer:
    from alpha_tuner import AlphaTunedOptimizer

    options = {"steps": None, **(options or {})}  # the α rule and its back-off law
    inner = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    opt = AlphaTunedOptimizer(inner, model, adapt=adapt, **options)
    return PeerOptimizer(opt, schedule, tuner=opt)


def _steps(
    model: nn.Module,
    params: list[nn.Parameter],
    lr: float,
    schedule: str,
    adapt: bool,
    wrong: float,
    options: dict[str, Any] | None,
) -> PeerOptimizer:
    from alpha_tuner import AlphaTunedOptimizer, StepLaw

    options = {"steps": StepLaw(), **(options or {})}
    inner = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    opt = AlphaTunedOptimizer(inner, model, adapt=adapt, measure=True, **options)  # static: read-outs only
    if wrong != 1.0:
        opt.rescale_({name: alpha * wrong for name, alpha in opt.alphas().items()})
    return PeerOptimizer(opt, schedule, tuner=opt)


def _at_peak(options: dict[str, Any] | None) -> dict[str, Any]:
    """``options`` with the step law's targets held at the schedule's peak (schedule_mean 1)."""
    from alpha_tuner import StepLaw

    options = dict(options or {})
    options["steps"] = replace(options.get("steps") or StepLaw(), schedule_mean=1.0)
    return options


def _metered(model: nn.Module, params: list[nn.Parameter], lr: float, schedule: str) -> PeerOptimizer:
    """Plain LoRA (AdamW at the base LR, the recipe's α, no head lift) with the step law's meter."""
    from alpha_tuner import AlphaTunedOptimizer, StepLaw

    inner = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    law = StepLaw()
    opt = AlphaTunedOptimizer(inner, model, init="keep", adapt=False, measure=True, head_lr=None, steps=law)
    return PeerOptimizer(opt, schedule, tuner=opt)
