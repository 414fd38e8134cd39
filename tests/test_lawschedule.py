"""LawSchedule: the law in force for a schedule's shape, its restore rules and each step's factor."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from alpha_tuner.lawschedule import LawSchedule
from alpha_tuner.schedule import ScheduleShape
from alpha_tuner.steplaw import StepLaw, for_schedule

CPU = torch.device("cpu")


def _groups(lr_other: object = 5e-3, lr_lora: object = 1e-3) -> tuple[torch.optim.Optimizer, set[int]]:
    """An optimizer whose first group holds no LoRA factor and whose second does."""
    other, lora = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW(
        [{"params": [other], "lr": lr_other}, {"params": [lora], "lr": lr_lora}], fused=True
    )  # fmt: skip
    return opt, {id(lora)}


def test_the_factor_is_read_from_the_first_group_holding_lora_factors() -> None:
    opt, ids = _groups()
    sched = LawSchedule(opt, StepLaw(), ids, CPU)
    assert sched.group_index() == 1
    assert sched.factor() == 1.0  # no scheduler: initial_lr absent, lr / lr
    opt.param_groups[1]["initial_lr"] = 2e-3
    opt.param_groups[0]["initial_lr"] = 1e-3  # the other group's schedule is not the law's
    assert sched.factor() == pytest.approx(0.5)
    opt.param_groups[1]["initial_lr"] = 0.0  # a zero peak: a factor the law skips
    assert sched.factor() == 0.0
    assert LawSchedule(opt, StepLaw(), set(), CPU).factor() == 1.0  # no LoRA group at all


def test_a_tensor_lr_gives_a_device_tensor_factor() -> None:
    opt, ids = _groups(lr_lora=torch.tensor(1e-3))
    opt.param_groups[1]["initial_lr"] = torch.tensor(4e-3)
    factor = LawSchedule(opt, StepLaw(), ids, CPU).factor()
    assert isinstance(factor, torch.Tensor) and factor.dim() == 0 and factor.device == CPU
    torch.testing.assert_close(factor, torch.tensor(0.25))
    opt.param_groups[1]["initial_lr"] = 2e-3  # a host initial LR with a tensor LR: still a tensor
    factor = LawSchedule(opt, StepLaw(), ids, CPU).factor()
    assert isinstance(factor, torch.Tensor)
    torch.testing.assert_close(factor, torch.tensor(0.5))


def test_the_law_in_force_follows_the_shape() -> None:
    opt, ids = _groups()
    law = StepLaw()
    sched = LawSchedule(opt, law, ids, CPU)
    assert sched.shape is None and sched.law is law
    sched.use(ScheduleShape(0.5, "LambdaLR"))
    assert sched.law == for_schedule(law, 0.5) and sched.given is law
    given = LawSchedule(opt, StepLaw(schedule_mean=0.25), ids, CPU)  # a shape the user gave
    assert given.shape == (0.25, "given") and given.law == for_schedule(StepLaw(schedule_mean=0.25), 0.25)


def test_a_read_without_a_scheduler_is_the_constant_lr() -> None:
    opt, ids = _groups()
    sched = LawSchedule(opt, StepLaw(), ids, CPU)
    assert sched.read() == (1.0, "none")
    assert sched.law == for_schedule(StepLaw(), 1.0)


@pytest.mark.parametrize(
    ("saved", "resumed", "expected"),
    [
        (None, False, None),  # a fresh entry: read at the first step as usual
        (None, True, (1.0, "checkpoint")),  # resumed from before schedules were read: the peak
        ((0.5, "LambdaLR"), True, (0.5, "LambdaLR")),
        ((0.5, "LambdaLR"), False, (0.5, "LambdaLR")),
    ],
)
def test_restore(saved: tuple[float, str] | None, resumed: bool, expected: tuple[float, str] | None) -> None:
    opt, ids = _groups()
    sched = LawSchedule(opt, StepLaw(), ids, CPU)
    sched.restore(saved, resumed=resumed)
    assert sched.shape == expected
    if expected is not None:
        assert sched.law == for_schedule(StepLaw(), expected[0])


def test_without_the_law_nothing_is_held() -> None:
    opt, ids = _groups()
    sched = LawSchedule(opt, None, ids, CPU)
    sched.restore((0.5, "LambdaLR"), resumed=True)
    assert sched.shape is None and sched.law is None
    with pytest.raises(RuntimeError, match="needs a step law"):
        sched.use(ScheduleShape(0.5, "LambdaLR"))
    assert math.isclose(sched.factor(), 1.0)  # type: ignore[arg-type]


def test_the_group_is_found_again_when_a_group_is_added() -> None:
    """The lookup is kept between steps, and redone when the optimizer's groups change."""
    other, lora = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([other], lr=1e-3)
    sched = LawSchedule(opt, StepLaw(), {id(lora)}, CPU)
    assert sched.group_index() is None and sched.factor() == 1.0
    opt.add_param_group({"params": [lora], "lr": 1e-3, "initial_lr": 4e-3})
    assert sched.group_index() == 1 and sched.factor() == pytest.approx(0.25)
