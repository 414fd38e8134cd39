"""Change a LoRA layer's α without changing the model, and keep the optimizer consistent.

Changing the multiplier ``s → s'`` while multiplying B (and B's bias) by ``m = s / s'`` keeps
``s·B·A`` (hence the model's function, DoRA included) unchanged. B is the factor to move: A's
gradient ``s·Bᵀ·G`` is then unchanged, and under Adam the run continues exactly as if B's
learning rate had been multiplied by ``s'/s`` (the α ↔ LoRA+ equivalence of DESIGN-NOTES §3).

The gradient of ``B' = m·B`` is ``grad/m``, so every state the inner optimizer keeps for B
must be rewritten *as if its past gradients had been taken in the new parametrisation*:
a first moment scales by ``1/m``, a second moment by ``1/m²``. :data:`STATE_EXPONENTS` lists,
per optimizer, the power ``p`` with ``state' = state · m**p``. For an optimizer not listed,
or a state key not listed, the state of the rescaled parameters is dropped (the optimizer
re-initialises it lazily, as on its first step) and a warning says so once: mixing scales
silently is the one outcome this module never allows.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from .discovery import LoraTarget
from .distributed import is_sharded
from .gradunits import GradUnits

__all__ = [
    "STATE_EXPONENTS",
    "group_map",
    "rescale_state_",
    "rescale_target_",
    "rescale_targets_",
    "state_exponents",
    "update_adapter_config",
    "write_alpha",
]

_ADAM = {"exp_avg": -1, "exp_avg_sq": -2, "max_exp_avg_sq": -2, "step": 0, "mu_product": 0}

#: Power p of the ratio m = s/s' by which each per-parameter state entry is multiplied.
STATE_EXPONENTS: Mapping[str, Mapping[str, int]] = {
    "Adam": _ADAM,
    "AdamW": _ADAM,
    "RAdam": _ADAM,
    "NAdam": _ADAM,
    "Adamax": {"exp_avg": -1, "exp_inf": -1, "step": 0},
    "SGD": {"momentum_buffer": -1},
    "Adagrad": {"sum": -2, "step": 0},
    # RMSprop's momentum buffer accumulates grad/sqrt(avg): scale-free.
    "RMSprop": {"square_avg": -2, "grad_avg": -1, "momentum_buffer": 0, "step": 0},
    # Adadelta's acc_delta accumulates squared *updates*, which live in parameter units.
    "Adadelta": {"square_avg": -2, "acc_delta": 2, "step": 0},
    # transformers.optimization.Adafactor; exp_avg averages updates, see state_exponents().
    "Adafactor": {
        "exp_avg_sq_row": -2,
        "exp_avg_sq_col": -2,
        "exp_avg_sq": -2,
        "exp_avg": 0,
        "RMS": 1,
        "step": 0,
    },
}

_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def state_exponents(
    optimizer: torch.optim.Optimizer, group: Mapping[str, object]
) -> Mapping[str, int] | None:
    """Return the state exponents for ``optimizer``'s class, or ``None`` if unknown.

    Adafactor's first moment averages *updates*; with ``scale_parameter=True`` an update is
    proportional to the RMS of the parameter, so it scales with ``m``.
    """
    name = type(optimizer).__name__
    table = STATE_EXPONENTS.get(name)
    if table is None:
        return None
    if name == "Adafactor" and group.get("scale_parameter", False):
        return {**table, "exp_avg": 1}
    return table


def group_map(optimizer: torch.optim.Optimizer) -> dict[int, Mapping[str, object]]:
    """Parameter id → its param group: build it once per batch of rescales, not per layer."""
    return {id(p): g for g in optimizer.param_groups for p in g["params"]}


def _state_factors(
    optimizer: torch.optim.Optimizer, param: nn.Parameter, ratio: float, group: Mapping[str, object]
) -> list[tuple[Tensor, float]]:
    """The state tensors of ``param`` and the factor each is multiplied by when ``param`` is.

    Number-valued entries are rewritten here; unknown state is dropped with a warning (once).
    """
    state = optimizer.state.get(param)
    if not state:
        return []
    table = state_exponents(optimizer, group)
    unknown = [k for k in state if table is None or k not in table]
    if table is None or unknown:
        _warn_once(
            f"alpha_tuner does not know how {type(optimizer).__name__} state {sorted(unknown)} scales "
            "with a LoRA factor; the state of rescaled LoRA B factors is reset (re-initialised on the "
            "next step) whenever alpha changes. Use torch AdamW/Adam/SGD for exact state rescaling, or "
            "AlphaTunedOptimizer(..., adapt=False) to change alpha only once, before training."
        )
        optimizer.state.pop(param)
        return []
    out: list[tuple[Tensor, float]] = []
    for key, value in state.items():
        power = table[key]
        if power == 0:
            continue
        factor = ratio**power
        if isinstance(value, Tensor):
            out.append((value, factor))
        elif isinstance(value, (int, float)):
            state[key] = value * factor
    return out


def _multiply_all_(pairs: Sequence[tuple[Tensor, float]]) -> None:
    """``t.mul_(k)`` for every pair, as one fused multi-tensor kernel per kind of tensor.

    Each product is the one ``mul_`` computes; a control step rescales hundreds of tensors, and
    one launch each would cost more than the optimizer step on an accelerator. Sharded
    (DTensor) tensors are multiplied one by one.
    """
    plain = [(t, k) for t, k in pairs if k != 1.0 and not is_sharded(t)]
    with torch.no_grad():
        for t, k in pairs:
            if k != 1.0 and is_sharded(t):
                t.mul_(k)
        if plain:
            torch._foreach_mul_([t for t, _ in plain], [k for _, k in plain])


def rescale_state_(
    optimizer: torch.optim.Optimizer, param: nn.Parameter, ratio: float, group: Mapping[str, object]
) -> None:
    """Rewrite ``param``'s optimizer state for ``param`` multiplied by ``ratio``.

    Args:
        optimizer: The optimizer holding the state.
        param: The parameter that was (or is about to be) multiplied by ``ratio``.
        ratio: The multiplier.
        group: ``param``'s param group (Adafactor's exponents depend on it).
    """
    _multiply_all_(_state_factors(optimizer, param, ratio, group))


def write_alpha(target: LoraTarget, alpha: float) -> None:
    """Set the PEFT α and scaling of ``target`` exactly as PEFT computes them on load."""
    layer = target.layer
    layer.lora_alpha[target.adapter] = alpha
    layer.scaling[target.adapter] = alpha / target.divisor


def _checked(name: str, value: object, target: LoraTarget) -> float:
    if not (isinstance(value, (int, float)) and value == value and 0 < value < float("inf")):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r} for {target.module_name}.")
    return float(value)


def rescale_target_(
    target: LoraTarget,
    alpha: float,
    optimizer: torch.optim.Optimizer | None,
    *,
    groups: Mapping[int, Mapping[str, object]] | None = None,
    balance: float = 1.0,
) -> float:
    """Set ``target``'s α to ``alpha`` keeping ``s·B·A`` and the optimizer state consistent.

    With multiplier ratio ``m = s_new / s_old`` and ``balance`` μ the factors become
    ``A/μ``, ``B·μ/m`` (B's bias ``/m``): ``s·B·A`` and so the model's function do not change.
    Under Adam (ε → 0, weight decay 0) training then continues as if A's learning rate were
    multiplied by μ and B's by ``m/μ`` (DESIGN-NOTES, "Two knobs"). ``balance=1`` moves only B:
    raising α by k is then raising B's learning rate by k.

    Args:
        target: The LoRA layer/adapter to change.
        alpha: The new α, in the model's convention; finite and > 0.
        optimizer: The inner optimizer whose state for the rescaled factors is rewritten
            (``None``: no state).
        groups: :func:`group_map` of ``optimizer``, when rescaling several layers in a row.
        balance: μ, finite and > 0: how much of the change A takes.

    Returns:
        The ratio ``1/m = s_old / s_new`` (B's bias is multiplied by it; B by ``μ/m``).

    Raises:
        ValueError: If ``alpha`` or ``balance`` is not finite and positive.
    """
    return rescale_targets_([target], [alpha], optimizer, groups=groups, balances=[balance])[0]


def rescale_targets_(
    targets: Sequence[LoraTarget],
    alphas: Sequence[float],
    optimizer: torch.optim.Optimizer | None,
    *,
    groups: Mapping[int, Mapping[str, object]] | None = None,
    balances: Sequence[float] | None = None,
    units: GradUnits | None = None,
) -> list[float]:
    """:func:`rescale_target_` for many layers at once, with a few fused kernels in all.

    The factors, and the optimizer state of those whose gradients are not in recipe units,
    are multiplied by one multi-tensor kernel each, instead of several kernels per layer: the
    result is the same, element for element.

    Args:
        targets: The LoRA layers/adapters to change.
        alphas: The new α of each, in the model's convention; finite and > 0.
        optimizer: The inner optimizer whose state is rewritten (``None``: no state).
        groups: :func:`group_map` of ``optimizer``.
        balances: μ of each (default 1: only B moves).
        units: Gradient units of the factors (:class:`~alpha_tuner.gradunits.GradUnits`). For a
            layer whose factors are all hooked, the moments are already in recipe units, so the
            units move instead of the state.

    Returns:
        The ratio ``s_old / s_new`` of each layer.

    Raises:
        ValueError: If an ``alpha`` or ``balance`` is not finite and positive, or the lengths
            differ.
    """
    balances = [1.0] * len(targets) if balances is None else balances
    if not len(targets) == len(alphas) == len(balances):
        raise ValueError(
            f"rescale_targets_ needs one alpha and one balance per target: got {len(targets)} targets, "
            f"{len(alphas)} alphas and {len(balances)} balances."
        )
    checked = [
        (_checked("alpha", a, t), _checked("balance", mu, t))
        for t, a, mu in zip(targets, alphas, balances, strict=True)
    ]
    products: list[tuple[Tensor, float]] = []
    ratios = []
    for target, (alpha, balance) in zip(targets, checked, strict=True):
        ratio = target.scaling / (alpha / target.divisor)
        ratios.append(ratio)
        weight_b, bias_b = target.weight_b, target.bias_b
        factors = [(weight_b, ratio * balance)]
        if bias_b is not None:
            factors.append((bias_b, ratio))
        if balance != 1.0:
            factors.append((target.weight_a, 1.0 / balance))
        factors = [(p, k) for p, k in factors if k != 1.0]
        if factors:
            params = [target.weight_a, weight_b] if bias_b is None else [target.weight_a, weight_b, bias_b]
            hooked = units is not None and all(units.hooked(p) for p in params)
            if optimizer is not None and not hooked and groups is None:
                groups = group_map(optimizer)
            for param, k in factors:
                products.append((param, k))
                if hooked and units is not None:
                    units.multiply_(param, k)
                elif optimizer is not None and groups is not None:
                    products.extend(_state_factors(optimizer, param, k, groups.get(id(param), {})))
        write_alpha(target, alpha)
    _multiply_all_(products)
    return ratios


def update_adapter_config(model: nn.Module, targets: list[LoraTarget]) -> None:
    """Record each target's α in its adapter config's ``alpha_pattern``.

    ``save_pretrained`` then writes the tuned α per module, and ``PeftModel.from_pretrained``
    rebuilds the same scaling. Keys are escaped full module names, placed before any pattern
    the user had so that they win PEFT's first-match lookup.
    """
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, Mapping):
        return
    by_adapter: dict[str, dict[str, float]] = {}
    for t in targets:
        if t.config_key is not None:
            by_adapter.setdefault(t.adapter, {})[re.escape(t.config_key)] = t.alpha
    for adapter, pattern in by_adapter.items():
        config = configs.get(adapter)
        if config is None or not hasattr(config, "alpha_pattern"):
            continue
        previous = dict(config.alpha_pattern or {})
        config.alpha_pattern = {**pattern, **{k: v for k, v in previous.items() if k not in pattern}}
