"""``alpha_tuner.attach(trainer)``: the tuning engine on the optimizer a Trainer builds itself."""

from __future__ import annotations

from typing import Any

from ..attach import attach
from .metrics import find_alpha_tuned_optimizer

__all__ = ["attach_to_trainer"]


def attach_to_trainer(trainer: Any, **options: Any) -> Any:
    """Tune the optimizer a ``Trainer`` builds itself (``alpha_tuner.attach(trainer)``).

    The engine is attached by :func:`alpha_tuner.attach` right after the Trainer's
    ``create_optimizer()``, so before its LR scheduler exists and before it loads a
    checkpoint's optimizer state (whose ``"alpha_tuner"`` entry then restores α). When the
    Trainer resumes, the adapter weights it loaded first were trained at the saved α, so the
    engine starts from ``init="keep"`` and the saved α is written back without touching them.

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
    load_from_checkpoint = trainer._load_from_checkpoint
    resumed = []

    def _load_from_checkpoint(*args: Any, **kwargs: Any) -> Any:
        resumed.append(True)
        return load_from_checkpoint(*args, **kwargs)

    def _create_optimizer(*args: Any, **kwargs: Any) -> Any:
        optimizer = create_optimizer(*args, **kwargs)
        inner = trainer.optimizer
        if find_alpha_tuned_optimizer(inner) is None:
            settings = dict(options)
            if resumed:
                settings["init"] = "keep"
            attach(inner, trainer.model, **settings)
        return optimizer

    trainer._load_from_checkpoint = _load_from_checkpoint
    trainer.create_optimizer = _create_optimizer
    return trainer
