"""Task heads: the modules PEFT trains in full, and the learning rate they need.

Next to the adapters PEFT trains some modules in full, wrapped in ``ModulesToSaveWrapper``:
the fresh ``classifier``/``score`` head that ``task_type="SEQ_CLS"`` adds, and whatever the
recipe lists in ``modules_to_save``. LoRA-α trains at the small learning rates of full
fine-tuning and makes up for them with a larger α, but α only scales the adapters. A head
that starts from random weights is not fine-tuned, it is trained from scratch, and at 2e-5 it
barely moves in a short run. On the sweep's task the whole model's best learning rate was the
grid's largest, 3.2e-4, at every rank; with the base LR at 2e-5 and the principled α, moving
the head to 3.2e-4 lowered the held-out loss from 0.61, 0.55, 0.60 to 0.52, 0.50, 0.51 at
r = 4, 16, 64, within 0.6–2 % of the best cell of the whole grid (selection seeds;
``research/probes/head_ablation.py``, BENCHMARKS.md). So the wrapper gives these parameters at
least ``HEAD_LR``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["HEAD_LR", "find_head_parameters", "lift_head_lr_"]

#: The least learning rate of the modules PEFT trains in full (measured, see the docstring).
HEAD_LR: float = 3.2e-4


def find_head_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The trainable parameters of the modules PEFT trains in full (``modules_to_save``).

    Args:
        model: A PEFT model (or any module holding PEFT's ``ModulesToSaveWrapper``).

    Returns:
        ``(name, parameter)`` pairs in module order; empty when the model has none.
    """
    from peft.utils import ModulesToSaveWrapper

    found: list[tuple[str, nn.Parameter]] = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        if not isinstance(module, ModulesToSaveWrapper):
            continue
        for name, param in module.modules_to_save.named_parameters():
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                found.append((f"{module_name}.modules_to_save.{name}", param))
    return found


def lift_head_lr_(
    optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter], min_lr: float, *, exact: bool = False
) -> int:
    """Give every one of ``params`` a learning rate of at least ``min_lr`` (``exact``: of exactly
    ``min_lr``, lowered too), in place.

    A group that holds only such parameters gets ``lr = max(lr, min_lr)``. A group that mixes
    them with others (a single ``model.parameters()`` group, LoRA+'s group of A factors) is
    split: they move to a new group with the same settings and ``lr = min_lr``; the others
    keep theirs. Optimizer state is keyed by parameter, so it follows them. The split is
    deterministic, so an optimizer built and lifted the same way loads the ``state_dict`` of
    this one.

    Args:
        optimizer: The optimizer, before any LR scheduler was attached to it.
        params: The parameters to lift (those the optimizer does not hold are ignored).
        min_lr: The least learning rate they get (> 0).
        exact: Set the learning rate to ``min_lr`` also where it is higher (the step law: the
            head then does not depend on the base LR either).

    Returns:
        How many parameters had their learning rate changed.

    Raises:
        ValueError: If ``min_lr`` is not positive, or a group to change already carries a
            scheduler's ``initial_lr`` (the scheduler would miss the new group).
    """
    if not (isinstance(min_lr, (int, float)) and min_lr > 0 and min_lr < float("inf")):
        raise ValueError(
            f"head_lr must be a finite number > 0 (or None to leave heads alone), got {min_lr!r}."
        )
    wanted = {id(p) for p in params}
    new_groups: list[dict[str, Any]] = []
    lifted = 0
    for group in optimizer.param_groups:
        mine = [p for p in group["params"] if id(p) in wanted]
        lr = group.get("lr")
        done = float(lr) == min_lr if exact and lr is not None else lr is not None and float(lr) >= min_lr
        if not mine or lr is None or done:  # construction time, not the hot path
            continue
        if "initial_lr" in group:
            raise ValueError(
                "An LR scheduler is already attached to the optimizer, so it would not follow the "
                "head's learning rate. Wrap the optimizer before creating the scheduler (the "
                "Trainer does, with optimizers=(AlphaTunedOptimizer(...), None)), or pass head_lr=None."
            )
        # A tensor LR (capturable / fused optimizers) stays a tensor.
        new_lr = torch.full_like(lr, min_lr) if isinstance(lr, torch.Tensor) else min_lr
        lifted += len(mine)
        if len(mine) == len(group["params"]):
            group["lr"] = new_lr
            continue
        group["params"] = [p for p in group["params"] if id(p) not in wanted]
        new_groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": mine, "lr": new_lr})
    for group in new_groups:
        optimizer.add_param_group(group)
    return lifted
