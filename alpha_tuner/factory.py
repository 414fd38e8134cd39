"""The factory form: build the inner optimizer and its wrapper from a model in one call.

It is also what the Hugging Face ``Trainer`` expects in ``optimizer_cls_and_kwargs``:
transformers ≥ 4.57 treats a first element that is not an ``Optimizer`` subclass as a
factory, calls it with no arguments, and calls the result with ``(model, **kwargs)``.
Called with no arguments, :func:`create_alpha_tuned_optimizer` returns itself, so::

    Trainer(..., optimizer_cls_and_kwargs=(create_alpha_tuned_optimizer,
                                           {"optimizer_cls": torch.optim.AdamW, "lr": 2e-5}))

builds an ``AlphaTunedOptimizer`` around ``AdamW`` inside the Trainer (the path that also
works where the Trainer refuses ``optimizers=``, e.g. with FSDP).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from .optimizer import AlphaTunedOptimizer

__all__ = ["TUNER_OPTIONS", "create_alpha_tuned_optimizer"]

#: Keyword names that configure the wrapper; every other keyword goes to the inner optimizer.
TUNER_OPTIONS: frozenset[str] = frozenset(
    name
    for name, p in inspect.signature(AlphaTunedOptimizer.__init__).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
)


def create_alpha_tuned_optimizer(
    model: nn.Module | None = None,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    **kwargs: Any,
) -> Any:
    """Build ``optimizer_cls`` over the model's trainable parameters and wrap it.

    Args:
        model: The PEFT model. When omitted (as the Trainer calls a factory), the function
            returns itself.
        optimizer_cls: The inner optimizer class, e.g. ``torch.optim.AdamW``.
        **kwargs: Options of :class:`AlphaTunedOptimizer` (``adapt``, ``c``, ``control``, ...)
            are passed to the wrapper; all others (``lr``, ``weight_decay``, ...) to
            ``optimizer_cls``.

    Returns:
        An :class:`AlphaTunedOptimizer`, or this factory when called with no arguments.

    Raises:
        TypeError: If ``model`` is not a module (for example a list of parameter groups, as
            transformers < 4.57 passes; use ``optimizers=(AlphaTunedOptimizer(...), None)``
            there) or ``optimizer_cls`` is not an optimizer class.
    """
    if model is None and not kwargs and optimizer_cls is torch.optim.AdamW:
        return create_alpha_tuned_optimizer
    if not isinstance(model, nn.Module):
        raise TypeError(
            "create_alpha_tuned_optimizer needs the PEFT model as first argument, got "
            f"{type(model).__name__}. "
            "With a Trainer that passes parameter groups (transformers < 4.57), build the optimizer "
            "yourself and pass "
            "optimizers=(AlphaTunedOptimizer(AdamW(model.parameters(), lr=...), model), None)."
        )
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
        raise TypeError(f"optimizer_cls must be a torch.optim.Optimizer subclass, got {optimizer_cls!r}.")
    tuner = {k: v for k, v in kwargs.items() if k in TUNER_OPTIONS}
    inner_kwargs = {k: v for k, v in kwargs.items() if k not in TUNER_OPTIONS}
    params = [p for p in model.parameters() if p.requires_grad]
    return AlphaTunedOptimizer(optimizer_cls(params, **inner_kwargs), model, **tuner)
