"""The tuner's entry in an optimizer state dict: packing, version check, and re-keying.

The entry is keyed by ``"module::adapter"`` (never by tensor identity) and holds only tensors,
numbers, strings and lists, so ``torch.load(..., weights_only=True)`` (the Trainer's resume)
accepts it. On load, rows are matched by key, so a checkpoint restores the layers it knows and
leaves the others as they are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .control import ControlState
from .steplaw import StepState

__all__ = ["STATE_VERSION", "RestoredState", "pack_tuner_state", "unpack_tuner_state"]

#: Version of the ``"alpha_tuner"`` entry; a newer one is refused with a clear error.
STATE_VERSION = 1


class RestoredState(NamedTuple):
    """What a saved entry gives back, aligned with the current layers.

    Attributes:
        alphas: ``{layer index: saved α}`` for the layers the checkpoint knows.
        missing: Keys of current layers the checkpoint does not know.
        control: The controller state with the saved rows written in.
        rho: The last-ρ vector with the saved rows written in (``None`` if not saved).
        steps: The saved step counter (``None`` if not saved).
        phase: The saved measurement phase (0 for checkpoints from before phases).
        law: The step law's state with the saved rows written in (``None`` when the tuner has
            none; the current one when the entry has none).
        units: ``{layer index: [K of A, K of B, K of B's bias]}``, the gradient units of the
            step law's factors (:mod:`alpha_tuner.gradunits`), when saved.
        schedule: ``(mean, source)`` of the LR schedule the step law read
            (:mod:`alpha_tuner.schedule`), when saved.
    """

    alphas: dict[int, float]
    missing: list[str]
    control: ControlState
    rho: Tensor | None
    steps: int | None
    phase: int
    law: StepState | None = None
    units: dict[int, list[float]] | None = None
    schedule: tuple[float, str] | None = None


def pack_tuner_state(
    *,
    steps: int,
    phase: int,
    keys: Sequence[str],
    alphas: Sequence[float],
    control: ControlState,
    rho: Tensor,
    law: StepState | None = None,
    units: Sequence[Sequence[float]] | None = None,
    schedule: tuple[float, str] | None = None,
) -> dict[str, Any]:
    """Build the ``"alpha_tuner"`` entry (copies of the tensors, plain Python otherwise)."""
    entry = {
        "version": STATE_VERSION,
        "steps": steps,
        "phase": phase,
        "keys": list(keys),
        "alpha": list(alphas),
        "control": {k: v.detach().clone() for k, v in control._asdict().items()},
        "rho": rho.detach().clone(),
    }
    if law is not None:
        entry["law"] = {k: v.detach().clone() for k, v in law._asdict().items()}
    if units is not None:
        entry["units"] = [list(map(float, row)) for row in units]
    if schedule is not None:
        entry["schedule"] = {"mean": float(schedule[0]), "source": str(schedule[1])}
    return entry


def _merge_rows(current: Tensor, saved: object, dst: Tensor, src: Tensor) -> Tensor:
    value = torch.as_tensor(saved).to(device=current.device, dtype=current.dtype)
    return current.clone().index_copy_(0, dst, value.index_select(0, src))


def unpack_tuner_state(
    tuner: object, *, keys: Sequence[str], control: ControlState, rho: Tensor, law: StepState | None = None
) -> RestoredState:
    """Check a saved entry and align its rows with the current layers ``keys``.

    Args:
        tuner: The saved ``"alpha_tuner"`` entry.
        keys: The current layers' keys, in the optimizer's order.
        control: The current controller state; fields the entry lacks (written by an older
            version) keep their current values.
        rho: The current last-ρ vector.
        law: The current step-law state (``None``: the tuner has none, a saved one is ignored).

    Raises:
        ValueError: If the entry is not a mapping or comes from a newer version.
    """
    if not isinstance(tuner, Mapping) or tuner.get("version", 0) > STATE_VERSION:
        raise ValueError(
            "Unrecognised 'alpha_tuner' state (saved by a newer alpha_tuner?); upgrade alpha_tuner or "
            "drop the 'alpha_tuner' entry to resume with fresh tuner state."
        )
    saved = {k: i for i, k in enumerate(tuner["keys"])}
    here = [i for i, k in enumerate(keys) if k in saved]
    there = [saved[keys[i]] for i in here]
    device = control.log_alpha.device
    dst = torch.tensor(here, dtype=torch.long, device=device)
    src = torch.tensor(there, dtype=torch.long, device=device)

    def merge(state: Any, saved_fields: Mapping[str, Any]) -> dict[str, Tensor]:
        return {
            name: current
            if saved_fields.get(name) is None
            else _merge_rows(current, saved_fields[name], dst, src)
            for name, current in state._asdict().items()
        }

    fields = merge(control, tuner.get("control", {}))
    saved_rho = tuner.get("rho")
    steps = tuner.get("steps")
    schedule = tuner.get("schedule")
    return RestoredState(
        alphas={i: float(tuner["alpha"][j]) for i, j in zip(here, there, strict=True)},
        missing=[k for k in keys if k not in saved],
        control=ControlState(**fields),
        rho=None if saved_rho is None else _merge_rows(rho, saved_rho, dst, src),
        steps=None if steps is None else int(steps),
        phase=int(tuner.get("phase", 0)),
        law=None if law is None else StepState(**merge(law, tuner.get("law") or {})),
        units=None
        if tuner.get("units") is None
        else {i: list(tuner["units"][j]) for i, j in zip(here, there, strict=True)},
        schedule=None
        if not isinstance(schedule, Mapping)
        else (float(schedule["mean"]), str(schedule.get("source", "checkpoint"))),
    )
