"""Put the tuning engine on an optimizer that already exists, through torch's optimizer hooks.

``alpha_tuner.attach(optimizer, model)`` tunes the LoRA layers around an optimizer the recipe
built itself, with no wrapper object: the engine's :meth:`~alpha_tuner.engine.TuningEngine.before_step`
and :meth:`~alpha_tuner.engine.TuningEngine.after_step` run as the optimizer's step pre/post hooks,
and its state rides in the optimizer's own ``state_dict()`` under ``"alpha_tuner"`` (a state-dict
post hook adds it, a load pre hook takes it out, a load post hook restores it). A step that a
``GradScaler`` skips never calls ``optimizer.step()``, so the hooks do not run either. For a
Hugging Face ``Trainer`` that builds its own optimizer, pass the trainer:
``alpha_tuner.attach(trainer)`` attaches as soon as the Trainer creates its optimizer, before its
LR scheduler and before it loads a checkpoint's optimizer state.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .engine import TuningEngine
from .optimizer import AlphaTunedOptimizer
from .options import EngineOptions
from .readout import TunerReadout
from .rule import pop_rule

__all__ = ["ATTACHED", "AttachedTuner", "attach", "attach_to_trainer", "attached_tuner"]

#: The attribute of an optimizer that holds its :class:`AttachedTuner`.
ATTACHED = "alpha_tuner_attached"
_STATE_KEY = "alpha_tuner"


class AttachedTuner(TunerReadout):
    """The handle of an engine attached to an optimizer: read-outs, and :meth:`detach`.

    Attributes:
        engine: The tuning engine.
        optimizer: The optimizer it is attached to.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, engine: TuningEngine) -> None:
        self.optimizer = optimizer
        self.engine = engine
        self._loading: object = None
        self._handles = [
            optimizer.register_step_pre_hook(lambda opt, args, kwargs: engine.before_step()),
            optimizer.register_step_post_hook(lambda opt, args, kwargs: engine.after_step()),
            optimizer.register_state_dict_post_hook(self._add_state),
            optimizer.register_load_state_dict_pre_hook(self._take_state),
            optimizer.register_load_state_dict_post_hook(self._restore_state),
        ]
        setattr(optimizer, ATTACHED, self)

    # -------------------------------------------------------------------- state-dict hooks
    def _add_state(self, optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        state_dict[_STATE_KEY] = self.engine.pack()
        return state_dict

    def _take_state(self, optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        state_dict = dict(state_dict)
        self._loading = state_dict.pop(_STATE_KEY, None)
        return state_dict

    def _restore_state(self, optimizer: torch.optim.Optimizer) -> None:
        entry, self._loading = self._loading, None
        if entry is not None:
            self.engine.load(entry)

    # ----------------------------------------------------------------------------- API
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups."""
        return self.optimizer.param_groups

    def detach(self) -> None:
        """Remove the hooks: the optimizer steps and saves as if never attached (α stays)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.engine.close()
        if getattr(self.optimizer, ATTACHED, None) is self:
            delattr(self.optimizer, ATTACHED)


def attached_tuner(optimizer: object) -> AttachedTuner | None:
    """The :class:`AttachedTuner` of ``optimizer``, if :func:`attach` put one on it."""
    handle = getattr(optimizer, ATTACHED, None) if isinstance(optimizer, torch.optim.Optimizer) else None
    return handle if isinstance(handle, AttachedTuner) else None


def attach(target: Any, model: nn.Module | None = None, **options: Any) -> Any:
    """Tune the LoRA layers around an existing optimizer (or a Trainer's) with no wrapper.

    Args:
        target: A constructed ``torch.optim.Optimizer``, or a ``transformers.Trainer``.
        model: The PEFT model (required with an optimizer; a Trainer's own model otherwise).
        **options: The keyword options of :class:`AlphaTunedOptimizer` (``adapt``, ``rule``,
            ``c``, ``head_lr``, ...).

    Returns:
        The :class:`AttachedTuner` for an optimizer; the trainer itself for a Trainer (its
        optimizer then carries the handle: ``attached_tuner(trainer.optimizer)``).

    Raises:
        TypeError: For an :class:`AlphaTunedOptimizer` (already tuned), an optimizer already
            attached, a missing model, or a target that is neither an optimizer nor a Trainer.
        ValueError: As :class:`AlphaTunedOptimizer` for invalid options; an LR scheduler
            already attached to an optimizer whose ``modules_to_save`` need ``head_lr``.

    Example:
        >>> opt = torch.optim.AdamW(model.parameters(), lr=2e-5)  # doctest: +SKIP
        >>> handle = alpha_tuner.attach(opt, model)  # doctest: +SKIP
    """
    if not isinstance(target, torch.optim.Optimizer):
        if callable(getattr(target, "create_optimizer", None)) and hasattr(target, "model"):
            return attach_to_trainer(target, **options)
        raise TypeError(
            f"attach() takes a torch.optim.Optimizer or a transformers.Trainer, got {type(target).__name__}."
        )
    if isinstance(target, AlphaTunedOptimizer):
        raise TypeError("This optimizer is an AlphaTunedOptimizer already; it needs no attach().")
    if attached_tuner(target) is not None:
        raise TypeError("An alpha_tuner engine is already attached to this optimizer; detach() it first.")
    if model is None:
        raise TypeError("attach(optimizer, model): pass the PEFT model whose LoRA layers it trains.")
    rule = pop_rule(options)
    engine = TuningEngine(target, model, EngineOptions(rule=rule, **options))
    return AttachedTuner(target, engine)


def attach_to_trainer(trainer: Any, **options: Any) -> Any:
    """Tune the optimizer a ``Trainer`` builds itself (``alpha_tuner.attach(trainer)``).

    The engine is attached by :func:`alpha_tuner.attach` right after the Trainer's
    ``create_optimizer()``, so before its LR scheduler exists and before it loads a
    checkpoint's optimizer state (whose ``"alpha_tuner"`` entry then restores α). When the
    Trainer resumes, it has loaded the trained adapter before the engine exists; loading the
    checkpoint's tuner state puts those weights back as loaded, as for the factory path
    (:meth:`alpha_tuner.engine.TuningEngine.load`).

    Args:
        trainer: A ``transformers.Trainer`` (or subclass, e.g. TRL's ``SFTTrainer``).
        **options: Options of :class:`AlphaTunedOptimizer`.

    Returns:
        ``trainer``.

    Raises:
        TypeError: If the trainer is already attached.
    """
    if getattr(trainer, "_alpha_tuner_options", None) is not None:
        raise TypeError("alpha_tuner.attach() was already called on this Trainer.")
    trainer._alpha_tuner_options = dict(options)
    create_optimizer = trainer.create_optimizer

    def _create_optimizer(*args: Any, **kwargs: Any) -> Any:
        optimizer = create_optimizer(*args, **kwargs)
        inner = trainer.optimizer  # not yet wrapped by Accelerate at this point
        if not isinstance(inner, AlphaTunedOptimizer) and attached_tuner(inner) is None:
            attach(inner, trainer.model, **options)
        return optimizer

    trainer.create_optimizer = _create_optimizer
    return trainer
