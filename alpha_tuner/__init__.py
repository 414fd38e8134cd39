"""alpha_tuner: LoRA fine-tuning with principled, online-tuned scaling factors (LoRA-α).

Wrap any torch optimizer in one line::

    opt = AlphaTunedOptimizer(torch.optim.AdamW(model.parameters(), lr=2e-5), model)

and hand it to the Hugging Face ``Trainer`` with ``optimizers=(opt, None)``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .attach import AttachedTuner, attach
from .control import ControlConfig
from .discovery import LoraTarget, find_lora_targets
from .factory import create_alpha_tuned_optimizer
from .heads import HEAD_LR, find_head_parameters
from .optimizer import AlphaTunedOptimizer
from .principled import principled_alpha, principled_coefficient
from .rule import C_REF, LR_EXPONENT, REFERENCE_LR, AlphaRule
from .steplaw import StepLaw

if TYPE_CHECKING:
    from .integrations import AlphaTunerCallback, collect_metrics

__version__ = "0.1.0"

__all__ = [
    "C_REF",
    "HEAD_LR",
    "LR_EXPONENT",
    "REFERENCE_LR",
    "AlphaRule",
    "AlphaTunedOptimizer",
    "AlphaTunerCallback",
    "AttachedTuner",
    "ControlConfig",
    "LoraTarget",
    "StepLaw",
    "__version__",
    "attach",
    "collect_metrics",
    "create_alpha_tuned_optimizer",
    "find_head_parameters",
    "find_lora_targets",
    "principled_alpha",
    "principled_coefficient",
]

# The integrations import transformers; their package loads them lazily, so delegate to it.
_FROM_INTEGRATIONS = frozenset({"AlphaTunerCallback", "collect_metrics"})


def __getattr__(name: str) -> Any:
    if name not in _FROM_INTEGRATIONS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(".integrations", __name__), name)
