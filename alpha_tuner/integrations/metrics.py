"""Read-outs of a tuner as logging metrics, with no dependency on transformers.

:func:`collect_metrics` returns the keys of :mod:`alpha_tuner.integrations.transformers`' docstring
for any logger (``accelerator.log``, a ``SummaryWriter``); :func:`find_alpha_tuned_optimizer`
finds the tuner inside optimizer wrappers; :func:`history_from_log_history` reads them back from
a ``trainer_state.json``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..attach import AttachedTuner, attached_tuner
from ..optimizer import AlphaTunedOptimizer

__all__ = ["collect_metrics", "find_alpha_tuned_optimizer", "history_from_log_history"]

#: PEFT's prefix of module names inside a ``PeftModel``; dropped from per-layer keys.
_PEFT_PREFIX = "base_model.model."
#: How many ``.optimizer`` attributes to follow (Accelerate, DeepSpeed and SageMaker wrappers).
_MAX_UNWRAP = 8
#: The summary keys of :func:`collect_metrics` (everything but the per-layer values).
_SUMMARY_KEYS = frozenset(
    {
        *("alpha/mean", "alpha/min", "alpha/max", "rho/mean", "rho/min", "rho/max"),
        *("alpha/backoffs", "alpha/measurements", "alpha/skipped"),
    }
)
#: Trainer log entries that :attr:`AlphaTunerCallback.history` keeps next to α and ρ.
_CONTEXT_KEYS = ("loss", "learning_rate", "grad_norm")


def find_alpha_tuned_optimizer(optimizer: object) -> AlphaTunedOptimizer | AttachedTuner | None:
    """Return the :class:`AlphaTunedOptimizer` inside ``optimizer`` (or the handle that
    :func:`alpha_tuner.attach` left on it), or ``None``.

    The Trainer hands callbacks Accelerate's ``AcceleratedOptimizer``; DeepSpeed and other
    back-ends add their own wrappers. All of them keep the wrapped optimizer in an
    ``optimizer`` attribute, which this follows.

    Args:
        optimizer: Any optimizer or optimizer wrapper (``None`` is fine).

    Returns:
        The first :class:`AlphaTunedOptimizer` along the ``.optimizer`` chain, if any.
    """
    current = optimizer
    for _ in range(_MAX_UNWRAP):
        if isinstance(current, AlphaTunedOptimizer):
            return current
        handle = attached_tuner(current)
        if handle is not None:
            return handle
        # AlphaTunedOptimizer forwards unknown attributes; others simply may not have one.
        current = getattr(current, "optimizer", None)
        if current is None:
            return None
    return None


def _short_name(name: str) -> str:
    return name[len(_PEFT_PREFIX) :] if name.startswith(_PEFT_PREFIX) else name


def collect_metrics(optimizer: object, *, per_layer: bool = False) -> dict[str, float]:
    """Read the tuner's telemetry as a flat ``{key: float}`` dict, in one device transfer.

    Args:
        optimizer: An :class:`AlphaTunedOptimizer`, or a wrapper around one (e.g. Accelerate's
            ``AcceleratedOptimizer``).
        per_layer: Also return ``alpha/<layer>`` and ``rho/<layer>`` for every tuned layer
            (layer names as in ``opt.alphas()``, without PEFT's ``base_model.model.`` prefix).

    Returns:
        The keys listed in this module's docstring; ``rho/*`` only after the first measurement.

    Raises:
        TypeError: If no :class:`AlphaTunedOptimizer` is found inside ``optimizer``.

    Example:
        >>> accelerator.log(collect_metrics(opt), step=step)  # doctest: +SKIP
    """
    opt = find_alpha_tuned_optimizer(optimizer)
    if opt is None:
        raise TypeError(
            f"No AlphaTunedOptimizer found in {type(optimizer).__name__}; pass the optimizer built as "
            "AlphaTunedOptimizer(torch.optim.AdamW(model.parameters(), lr=...), model)."
        )
    diag = opt.diagnostics(per_layer=per_layer)  # the one device transfer
    metrics = {
        "alpha/mean": diag["alpha_mean"],
        "alpha/min": diag["alpha_min"],
        "alpha/max": diag["alpha_max"],
    }
    if "rho_mean" in diag:
        metrics.update({"rho/mean": diag["rho_mean"], "rho/min": diag["rho_min"], "rho/max": diag["rho_max"]})
    metrics.update(
        {
            "alpha/backoffs": diag["backoffs"],
            "alpha/measurements": diag["measurements"],
            "alpha/skipped": diag["skipped"],
        }
    )
    if per_layer:
        for name, alpha in opt.alphas().items():  # host floats: PEFT stores scalings as numbers
            metrics[f"alpha/{_short_name(name)}"] = alpha
            if f"rho[{name}]" in diag:
                metrics[f"rho/{_short_name(name)}"] = diag[f"rho[{name}]"]
    return metrics


def history_from_log_history(log_history: list[Mapping[str, Any]]) -> list[dict[str, float]]:
    """Extract the logged α/ρ entries from ``trainer.state.log_history`` (or a loaded ``trainer_state.json``).

    Args:
        log_history: The Trainer's list of logged dicts.

    Returns:
        One dict per training log that carries α, shaped like the entries of
        :attr:`AlphaTunerCallback.history` (per-layer values only where they were logged).
    """
    out = []
    for record in log_history:
        if "alpha/mean" not in record:
            continue
        entry = {"step": float(record.get("step", math.nan))}
        entry.update({k: float(record[k]) for k in _CONTEXT_KEYS if k in record})
        entry.update({k: float(v) for k, v in record.items() if k.startswith(("alpha/", "rho/"))})
        out.append(entry)
    return out
