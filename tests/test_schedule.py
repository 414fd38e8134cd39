"""The step law reads the LR schedule's mean factor and holds its targets as run means."""

from __future__ import annotations

import copy
import gc
import math
import warnings
from pathlib import Path

import pytest
import torch
from conftest import lm_batch, tiny_llama
from hypothesis import given
from hypothesis import strategies as st
from transformers import (
    Trainer,
    TrainingArguments,
    get_constant_schedule,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
    get_wsd_schedule,
)

from alpha_tuner import AlphaTunedOptimizer, StepLaw, attach
from alpha_tuner.schedule import find_schedulers, lambda_horizon, mean_factor, read_schedule
from alpha_tuner.steplaw import for_schedule, schedule_shift

KW = {"measure_every": 1, "measure_phases": 1, "control_every": 3}


def _param_opt() -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=1e-3)


# ------------------------------------------------------------------------------ pure maths
@given(st.lists(st.floats(-2.0, 3.0), min_size=1, max_size=50))
def test_mean_factor_is_the_mean_of_the_clamped_factors(factors: list[float]) -> None:
    clamped = [max(f, 0.0) for f in factors]
    mean = mean_factor(factors)
    assert min(clamped) - 1e-12 <= mean <= max(clamped) + 1e-12
    assert mean == pytest.approx(sum(clamped) / len(clamped), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("bad", [[], [1.0, math.nan], [math.inf]])
def test_mean_factor_refuses_what_it_cannot_average(bad: list[float]) -> None:
    with pytest.raises(ValueError, match="mean_factor"):
        mean_factor(bad)


@given(st.floats(0.01, 1.0), st.floats(1e-4, 1e-1), st.floats(1e-5, 1e-2))
def test_for_schedule_makes_the_targets_run_means(mean: float, a: float, u: float) -> None:
    law = for_schedule(StepLaw(a_step=a, update=u), mean)
    assert law.a_step * mean == pytest.approx(a) and law.update * mean == pytest.approx(u)
    assert law.schedule_mean == mean
    m, mu = schedule_shift(mean)  # A's step ×1/f̄ (μ) and B's ×1/f̄ (m/μ)
    assert mu == pytest.approx(1 / mean) and m / mu == pytest.approx(1 / mean)


@pytest.mark.parametrize("bad", [0.0, -0.5, math.nan, math.inf])
def test_a_bad_schedule_mean_is_refused_by_name(bad: float) -> None:
    with pytest.raises(ValueError, match="schedule_mean"):
        StepLaw(schedule_mean=bad)


# ------------------------------------------------------------------------ finding schedules
def test_the_trainers_schedules_are_found_and_averaged_over_their_horizon() -> None:
    opt = _param_opt()
    kept = get_cosine_schedule_with_warmup(opt, 60, 600)  # a scheduler nobody holds drives nothing
    shape = read_schedule([opt])
    assert (shape.mean, shape.source) == (0.5, "LambdaLR")  # 10 % warm-up + cosine: exactly ½
    opt = _param_opt()
    scheduler = get_linear_schedule_with_warmup(opt, 0, 4)
    scheduler.state_dict()  # materialises the scheduler's __dict__: found all the same
    assert read_schedule([opt]).mean == pytest.approx((1 + 0.75 + 0.5 + 0.25) / 4)
    opt = _param_opt()
    kept = get_wsd_schedule(opt, num_warmup_steps=0, num_decay_steps=2, num_stable_steps=2, min_lr_ratio=0.0)
    assert lambda_horizon(find_schedulers([opt])[0].lr_lambdas[0]) == 4  # type: ignore[attr-defined]
    opt = _param_opt()
    kept = get_constant_schedule(opt)
    assert read_schedule([opt]) == (1.0, "LambdaLR (constant)")
    assert read_schedule([_param_opt()]) == (1.0, "none")
    del kept
    gc.collect()  # a scheduler keeps itself in a reference cycle until collected
    assert read_schedule([opt]) == (1.0, "none")


def test_a_schedule_it_cannot_evaluate_gives_the_peak_and_says_why() -> None:
    opt = _param_opt()
    kept = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 10)
    assert read_schedule([opt]) == (1.0, "unknown: CosineAnnealingLR is not a LambdaLR")
    opt = _param_opt()
    kept = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 - t / 10)  # noqa: F841
    mean, source = read_schedule([opt])
    assert mean == 1.0 and "names no horizon" in source
    assert read_schedule([opt], total_steps=10).mean == pytest.approx(0.55)


# ------------------------------------------------------------------------------ the engine
def _run(
    law: StepLaw, *, schedule: bool = True, steps: int = 12, **kw: object
) -> tuple[torch.nn.Module, AlphaTunedOptimizer]:
    model = tiny_llama(seed=3).double()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    opt = AlphaTunedOptimizer(inner, model, steps=law, **{**KW, **kw})  # type: ignore[arg-type]
    scheduler = get_linear_schedule_with_warmup(opt, 2, steps) if schedule else None
    for i in range(steps):
        model(**lm_batch(seed=i)).loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        opt.zero_grad()
    return model, opt


def _lora(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for n, p in model.named_parameters() if "lora_" in n]


@pytest.mark.parametrize("adapt", [True, False])
def test_the_read_schedule_runs_as_the_peak_targets_it_implies(adapt: bool) -> None:
    """Linear warm-up + decay over 12 steps has f̄ = ½: the default law runs exactly as a law
    told to hold twice the targets at the peak (the shift is by powers of two, so bit for bit)."""
    model, opt = _run(StepLaw(), adapt=adapt)
    assert opt.engine.law_schedule.shape == (0.5, "LambdaLR")
    assert opt.diagnostics()["law_schedule_mean"] == 0.5
    twice, opt2 = _run(StepLaw(a_step=2e-2, update=6e-4, schedule_mean=1.0), adapt=adapt)
    for x, y in zip(_lora(model), _lora(twice), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert opt.alphas() == opt2.alphas()
    peak, _ = _run(StepLaw(schedule_mean=1.0), adapt=adapt)  # the law before it read schedules
    assert any(not torch.equal(x, y) for x, y in zip(_lora(model), _lora(peak), strict=True))


def test_without_a_scheduler_nothing_changes() -> None:
    model, opt = _run(StepLaw(), schedule=False)
    assert opt.engine.law_schedule.shape == (1.0, "none")
    same, _ = _run(StepLaw(schedule_mean=1.0), schedule=False)
    for x, y in zip(_lora(model), _lora(same), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_a_schedule_it_cannot_read_warns_with_the_fix() -> None:
    model = tiny_llama(seed=3)
    opt = AlphaTunedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-4), model)
    kept = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 10)  # noqa: F841
    model(**lm_batch()).loss.backward()
    with pytest.warns(RuntimeWarning, match=r"StepLaw\(schedule_mean="):
        opt.step()
    assert opt.engine.law_schedule.shape is not None and opt.engine.law_schedule.shape.mean == 1.0


def test_attach_finds_a_schedule_on_the_optimizer_itself() -> None:
    model = tiny_llama(seed=3)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-4)
    handle = attach(inner, model)
    kept = get_cosine_schedule_with_warmup(inner, 1, 10)  # noqa: F841
    model(**lm_batch()).loss.backward()
    inner.step()
    assert handle.engine.law_schedule.shape == (pytest.approx(read_schedule([inner]).mean), "LambdaLR")
    handle.detach()


def test_a_checkpoint_keeps_its_schedule_and_resumes_exactly() -> None:
    """Save after 6 of 12 steps; a fresh wrapper that loads the state continues as the straight
    run did (it does not read the schedule again nor move the layers a second time)."""
    model, opt = _run(StepLaw(), steps=12)
    straight = _lora(model)

    model = tiny_llama(seed=3).double()
    opt = AlphaTunedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0), model, **KW)
    scheduler = get_linear_schedule_with_warmup(opt, 2, 12)
    for i in range(6):
        model(**lm_batch(seed=i)).loss.backward()
        opt.step()
        scheduler.step()
        opt.zero_grad()
    saved = ({k: v.clone() for k, v in model.state_dict().items()}, copy.deepcopy(opt.state_dict()))
    assert saved[1]["alpha_tuner"]["schedule"] == {"mean": 0.5, "source": "LambdaLR"}
    sched_state = scheduler.state_dict()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model2 = tiny_llama(seed=3).double()
        opt2 = AlphaTunedOptimizer(
            torch.optim.AdamW(model2.parameters(), lr=1e-4, weight_decay=0.0), model2, **KW
        )
    scheduler2 = get_linear_schedule_with_warmup(opt2, 2, 12)  # the Trainer's order of resuming
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    scheduler2.load_state_dict(sched_state)
    for i in range(6, 12):
        model2(**lm_batch(seed=i)).loss.backward()
        opt2.step()
        scheduler2.step()
        opt2.zero_grad()
    for x, y in zip(straight, _lora(model2), strict=True):
        torch.testing.assert_close(y, x, rtol=0, atol=0)


def test_the_trainer_path_reads_its_own_schedule(tmp_path: Path) -> None:
    """``Trainer(optimizers=(opt, None))`` makes its scheduler after the optimizer: the law reads
    it at the first step, and the schedule still sets every step's LR as configured."""
    model = tiny_llama()
    opt = AlphaTunedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model)
    rows = [{"input_ids": torch.arange(12) % 64, "labels": torch.arange(12) % 64} for _ in range(16)]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=2, lr_scheduler_type="cosine",
        warmup_steps=2, save_strategy="no", use_cpu=True, report_to=[], disable_tqdm=True,
        logging_steps=1, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=rows, optimizers=(opt, None))
    trainer.train()
    expected = mean_factor([trainer.lr_scheduler.lr_lambdas[0](t) for t in range(8)])  # type: ignore[attr-defined]
    assert opt.engine.law_schedule.shape == (pytest.approx(expected), "LambdaLR")
    assert 0.3 < expected < 0.7
    lrs = [r["learning_rate"] for r in trainer.state.log_history if "learning_rate" in r]
    assert lrs[0] == pytest.approx(1e-3 * trainer.lr_scheduler.lr_lambdas[0](0))  # type: ignore[attr-defined]


def test_a_warm_up_then_constant_schedule_is_averaged_over_the_trainers_max_steps(tmp_path: Path) -> None:
    """``constant_with_warmup`` names no horizon; AlphaTunerCallback tells the law the run's length
    (the Trainer's ``max_steps``), so the mean covers the warm-up too. Without the callback the law
    warns and keeps the peak (f̄ = 1)."""
    from alpha_tuner import AlphaTunerCallback

    def train(callbacks: list[object]) -> AlphaTunedOptimizer:
        model = tiny_llama()
        opt = AlphaTunedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model)
        rows = [{"input_ids": torch.arange(12) % 64, "labels": torch.arange(12) % 64} for _ in range(16)]
        args = TrainingArguments(
            output_dir=str(tmp_path), max_steps=10, per_device_train_batch_size=2,
            lr_scheduler_type="constant_with_warmup", warmup_steps=4, save_strategy="no", use_cpu=True,
            report_to=[], disable_tqdm=True, dataloader_num_workers=0,
        )  # fmt: skip
        kw = {"train_dataset": rows, "optimizers": (opt, None), "callbacks": callbacks}
        trainer = Trainer(model=model, args=args, **kw)
        trainer.train()
        return opt

    told = train([AlphaTunerCallback()])
    assert told.engine.law_schedule.run_length == 10
    assert told.engine.law_schedule.shape == (
        pytest.approx(mean_factor([0, 0.25, 0.5, 0.75] + [1.0] * 6)),
        "LambdaLR",
    )
    with pytest.warns(RuntimeWarning, match="names no horizon"):
        untold = train([])
    assert untold.engine.law_schedule.shape is not None and untold.engine.law_schedule.shape.mean == 1.0
