"""The α rule as one object: :class:`AlphaRule` decides the principled α of every LoRA layer.

PEFT multiplies ``B·A`` by ``s = α / r`` (or ``α / √r`` with rsLoRA). The rule fixes the
multiplier at

    s*(r, η) = c(η) · r^(p(η) − 1),    c(η) = c · (η_ref / η) ** q,
                                       p(η) = p₀ + p₁ · ln(η / η_ref)

which is ``α = c(η)·r^p(η)`` in PEFT's default convention and ``α = c(η)·r^(p(η) − ½)`` under
rsLoRA. **c has one meaning everywhere in the library**: the α of a rank-1 layer at the
reference LR η_ref in PEFT's default convention (so at p = 0 it is the α of every rank). The
CLI, ``inspect``, the sweep and the reports all speak of this c. :meth:`AlphaRule.implied_c`
inverts the rule: the c that would give a layer its α, comparable with :data:`C_REF`.

The default constants and their provenance are in :mod:`alpha_tuner.principled`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from ._checks import check_finite, check_int, check_positive

__all__ = [
    "C_REF",
    "LR_EXPONENT",
    "RANK_EXPONENT",
    "RANK_EXPONENT_SLOPE",
    "REFERENCE_LR",
    "AlphaRule",
    "pop_rule",
    "resolve_rule",
    "rule_alpha",
]

#: Coefficient c at the reference learning rate (measured, see :mod:`alpha_tuner.principled`).
C_REF: float = 1130.0
#: The learning rate at which c equals ``C_REF``: full fine-tuning's AdamW rate.
REFERENCE_LR: float = 2e-5
#: How c grows as the learning rate shrinks: ``c ∝ η ** -LR_EXPONENT`` (measured).
LR_EXPONENT: float = 1.41
#: The rank exponent p of α ∝ r^p at the reference learning rate (measured: 0).
RANK_EXPONENT: float = 0.0
#: How p moves with the learning rate: p(η) = RANK_EXPONENT + RANK_EXPONENT_SLOPE·ln(η/η_ref).
RANK_EXPONENT_SLOPE: float = 0.0


def rule_alpha(
    rank: float, lr: float, params: Mapping[str, float], *, reference_lr: float = REFERENCE_LR
) -> float:
    """The formula ``α = c·(η_ref/η)^q · r^(p₀ + p₁·ln(η/η_ref))`` with no range checks.

    :class:`AlphaRule` applies it after validating its fields; a fit of the rule evaluates it
    directly, since a bootstrap draw may give an exponent the library refuses as a setting.

    Args:
        rank: The rank r (any positive real).
        lr: The learning rate η.
        params: ``c``, ``lr_exponent``, ``rank_exponent`` and ``rank_exponent_slope``.
        reference_lr: η_ref.
    """
    x = math.log(reference_lr / lr)
    p = params["rank_exponent"] - params["rank_exponent_slope"] * x
    return params["c"] * math.exp(params["lr_exponent"] * x) * rank**p


@dataclass(frozen=True)
class AlphaRule:
    """The principled α of a LoRA layer from its rank and base learning rate.

    Attributes:
        c: α of a rank-1 layer at ``reference_lr`` (PEFT's ``α/r`` convention), > 0.
        reference_lr: η_ref, where the coefficient is ``c`` and the rank exponent ``p₀``, > 0.
        lr_exponent: q ≥ 0 in ``c(η) = c·(η_ref/η)**q`` (0 ignores the LR).
        rank_exponent: p₀, the exponent of ``α ∝ r^p`` at η_ref (½ is the paper's √r law).
        rank_exponent_slope: p₁ in ``p(η) = p₀ + p₁·ln(η/η_ref)``.

    Raises:
        ValueError: If a field is out of its range; the message names the field.

    Example:
        >>> AlphaRule().alpha(16, 2e-5)
        1130.0
        >>> round(AlphaRule(c=280.0, rank_exponent=0.5).alpha(16, 2e-5, use_rslora=True), 6)
        280.0
    """

    c: float = C_REF
    reference_lr: float = REFERENCE_LR
    lr_exponent: float = LR_EXPONENT
    rank_exponent: float = RANK_EXPONENT
    rank_exponent_slope: float = RANK_EXPONENT_SLOPE

    def __post_init__(self) -> None:
        check_positive("c", self.c)
        check_positive("reference_lr", self.reference_lr)
        check_finite("lr_exponent", self.lr_exponent)
        if self.lr_exponent < 0:
            raise ValueError(f"lr_exponent must be a finite number >= 0, got {self.lr_exponent!r}.")
        check_finite("rank_exponent", self.rank_exponent)
        check_finite("rank_exponent_slope", self.rank_exponent_slope)

    # ------------------------------------------------------------------------- the maths
    def coefficient(self, lr: float) -> float:
        """c(η) = c · (η_ref / η) ** q."""
        return self.c * (self.reference_lr / check_positive("lr", lr)) ** self.lr_exponent

    def exponent(self, lr: float) -> float:
        """p(η) = p₀ + p₁ · ln(η / η_ref)."""
        return self.rank_exponent + self.rank_exponent_slope * math.log(
            check_positive("lr", lr) / self.reference_lr
        )

    def multiplier(self, rank: int, lr: float) -> float:
        """The multiplier s* = c(η) · r^(p(η) − 1) applied to ``B·A``."""
        check_int("rank", rank, 1)
        check_positive("lr", lr)
        return rule_alpha(rank, lr, self.to_dict(), reference_lr=self.reference_lr) / rank

    def alpha(self, rank: int, lr: float, *, use_rslora: bool = False) -> float:
        """The principled α in the layer's own convention (``α/r``, or ``α/√r`` with rsLoRA)."""
        return self.multiplier(rank, lr) * (math.sqrt(rank) if use_rslora else float(rank))

    def implied_c(self, alpha: float, rank: int, lr: float, *, use_rslora: bool = False) -> float:
        """The c under which this rule gives a layer of ``rank`` at ``lr`` this ``alpha``.

        Comparable with :attr:`c` (and :data:`C_REF`): ``implied_c(rule.alpha(r, η), r, η) == rule.c``.
        """
        s = check_positive("alpha", alpha) / (
            math.sqrt(rank) if use_rslora else float(check_int("rank", rank, 1))
        )
        return s * self.c / self.multiplier(rank, lr)

    # -------------------------------------------------------------------------- identity
    @property
    def is_default(self) -> bool:
        """Whether this is the library's measured default rule."""
        return self == AlphaRule()

    @property
    def tag(self) -> str:
        """The rule's name in result files: ``c=1130@2e-05,q=1.41,p=0``.

        ``,p=…`` (with ``±…ln`` for a slope) is left out for the paper's √r law (p = ½, no
        slope), the form of the first results files, so their keys still read.
        """
        tag = f"c={self.c:g}@{self.reference_lr:g},q={self.lr_exponent:g}"
        if (self.rank_exponent, self.rank_exponent_slope) != (0.5, 0.0):
            tag += f",p={self.rank_exponent:g}"
            if self.rank_exponent_slope:
                tag += f"{self.rank_exponent_slope:+g}ln"
        return tag

    def to_dict(self) -> dict[str, float]:
        """The five parameters as a plain dict (JSON-able)."""
        return {k: float(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> AlphaRule:
        """A rule from a dict of some of the five parameters (the rest at their defaults).

        Raises:
            TypeError: For a key that is not a rule parameter.
        """
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - names)
        if unknown:
            raise TypeError(f"Unknown rule parameter(s) {unknown}; the rule's are {sorted(names)}.")
        return cls(**params)


def resolve_rule(rule: AlphaRule | None, **fields: float | None) -> AlphaRule | None:
    """``rule``, or one built from the keyword shorthand (``None`` fields stay at their defaults).

    ``None`` when neither is given: the engine then uses the default rule. The type of ``rule``
    is checked where the options are validated (:class:`alpha_tuner.engine.EngineOptions`).

    Raises:
        TypeError: If both ``rule`` and fields are given.
    """
    given = {k: v for k, v in fields.items() if v is not None}
    if rule is None:
        return AlphaRule(**given) if given else None
    if given:
        raise TypeError(
            f"Pass either rule= or the rule's fields ({', '.join(sorted(given))}), not both: "
            "e.g. rule=dataclasses.replace(rule, c=...)."
        )
    return rule


def pop_rule(options: dict[str, Any]) -> AlphaRule | None:
    """Take ``rule`` and the rule's fields out of keyword ``options`` and resolve them."""
    fields_given = {f.name: options.pop(f.name) for f in fields(AlphaRule) if f.name in options}
    return resolve_rule(options.pop("rule", None), **fields_given)
