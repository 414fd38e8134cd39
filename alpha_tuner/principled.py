"""The principled LoRA-α starting point: the default :class:`~alpha_tuner.rule.AlphaRule`, its
provenance, and functions that apply it to the layers of an optimizer.

PEFT applies the multiplier ``s = α / r`` (or ``α / √r`` with rsLoRA) to ``B·A``. The library
fixes the *multiplier* at

    s* = c(η) · r^(p(η) − 1),      c(η) = C_REF · (η_REF / η) ** LR_EXPONENT,
                                   p(η) = RANK_EXPONENT + RANK_EXPONENT_SLOPE · ln(η / η_REF)

which is ``α = c(η)·r^p(η)`` in PEFT's default convention and ``α = c(η)·r^(p(η) − ½)`` under
rsLoRA. The paper's regime is p = ½ (α = c·√r: the norm of ``B·A`` for r roughly independent
directions grows like √r, rsLoRA's argument); ``rank_exponent=0.5`` restores it. Why c depends
on η: under Adam the step of each factor has size ~η whatever α is, so the signal of one step
in function space is ~``s·η``; LoRA-α trains at the small learning rates of full fine-tuning and
compensates with an α far above the ``α = r`` / ``α = 2r`` habits.

Provenance of the constants: measured. ``alpha-tuner sweep`` trained MiniLM (all-MiniLM-L6-v2)
with LoRA on Rotten Tomatoes review sentiment, 150 AdamW steps at batch 8, over
r ∈ {4, 16, 64, 256} × η ∈ {2e-5, 8e-5, 3.2e-4} × 8–11 values of α, on selection seeds 0 and 1
(``benchmarks/results/sweep_minilm.jsonl``). The best α of each of the 12 (rank, LR) grids was
fitted jointly in four forms (``sweep_minilm_report.json``, ``rule``): p and its LR slope free,
p free, p = 0 and p = ½. Left out one (rank, LR) at a time, the form p = 0 predicted the
left-out best α best (within a factor 1.70 in root mean square, against 1.82 with p free, 2.28
with p moving with the LR and 2.82 at p = ½); the free fit gives p = 0.03, 90 % interval
[−0.07, 0.17], which excludes ½. So on this task the best α does not grow with the rank:
C_REF = 1130 and LR_EXPONENT = 1.41 (fitted 1130.0 and 1.412), RANK_EXPONENT = 0, which is the
multiplier ``s = α/r`` of plain LoRA with one α for every rank, not rsLoRA's ``1/√r``. c(η)
falls faster than 1/η: the best effective step s·η shrinks as η grows. The rule is measured on
2e-5 ≤ η ≤ 3.2e-4 and 4 ≤ r ≤ 256 only; outside that range it is an extrapolation.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import torch

from .rule import C_REF, LR_EXPONENT, RANK_EXPONENT, RANK_EXPONENT_SLOPE, REFERENCE_LR, AlphaRule

__all__ = [
    "C_REF",
    "LR_EXPONENT",
    "MAX_CALIBRATED_RANK",
    "RANK_EXPONENT",
    "RANK_EXPONENT_SLOPE",
    "REFERENCE_LR",
    "AlphaRule",
    "base_lr",
    "principled_alpha",
    "principled_alphas",
    "principled_coefficient",
    "principled_multiplier",
    "principled_rank_exponent",
]

#: The largest rank the rule was calibrated on; larger ranks get a warning (an earlier rule,
#: calibrated up to r = 64, overshot the best α at r = 256 by 4.8×: BENCHMARKS.md).
MAX_CALIBRATED_RANK: int = 256


def principled_coefficient(
    lr: float, *, c: float = C_REF, reference_lr: float = REFERENCE_LR, lr_exponent: float = LR_EXPONENT
) -> float:
    """Return c(η) = c · (reference_lr / lr) ** lr_exponent (:meth:`AlphaRule.coefficient`).

    Raises:
        ValueError: If a value is not finite and positive (``lr_exponent`` may be 0).
    """
    return AlphaRule(c=c, reference_lr=reference_lr, lr_exponent=lr_exponent).coefficient(lr)


def principled_rank_exponent(
    lr: float,
    *,
    rank_exponent: float = RANK_EXPONENT,
    rank_exponent_slope: float = RANK_EXPONENT_SLOPE,
    reference_lr: float = REFERENCE_LR,
) -> float:
    """Return p(η) = rank_exponent + rank_exponent_slope · ln(lr / reference_lr) (:meth:`AlphaRule.exponent`).

    Raises:
        ValueError: If ``lr`` or ``reference_lr`` is not finite and positive, or an exponent
            is not finite.
    """
    rule = AlphaRule(
        reference_lr=reference_lr, rank_exponent=rank_exponent, rank_exponent_slope=rank_exponent_slope
    )
    return rule.exponent(lr)


def principled_multiplier(rank: int, lr: float, **rule: float) -> float:
    """Return the multiplier s* = c(η) · r^p(η) / r applied to ``B·A`` (:meth:`AlphaRule.multiplier`).

    Args:
        rank: The LoRA rank r (≥ 1).
        lr: The base learning rate.
        **rule: Fields of :class:`AlphaRule` that differ from the default.

    Raises:
        ValueError: If ``rank`` is not a positive integer or another input is invalid.
    """
    return AlphaRule(**rule).multiplier(rank, lr)


def principled_alpha(rank: int, lr: float, *, use_rslora: bool = False, **rule: float) -> float:
    """Return the principled α in PEFT's convention for this layer (:meth:`AlphaRule.alpha`).

    ``c(η)·r^p(η)`` for the default ``α / r`` scaling; ``c(η)·r^(p(η) − ½)`` for rsLoRA's
    ``α / √r``. Both give the same multiplier :func:`principled_multiplier`.

    Args:
        rank: The LoRA rank r (≥ 1).
        lr: The base learning rate.
        use_rslora: Whether the layer scales by ``α / √r``.
        **rule: Fields of :class:`AlphaRule` that differ from the default.

    Example:
        >>> round(principled_alpha(16, 2e-5, c=280.0, rank_exponent=0.5), 6)
        1120.0
        >>> round(principled_alpha(16, 2e-5, use_rslora=True, c=280.0, rank_exponent=0.5), 6)
        280.0
        >>> round(principled_alpha(64, 2e-5, c=1130.0, rank_exponent=0.0), 6)  # rank-free
        1130.0
    """
    return AlphaRule(**rule).alpha(rank, lr, use_rslora=use_rslora)


class _Layer(Protocol):
    @property
    def rank(self) -> int: ...
    @property
    def use_rslora(self) -> bool: ...
    @property
    def weight_a(self) -> torch.Tensor: ...


def base_lr(group: Mapping[str, Any]) -> float | None:
    """The group's base LR (``initial_lr`` once a scheduler ran), or None if not positive."""
    lr = group.get("initial_lr", group.get("lr"))
    if isinstance(lr, torch.Tensor):
        lr = float(lr)  # construction time, not the hot path
    if lr is None or not math.isfinite(lr) or lr <= 0:
        return None
    return float(lr)


def principled_alphas(
    layers: Sequence[_Layer],
    param_groups: Iterable[Mapping[str, Any]],
    rule: AlphaRule | None = None,
    **fields: float,
) -> list[float]:
    """The principled α of each LoRA layer at the base LR of its A factor's parameter group.

    A group without a positive LR (Adafactor with ``lr=None``) uses ``reference_lr``, with one
    ``RuntimeWarning``. Ranks above :data:`MAX_CALIBRATED_RANK` get one ``UserWarning`` unless
    the rule was set by hand (it is not the library's default).

    Args:
        layers: The LoRA targets (rank, rsLoRA flag and A factor of each).
        param_groups: The optimizer's parameter groups, holding every A factor.
        rule: The rule (default: :class:`AlphaRule`'s defaults, changed by ``fields``).
        **fields: Fields of :class:`AlphaRule`, when ``rule`` is not given.

    Raises:
        TypeError: If both ``rule`` and ``fields`` are given.
    """
    if rule is not None and fields:
        raise TypeError("Pass either rule= or the rule's fields, not both.")
    rule = rule or AlphaRule(**fields)
    group_of = {id(p): g for g in param_groups for p in g["params"]}
    alphas, fallback = [], False
    for layer in layers:
        lr = base_lr(group_of[id(layer.weight_a)])
        if lr is None:
            lr, fallback = rule.reference_lr, True
        alphas.append(rule.alpha(layer.rank, lr, use_rslora=layer.use_rslora))
    beyond = sorted({layer.rank for layer in layers if layer.rank > MAX_CALIBRATED_RANK})
    if beyond and rule.is_default:
        warnings.warn(
            f"LoRA rank(s) {beyond} exceed the largest rank the principled rule was measured on "
            f"({MAX_CALIBRATED_RANK}); its alpha there is an extrapolation (BENCHMARKS.md). "
            "Pass c= (and rank_exponent=) to set the rule yourself: alpha = c*r**rank_exponent "
            "at the reference learning rate.",
            UserWarning,
            stacklevel=3,
        )
    if fallback:
        warnings.warn(
            "A LoRA parameter group has no positive learning rate (e.g. Adafactor with lr=None); "
            "its principled alpha uses the reference learning rate instead.",
            RuntimeWarning,
            stacklevel=3,
        )
    return alphas
