"""The step law on a model's LoRA layers: what it reads from them and what it writes back.

:mod:`alpha_tuner.steplaw` is the law's maths on tensors of per-layer values. This module is the
host-side wiring between that maths and the PEFT layers, for the engine's moments outside the
hot path: the norms the wrap-time placement starts from (:func:`layer_norms`), every layer's
placement (:func:`place_layers`), the law's starting state and the per-layer constants it
reads at each measurement (:func:`start_law`, :class:`LawLayers`), the law's state after the
first step's move to the schedule's targets (:func:`schedule_shifted`), and the factors'
gradient units, saved with a checkpoint (:func:`unit_rows`), set again when one is loaded
(:func:`restore_units`) and taken off when the tuner detaches (:func:`remove_units`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .discovery import LoraTarget
from .distributed import is_sharded
from .drift import lora_matrices
from .gradunits import GradUnits
from .rescale import group_map, rescale_state_
from .steplaw import UNPLACED, StepLaw, StepState, init_steps, placement

__all__ = [
    "LawLayers",
    "all_factors",
    "layer_norms",
    "place_layers",
    "pooled_move",
    "remove_units",
    "restore_units",
    "schedule_shifted",
    "start_law",
    "unit_rows",
]


def all_factors(targets: Iterable[LoraTarget]) -> list[nn.Parameter]:
    """A, B and B's bias of every target."""
    return [p for t in targets for p in (t.weight_a, *t.factor_params())]


def _norm(tensor: Tensor) -> Tensor:
    """``‖tensor‖_F`` as a plain tensor (a sharded DTensor's norm is reduced over its shards)."""
    norm = tensor.detach().float().norm()
    return norm.full_tensor() if is_sharded(norm) else norm


def _weight_norm(target: LoraTarget) -> Tensor:
    """``‖W₀‖_F`` of the frozen weight the layer adapts (NaN when it is not a float tensor)."""
    weight = getattr(target.layer.get_base_layer(), "weight", None)
    if not isinstance(weight, Tensor) or not weight.is_floating_point() or weight.is_meta:
        # Quantised, absent or not materialised: the law leaves the layer alone. On A's device,
        # so that it stacks with the norms of the others (a QLoRA model on CUDA).
        return torch.tensor(math.nan, device=target.weight_a.device)
    return _norm(weight)


@torch.no_grad()
def layer_norms(targets: Sequence[LoraTarget]) -> Tensor:
    """``‖A‖_F`` and ``‖W₀‖_F`` of every layer, shape ``(2, L)`` float32 (NaN for ``‖W₀‖`` where
    the base weight cannot be read)."""
    return torch.stack([torch.stack((_norm(t.weight_a), _weight_norm(t))) for t in targets], dim=1)


def place_layers(
    targets: Sequence[LoraTarget], optimizer: torch.optim.Optimizer, law: StepLaw, norms: Tensor
) -> tuple[list[float], list[float], list[bool]]:
    """α, balance and whether it was placed, of every layer, from
    :func:`~alpha_tuner.steplaw.placement` and :func:`layer_norms` (one host read).

    Args:
        targets: The LoRA layers.
        optimizer: The inner optimizer: each factor's LR is its group's schedule base LR
            (``initial_lr``; a scheduler made before wrapping has already lowered ``lr``).
        law: The step law in force.
        norms: ``(2, L)`` from :func:`layer_norms`.

    Returns:
        The new α, the balance μ (A is divided by it) and whether the layer was placed, per layer.
        With ``law.pool`` every placed layer takes the geometric means of the placed layers'
        ``m`` and μ (:attr:`~alpha_tuner.steplaw.StepLaw.pool`).
    """
    groups = optimizer.param_groups
    lr_of = {id(p): float(g.get("initial_lr", g["lr"])) for g in groups for p in g["params"]}
    moves, placed = [], []
    for t, (a_norm, w_norm) in zip(targets, norms.T.tolist(), strict=True):
        a2d, b2d = lora_matrices(t.weight_a, t.weight_b)
        where = placement(
            lr_a=lr_of[id(t.weight_a)], lr_b=lr_of[id(t.weight_b)],
            scaling=t.scaling, rank=t.rank, fan_in=a2d.shape[1], fan_out=b2d.shape[0],
            a_norm=a_norm, weight_norm=w_norm, config=law,
        )  # fmt: skip
        moves.append(where)
        placed.append(where is not UNPLACED)  # the object itself: a re-packed (m, μ) never is
    if law.pool and any(placed):
        shared = pooled_move([move for move, ok in zip(moves, placed, strict=True) if ok])
        moves = [shared if ok else move for move, ok in zip(moves, placed, strict=True)]
    alphas = [t.alpha * m for t, (m, _) in zip(targets, moves, strict=True)]
    return alphas, [mu for _, mu in moves], placed


def pooled_move(moves: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """The geometric means of the ``(m, μ)`` of ``moves`` (non-empty, every value positive)."""
    if not moves:
        raise ValueError("pooled_move needs at least one (m, mu)")
    logs = [sum(math.log(move[i]) for move in moves) / len(moves) for i in (0, 1)]
    return math.exp(logs[0]), math.exp(logs[1])


@dataclass(frozen=True)
class LawLayers:
    """What the law keeps of every layer from wrap time, on the tuner's device.

    Attributes:
        weight_norms: ``‖W₀‖_F`` of every layer, shape (L,) float32 (NaN where it cannot be read).
        divisors: What each layer's α is divided by to give PEFT's scaling, shape (L,) float32.
        placed: Which layers the law placed, a host list: it drives the first step's move to the
            schedule's targets.
        placed_mask: The same on the device, for the state update of that move (made at wrap
            time, so that the step copies nothing to the device).
    """

    weight_norms: Tensor
    divisors: Tensor
    placed: list[bool]
    placed_mask: Tensor

    def measurable(self) -> Tensor:
        """Bool (L,): the layers whose ``‖W₀‖`` was read and is positive, so that the law can
        measure their update (a device op)."""
        return torch.isfinite(self.weight_norms) & (self.weight_norms > 0)

    def update(self, log_alpha: Tensor, signal: Tensor) -> Tensor:
        """The relative update ``u = s·‖dB·A + B·dA‖ / ‖W₀‖`` of every layer, from log α and the
        meter's ``signal`` (``‖dB·A + B·dA‖``)."""
        scaling = torch.exp(log_alpha) / self.divisors
        return scaling * signal / self.weight_norms


def start_law(
    targets: Sequence[LoraTarget],
    alpha0: Tensor,
    norms: Tensor,
    *,
    recipe_alphas: Sequence[float],
    balances: Sequence[float] | None,
    placed: Sequence[bool],
) -> tuple[StepState, LawLayers]:
    """The law's state at wrap time and the per-layer constants it reads at each measurement.

    Args:
        targets: The LoRA layers.
        alpha0: α of every layer after placement, shape (L,) on the tuner's device.
        norms: ``(2, L)`` from :func:`layer_norms` (taken before placement).
        recipe_alphas: The recipe's α of every layer, before placement.
        balances: The placement's balance μ of every layer (``None``: not placed, 1).
        placed: Whether the law placed each layer.
    """
    device = alpha0.device

    def as_tensor(values: Sequence[float]) -> Tensor:
        return torch.tensor(values, dtype=torch.float32, device=device)

    a_norms0, weight_norms = norms.to(device).unbind(0)
    state = init_steps(
        alpha0,
        balance0=None if balances is None else as_tensor(balances),
        alpha_recipe=as_tensor(recipe_alphas),
        a_norm0=a_norms0,
    )
    layers = LawLayers(
        weight_norms=weight_norms,
        divisors=as_tensor([t.divisor for t in targets]),
        placed=list(placed),
        placed_mask=torch.tensor(placed, dtype=torch.bool, device=device),
    )
    return state, layers


def schedule_shifted(law: StepState, placed: Tensor, m: float, mu: float) -> StepState:
    """The law's state after the placed layers moved by ``α·m`` and balance ``μ``
    (:func:`~alpha_tuner.steplaw.schedule_shift`): their current and reference log α and log
    balance shift by ``log m`` and ``log μ``; the other layers keep theirs."""
    log_m, log_mu = math.log(m), math.log(mu)

    def shift(x: Tensor, by: float) -> Tensor:
        return torch.where(placed, x + by, x)

    return law._replace(
        log_alpha=shift(law.log_alpha, log_m),
        log_alpha0=shift(law.log_alpha0, log_m),
        log_balance=shift(law.log_balance, log_mu),
        log_balance0=shift(law.log_balance0, log_mu),
    )


def unit_rows(targets: Sequence[LoraTarget], units: GradUnits) -> list[list[float]]:
    """The gradient units of A, B and B's bias (1 without one) of every layer, for a checkpoint."""
    rows = []
    for t in targets:
        bias = 1.0 if t.bias_b is None else units.scale(t.bias_b)
        rows.append([units.scale(t.weight_a), units.scale(t.weight_b), bias])
    return rows


def restore_units(
    targets: Sequence[LoraTarget],
    units: GradUnits,
    law: StepState,
    saved: Mapping[int, Sequence[float]] | None,
) -> None:
    """Set the factors' gradient units after a checkpoint is loaded: the saved rows, else (an
    entry without them) the units the law's state implies (A ``1/μ``, B ``μ·α_recipe/α``)."""
    log_a = -law.log_balance
    log_b = law.log_balance + law.log_alpha_recipe - law.log_alpha
    rows = torch.stack((log_a, log_b, law.log_alpha_recipe - law.log_alpha)).exp().T.tolist()
    for i, row in (saved or {}).items():
        rows[i] = list(row)
    for target, (k_a, k_b, k_bias) in zip(targets, rows, strict=True):
        units.set_(target.weight_a, k_a)
        units.set_(target.weight_b, k_b)
        if target.bias_b is not None:
            units.set_(target.bias_b, k_bias)


def remove_units(targets: Sequence[LoraTarget], units: GradUnits, optimizer: torch.optim.Optimizer) -> None:
    """Remove the gradient hooks, putting the optimizer's moments of hooked factors back in the
    factors' raw units."""
    groups = group_map(optimizer)
    for p in all_factors(targets):
        k = units.scale(p)
        if units.hooked(p) and k != 1.0:
            rescale_state_(optimizer, p, k, groups.get(id(p), {}))
    units.remove()
