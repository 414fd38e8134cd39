"""The Trainer callback and the telemetry read-out (alpha_tuner.integrations)."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import lm_batch, tiny_llama
from test_trainer import EAGER, LR, rows, trainer_args, wrap
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback

from alpha_tuner import AlphaTunedOptimizer
from alpha_tuner.integrations import (
    AlphaTunerCallback,
    collect_metrics,
    find_alpha_tuned_optimizer,
    history_from_log_history,
)

pytestmark = pytest.mark.usefixtures("one_thread")

SUMMARY = {
    "alpha/mean": "alpha_mean",
    "alpha/min": "alpha_min",
    "alpha/max": "alpha_max",
    "rho/mean": "rho_mean",
    "rho/min": "rho_min",
    "rho/max": "rho_max",
    "alpha/backoffs": "backoffs",
    "alpha/measurements": "measurements",
    "alpha/skipped": "skipped",
}


class Recorder(TrainerCallback):
    """Stands where the reporting integrations (TensorBoard, W&B) stand: before user callbacks."""

    def __init__(self) -> None:
        self.logs: list[dict[str, float]] = []

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        self.logs.append(dict(logs or {}))


def _train(opt: AlphaTunedOptimizer, steps: int) -> None:
    for i in range(steps):
        opt.model(**lm_batch(seed=i)).loss.backward()
        opt.step()
        opt.zero_grad()


# ------------------------------------------------------------------------ collect_metrics
def test_collect_metrics_agrees_with_diagnostics_and_per_layer_readouts() -> None:
    model = tiny_llama()
    opt = wrap(model, **EAGER)
    _train(opt, 4)
    metrics = collect_metrics(opt, per_layer=True)
    diag = opt.diagnostics()
    assert diag["backoffs"] > 0, "the run must exercise the counters"
    for key, name in SUMMARY.items():
        # diagnostics() averages ρ in float32, collect_metrics in float64 on the host.
        assert metrics[key] == pytest.approx(diag[name], rel=1e-6), key
    for name, alpha in opt.alphas().items():
        assert metrics["alpha/" + name.removeprefix("base_model.model.")] == alpha
    for name, rho in opt.drift_ratios().items():
        assert metrics["rho/" + name.removeprefix("base_model.model.")] == pytest.approx(rho, rel=1e-7)
    assert len(metrics) == len(SUMMARY) + 2 * len(opt.alphas())
    assert all(isinstance(v, float) for v in metrics.values())


def test_collect_metrics_before_any_measurement_and_without_measuring() -> None:
    model = tiny_llama()
    opt = wrap(model)
    before = collect_metrics(opt, per_layer=True)
    assert not any(k.startswith("rho/") for k in before)
    assert before["alpha/measurements"] == 0.0
    assert before["alpha/mean"] == pytest.approx(sum(opt.alphas().values()) / len(opt.alphas()))

    quiet = wrap(tiny_llama(), adapt=False, measure=False)
    _train(quiet, 2)
    assert not any(k.startswith("rho/") for k in collect_metrics(quiet))


def test_collect_metrics_skips_non_finite_rho_in_the_summary() -> None:
    model = tiny_llama()
    opt = wrap(model, measure_every=1, measure_phases=1)
    _train(opt, 1)
    model(**lm_batch(seed=1)).loss.backward()
    next(p for n, p in model.named_parameters() if "lora_B" in n).grad.fill_(float("nan"))
    opt.step()  # a NaN step: that layer's ρ is not finite
    metrics = collect_metrics(opt, per_layer=True)
    rho = [v for k, v in metrics.items() if k.startswith("rho/") and k.count("/") == 1 and "." in k]
    assert any(not math.isfinite(v) for v in rho)
    finite = [v for v in rho if math.isfinite(v)]
    assert metrics["rho/max"] == max(finite) and math.isfinite(metrics["rho/mean"])
    assert metrics["alpha/skipped"] >= 1


def test_find_alpha_tuned_optimizer_unwraps_wrappers() -> None:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    model = tiny_llama()
    opt = wrap(model)
    assert find_alpha_tuned_optimizer(opt) is opt
    try:
        prepared = Accelerator(cpu=True).prepare_optimizer(opt)
        assert prepared is not opt
        assert find_alpha_tuned_optimizer(prepared) is opt
        assert collect_metrics(prepared) == collect_metrics(opt)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    assert find_alpha_tuned_optimizer(opt.optimizer) is None  # the bare inner AdamW
    assert find_alpha_tuned_optimizer(None) is None
    with pytest.raises(TypeError, match="No AlphaTunedOptimizer"):
        collect_metrics(torch.optim.AdamW(model.parameters(), lr=LR))


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_callback_rejects_bad_per_layer_every(bad: object) -> None:
    with pytest.raises(ValueError, match="per_layer_every"):
        AlphaTunerCallback(per_layer_every=bad)  # type: ignore[arg-type]


# ------------------------------------------------------------------------- in a Trainer
def test_callback_logs_alpha_and_rho_next_to_the_loss(tmp_path: Path) -> None:
    model = tiny_llama()
    opt = wrap(model, **EAGER)
    recorder, callback = Recorder(), AlphaTunerCallback(per_layer_every=2)
    trainer = Trainer(
        model=model,
        args=trainer_args(tmp_path, max_steps=4),
        train_dataset=rows(),
        optimizers=(opt, None),
        callbacks=[recorder, callback],
    )
    # It moved ahead of the callback that stands for TensorBoard/W&B.
    order = trainer.callback_handler.callbacks
    assert isinstance(order[0], DefaultFlowCallback) and order[1] is callback
    trainer.train()

    train_logs = [log for log in recorder.logs if "loss" in log]
    assert len(train_logs) == 4
    for i, log in enumerate(train_logs):
        assert set(SUMMARY) <= log.keys()
        per_layer = [k for k in log if k.startswith("alpha/") and "layers." in k]
        assert len(per_layer) == (12 if i % 2 == 0 else 0), i
    summary = next(log for log in recorder.logs if "train_runtime" in log)
    assert not any(k.startswith(("alpha/", "rho/")) for k in summary)
    # The last log shows the state after the last step.
    final = collect_metrics(opt)
    assert train_logs[-1]["alpha/mean"] == final["alpha/mean"] < train_logs[0]["alpha/mean"]
    assert train_logs[-1]["alpha/backoffs"] == final["alpha/backoffs"] > 0
    # The same values reach log_history (trainer_state.json) and the callback's history.
    assert [e["step"] for e in callback.history] == [1.0, 2.0, 3.0, 4.0]
    from_state = history_from_log_history(trainer.state.log_history)
    keys = {*SUMMARY, "step", "loss", "learning_rate", "grad_norm"}
    assert [{k: v for k, v in e.items() if k in keys} for e in from_state] == [
        {k: v for k, v in e.items() if k in keys} for e in callback.history
    ]
    for entry, log in zip(callback.history, train_logs, strict=True):
        assert (entry["loss"], entry["learning_rate"], entry["grad_norm"]) == (
            log["loss"],
            log["learning_rate"],
            log["grad_norm"],
        )
    # The history keeps every layer at every log (same transfer), whatever per_layer_every says.
    assert all(sum(k.startswith("rho/model.") for k in e) == 12 for e in callback.history)


def test_callback_attach_and_add_callback_after_construction(tmp_path: Path) -> None:
    model = tiny_llama()
    opt = wrap(model, **EAGER)
    recorder = Recorder()
    trainer = Trainer(
        model=model,
        args=trainer_args(tmp_path, max_steps=2),
        train_dataset=rows(),
        optimizers=(opt, None),
        callbacks=[recorder],
    )
    added = AlphaTunerCallback()
    trainer.add_callback(added)  # appended last: moves itself when training begins
    assert trainer.callback_handler.callbacks[-1] is added
    trainer.train()
    assert trainer.callback_handler.callbacks[1] is added
    assert "alpha/mean" in recorder.logs[1]  # the second log, after the move, reaches the recorder
    assert len(added.history) == 2

    explicit = AlphaTunerCallback().attach(trainer)
    assert trainer.callback_handler.callbacks[1] is explicit


def test_callback_without_alpha_tuned_optimizer_warns_and_logs_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = tiny_llama()
    callback = AlphaTunerCallback()
    trainer = Trainer(
        model=model,
        args=trainer_args(tmp_path, max_steps=2),
        train_dataset=rows(),
        optimizers=(torch.optim.AdamW(model.parameters(), lr=LR), None),
        callbacks=[callback],
    )
    with caplog.at_level(logging.WARNING, logger="alpha_tuner.integrations.transformers"):
        trainer.train()
    assert sum("found no AlphaTunedOptimizer" in r.message for r in caplog.records) == 1
    assert callback.history == []
    assert not any("alpha/mean" in r for r in trainer.state.log_history)


def test_callback_warns_when_deepspeed_is_configured(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = tiny_llama()
    opt = wrap(model)
    args = trainer_args(tmp_path)
    callback = AlphaTunerCallback()
    handler = CallbackHandler([DefaultFlowCallback(), callback], model, None, opt, None)
    with caplog.at_level(logging.WARNING, logger="alpha_tuner.integrations.transformers"):
        handler.on_train_begin(args, TrainerState(), TrainerControl())
        assert not any("DeepSpeed" in r.message for r in caplog.records)
        args.deepspeed = {"zero_optimization": {"stage": 2}}
        handler.on_train_begin(args, TrainerState(), TrainerControl())
        assert sum("DeepSpeed is enabled" in r.message for r in caplog.records) == 1
        # A static α, set once at construction, is fine under DeepSpeed: no warning.
        static = wrap(tiny_llama(), adapt=False)
        quiet = CallbackHandler([DefaultFlowCallback(), AlphaTunerCallback()], model, None, static, None)
        quiet.on_train_begin(args, TrainerState(), TrainerControl())
    assert sum("DeepSpeed is enabled" in r.message for r in caplog.records) == 1


def test_tuner_follows_swapped_parameters_and_warns_when_the_optimizer_does_not(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """What Accelerate's FSDP2 prepare does: new Parameter objects in the model and the groups."""
    model = tiny_llama()
    opt = wrap(model)
    callback = AlphaTunerCallback()
    handler = CallbackHandler([DefaultFlowCallback(), callback], model, None, opt, None)
    args = trainer_args(tmp_path)

    def swap(groups_too: bool) -> dict[int, torch.nn.Parameter]:
        mapping = {}
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.weight.requires_grad:
                new = torch.nn.Parameter(module.weight.detach().clone())
                mapping[id(module.weight)] = new
                module.weight = new
        if groups_too:
            for group in opt.param_groups:
                group["params"] = [mapping.get(id(p), p) for p in group["params"]]
        return mapping

    with caplog.at_level(logging.WARNING, logger="alpha_tuner.integrations.transformers"):
        handler.on_train_begin(args, TrainerState(), TrainerControl())
        mapping = swap(groups_too=True)
        handler.on_train_begin(args, TrainerState(), TrainerControl())
        assert not any("not the parameters" in r.message for r in caplog.records)
        # the tuner acts on the live parameters: a rescale changes the new B, not the old one
        target = opt.targets[0]
        assert any(target.weight_b is p for p in mapping.values())
        swap(groups_too=False)  # the model moved on, the optimizer did not
        handler.on_train_begin(args, TrainerState(), TrainerControl())
    assert sum("not the parameters" in r.message for r in caplog.records) == 1


def test_integrations_import_transformers_lazily() -> None:
    # (The lazy attribute access itself is what every other test here goes through.)
    code = "import sys, alpha_tuner.integrations; assert 'transformers' not in sys.modules"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
