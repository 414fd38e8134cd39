"""Integrations with training frameworks, imported lazily.

``from alpha_tuner.integrations import AlphaTunerCallback`` imports ``transformers`` only then;
``import alpha_tuner`` never does.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .transformers import (
        AlphaTunerCallback,
        attach_to_trainer,
        collect_metrics,
        find_alpha_tuned_optimizer,
        history_from_log_history,
    )  # fmt: skip

__all__ = ["AlphaTunerCallback", "attach_to_trainer", "collect_metrics", "find_alpha_tuned_optimizer",
           "history_from_log_history"]  # fmt: skip

# collect_metrics and its helpers need no transformers; the callback and attach_to_trainer do.
_LAZY = {name: ".transformers" for name in __all__} | {
    name: ".metrics" for name in ("collect_metrics", "find_alpha_tuned_optimizer", "history_from_log_history")
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
