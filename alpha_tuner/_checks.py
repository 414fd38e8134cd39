"""Argument checks shared by the library: each names the argument, the bad value and the valid range."""

from __future__ import annotations

import math

__all__ = ["check_finite", "check_int", "check_positive"]


def check_int(name: str, value: object, minimum: int) -> int:
    """``value`` if it is an ``int`` (not a ``bool``) ≥ ``minimum``.

    Raises:
        ValueError: Naming ``name``, the value and the bound, otherwise.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return value


def check_positive(name: str, value: object) -> float:
    """``value`` as a float if it is a finite real number > 0.

    Raises:
        ValueError: Naming ``name`` and the value, otherwise.
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
    return float(value)


def check_finite(name: str, value: object) -> float:
    """``value`` as a float if it is a finite real number.

    Raises:
        ValueError: Naming ``name`` and the value, otherwise.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")
    return float(value)
