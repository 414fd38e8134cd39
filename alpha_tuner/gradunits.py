"""Gradients of rescaled LoRA factors, reported in the recipe's own units.

The step law moves each layer's factors by ``A → A/μ``, ``B → B·μ/m`` (its bias by ``1/m``): a
factor ``p`` is then ``K·p_recipe`` for a cumulative multiplier ``K``, and its gradient is
``grad(p_recipe)/K``. At a small base LR ``K`` of A is far below 1, so A's gradient would be
hundreds of times the recipe's; the Trainer's gradient clipping (``max_grad_norm``, on the norm
of all gradients together) would then clip every step and shrink the head's and other
parameters' gradients with it, and Adam's ε would act on other magnitudes than in the recipe.

:class:`GradUnits` registers one tensor hook per factor that multiplies the incoming gradient by
``K`` before it is accumulated (so gradient accumulation stays linear), which gives back the
gradient with respect to the recipe's parametrisation: clipping and ε see what they would see
in the user's own run at the same function. Adam's step does not depend on the unit of the
gradient, so the rescale then leaves the optimizer's moments as they are (they are already in
the recipe's units) and training follows the same path as with rescaled moments.

Factors that are DTensors (FSDP2 ``fully_shard``) are not hooked: their gradients reach the
sharded parameters outside autograd. Their moments are rescaled instead.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

from .distributed import is_sharded

__all__ = ["GradUnits"]


class GradUnits:
    """One gradient hook per factor, each multiplying by that factor's cumulative ``K``.

    Args:
        params: The factors to hook; DTensor factors are skipped (:meth:`hooked` is False).
    """

    def __init__(self, params: Iterable[nn.Parameter]) -> None:
        self._scale: dict[int, float] = {}
        self._handles: list[Any] = []
        for p in params:
            if is_sharded(p) or id(p) in self._scale:
                continue
            self._scale[id(p)] = 1.0
            self._handles.append(p.register_hook(self._hook(id(p))))

    def _hook(self, key: int) -> Any:
        def scale_grad(grad: Tensor) -> Tensor:
            k = self._scale[key]
            return grad if k == 1.0 else grad * k

        return scale_grad

    def hooked(self, param: Tensor) -> bool:
        """Whether ``param``'s gradient is reported in the recipe's units."""
        return id(param) in self._scale

    def scale(self, param: Tensor) -> float:
        """The cumulative multiplier ``K`` of ``param`` (1 for a factor that is not hooked)."""
        return self._scale.get(id(param), 1.0)

    def multiply_(self, param: Tensor, k: float) -> None:
        """Record that ``param`` was multiplied by ``k`` (its gradient unit follows)."""
        if id(param) in self._scale:
            self._scale[id(param)] *= k

    def set_(self, param: Tensor, value: float) -> None:
        """Set ``K`` of ``param`` (a checkpoint's value)."""
        if id(param) in self._scale:
            self._scale[id(param)] = value

    def remove(self) -> None:
        """Remove every hook (gradients are then the raw ones again)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._scale.clear()

    def __len__(self) -> int:
        return len(self._scale)
