"""alpha_tuner: LoRA fine-tuning with principled, online-tuned scaling factors (LoRA-α).

Wrap any torch optimizer in one line::

    opt = AlphaTunedOptimizer(torch.optim.AdamW(model.parameters(), lr=2e-5), model)

and hand it to the Hugging Face ``Trainer`` with ``optimizers=(opt, None)``.
"""

from __future__ import annotations

from .control import ControlConfig
from .discovery import LoraTarget, find_lora_targets
from .factory import create_alpha_tuned_optimizer
from .optimizer import AlphaTunedOptimizer
from .principled import C_REF, LR_EXPONENT, REFERENCE_LR, principled_alpha, principled_coefficient

__version__ = "0.1.0"

__all__ = [
    "C_REF",
    "LR_EXPONENT",
    "REFERENCE_LR",
    "AlphaTunedOptimizer",
    "ControlConfig",
    "LoraTarget",
    "__version__",
    "create_alpha_tuned_optimizer",
    "find_lora_targets",
    "principled_alpha",
    "principled_coefficient",
]
