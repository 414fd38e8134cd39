"""Hugging Face ``Trainer`` integration: α and ρ next to the loss in every log.

:class:`AlphaTunerCallback` adds the tuner's telemetry to the dict the Trainer logs, so it
appears in the console, in ``trainer.state.log_history`` (hence ``trainer_state.json``) and in
every reporting integration (TensorBoard, W&B, MLflow, ...)::

    trainer = Trainer(..., optimizers=(opt, None), callbacks=[AlphaTunerCallback()])

:func:`collect_metrics` is the read-out itself, for loops without a Trainer (Accelerate's
``accelerator.log``, a plain ``SummaryWriter``).

Keys (α in the model's own PEFT convention, ρ the drift ratio of the last measurement):

- ``alpha/mean``, ``alpha/min``, ``alpha/max``: α over the tuned LoRA layers;
- ``rho/mean``, ``rho/min``, ``rho/max``: the finite ρ of the last measurement (absent before
  the first one, or when not measuring);
- ``alpha/backoffs``: control steps that lowered some layer's α, summed over layers;
- ``alpha/measurements``, ``alpha/skipped``: valid and skipped (non-finite) ρ measurements,
  summed over layers;
- ``alpha/<layer>``, ``rho/<layer>``: per layer (``per_layer=True``; in the callback, on
  per-layer logging steps only).

One logging step costs one device→host transfer: the per-layer ρ and the counters are stacked
on the device and read together; α is a host-side float already (PEFT keeps its scalings as
floats). Nothing is read between logging steps.
"""

from __future__ import annotations

import logging
import os
import sys
from types import FrameType
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback

from ..attach import AttachedTuner, attach_to_trainer
from ..optimizer import AlphaTunedOptimizer
from .metrics import (
    _CONTEXT_KEYS,
    _MAX_UNWRAP,
    _SUMMARY_KEYS,
    collect_metrics,
    find_alpha_tuned_optimizer,
    history_from_log_history,
)

__all__ = [
    "AlphaTunerCallback",
    "attach_to_trainer",
    "collect_metrics",
    "find_alpha_tuned_optimizer",
    "history_from_log_history",
]

logger = logging.getLogger(__name__)

#: Accelerate's stand-ins for an optimizer that DeepSpeed owns.
_DEEPSPEED_WRAPPERS = ("DeepSpeedOptimizerWrapper", "DummyOptim")


def _uses_deepspeed(args: TrainingArguments, optimizer: object) -> bool:
    if getattr(args, "deepspeed", None):
        return True
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        return True
    current = optimizer
    for _ in range(_MAX_UNWRAP):
        if current is None or isinstance(current, AlphaTunedOptimizer):
            return False
        kind = type(current)
        if kind.__module__.split(".")[0] == "deepspeed" or kind.__name__ in _DEEPSPEED_WRAPPERS:
            return True
        current = getattr(current, "optimizer", None)
    return False


def _swapped_parameters(tuner: AlphaTunedOptimizer | AttachedTuner) -> bool:
    """Whether some live LoRA factor of the model is not among the optimizer's parameters."""
    live = {id(p) for group in tuner.param_groups for p in group["params"]}
    return any(id(t.weight_a) not in live or id(t.weight_b) not in live for t in tuner.targets)


def _calling_handler() -> CallbackHandler | None:
    """The ``CallbackHandler`` whose event is calling the current hook, if it can be found."""
    frame: FrameType | None = sys._getframe(2)  # 0: this function, 1: the hook, 2: call_event
    for _ in range(3):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, CallbackHandler):
            return owner
        frame = frame.f_back
    return None


class AlphaTunerCallback(TrainerCallback):
    """Log the tuned α and the drift ratio ρ with every training log of a ``Trainer``.

    On each training log (a log that carries ``"loss"``) it reads the tuner once
    (:func:`collect_metrics`, one device transfer), adds the summary to the logs dict and to
    the matching entry of ``state.log_history``, and appends summary and per-layer values to
    :attr:`history`. Every ``per_layer_every`` training logs the logs get each layer's α and ρ
    too (off by default: a large model has hundreds of LoRA layers).

    Reporting integrations (TensorBoard, W&B, ...) come before user callbacks in the Trainer's
    list, so they would see a log before this callback could add to it; when the Trainer
    starts (or is built), this callback moves itself to just after ``DefaultFlowCallback``.
    Where that is not possible it says so, and :meth:`attach` does the same explicitly.

    Args:
        per_layer_every: Add per-layer ``alpha/<layer>`` and ``rho/<layer>`` keys every this
            many training logs (``0``: never). The first training log counts as the first.
        history: Keep the values of every training log in :attr:`history`, for plotting.

    Attributes:
        history: One dict per training log: ``step``; ``loss``, ``learning_rate`` and
            ``grad_norm`` when logged; the summary and the per-layer ``alpha/<layer>`` and
            ``rho/<layer>`` values.

    Raises:
        ValueError: If ``per_layer_every`` is not a non-negative integer.

    Example:
        >>> trainer = Trainer(..., optimizers=(opt, None), callbacks=[AlphaTunerCallback()])  # doctest: +SKIP
    """

    def __init__(self, *, per_layer_every: int = 0, history: bool = True) -> None:
        if isinstance(per_layer_every, bool) or not isinstance(per_layer_every, int) or per_layer_every < 0:
            raise ValueError(
                "per_layer_every must be an integer >= 0 (0 turns per-layer logging off), "
                f"got {per_layer_every!r}."
            )
        self.per_layer_every = per_layer_every
        self.keep_history = bool(history)
        self.history: list[dict[str, float]] = []
        self._logs_seen = 0
        self._placed = False
        self._warned_missing = False

    # ------------------------------------------------------------------------ placement
    def attach(self, trainer: Any) -> AlphaTunerCallback:
        """Add this callback to ``trainer`` ahead of its reporting integrations.

        Args:
            trainer: A ``transformers.Trainer`` (or subclass, e.g. TRL's ``SFTTrainer``).

        Returns:
            This callback.
        """
        self._place(trainer.callback_handler)
        return self

    def _place(self, handler: CallbackHandler) -> None:
        callbacks = handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        # Moving an element earlier keeps an ongoing `for callback in callbacks` loop intact:
        # the entries after its old position do not move.
        flow = [i for i, cb in enumerate(callbacks) if isinstance(cb, DefaultFlowCallback)]
        callbacks.insert(flow[0] + 1 if flow else 0, self)
        self._placed = True

    def _place_from_event(self) -> None:
        if self._placed:
            return
        handler = _calling_handler()
        if handler is None:
            logger.warning(
                "AlphaTunerCallback could not move itself ahead of the reporting integrations; α and ρ still "
                "reach the console and trainer.state.log_history. Use AlphaTunerCallback().attach(trainer) "
                "to log them to TensorBoard/W&B as well."
            )
            self._placed = True
            return
        self._place(handler)

    # ---------------------------------------------------------------------------- events
    def on_init_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Move ahead of the reporting integrations."""
        self._place_from_event()

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Check placement, tell the tuner the run's length, and warn where the Trainer runs
        without the tuner."""
        self._place_from_event()
        optimizer = kwargs.get("optimizer")
        tuner = find_alpha_tuned_optimizer(optimizer)
        # A static α (adapt=False, measure=False) is set once at construction and needs nothing later.
        dynamic = tuner is None or tuner.adapt or tuner.measuring
        if dynamic and _uses_deepspeed(args, optimizer):
            logger.warning(
                "DeepSpeed is enabled: DeepSpeed either replaces the optimizer (an 'optimizer' block in its "
                "config) or steps fp32 master copies of the parameters (ZeRO, bf16), so AlphaTunedOptimizer "
                "cannot measure or rescale the LoRA factors. Train without DeepSpeed (single device, DDP), "
                "or set alpha once at construction: AlphaTunedOptimizer(..., adapt=False)."
            )
        if tuner is not None and state.max_steps and state.max_steps > 0:
            # The run's length: the horizon of an LR schedule that names none (warm-up then constant).
            tuner.engine.law_schedule.run_length = int(state.max_steps)
        if tuner is None:
            self._warn_missing(optimizer)
        elif dynamic and _swapped_parameters(tuner):
            logger.warning(
                "The model's LoRA factors are not the parameters that AlphaTunedOptimizer's inner optimizer "
                "updates: they were replaced after the optimizer was built and its param groups were not "
                "updated, so the optimizer trains stale tensors. Build the optimizer after the model is "
                "sharded or moved (README, Multi-GPU)."
            )

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        """Add α and ρ to a training log (one device transfer)."""
        if logs is None or "loss" not in logs:
            return  # evaluation logs and the end-of-training summary
        optimizer = kwargs.get("optimizer")
        if find_alpha_tuned_optimizer(optimizer) is None:
            self._warn_missing(optimizer)
            return
        self._logs_seen += 1
        per_layer = self.per_layer_every > 0 and (self._logs_seen - 1) % self.per_layer_every == 0
        # The per-layer values come with the same transfer; only the logs are spared them.
        metrics = collect_metrics(optimizer, per_layer=True)
        logged = metrics if per_layer else {k: v for k, v in metrics.items() if k in _SUMMARY_KEYS}
        logs.update(logged)
        # Trainer.log appends a copy of the logs to log_history before calling callbacks.
        if state.log_history:
            record = state.log_history[-1]
            if record.get("step") == state.global_step and record.get("loss") == logs["loss"]:
                record.update(logged)
        if self.keep_history:
            entry: dict[str, float] = {"step": float(state.global_step)}
            for key in _CONTEXT_KEYS:
                if isinstance(logs.get(key), (int, float)):
                    entry[key] = float(logs[key])
            entry.update(metrics)
            self.history.append(entry)

    def _warn_missing(self, optimizer: object) -> None:
        if not self._warned_missing:
            self._warned_missing = True
            logger.warning(
                "AlphaTunerCallback found no AlphaTunedOptimizer in the Trainer's optimizer (%s) and logs "
                "nothing. Pass optimizers=(AlphaTunedOptimizer(AdamW(model.parameters(), lr=...), model), "
                "None) or optimizer_cls_and_kwargs=(create_alpha_tuned_optimizer, {...}).",
                type(optimizer).__name__,
            )
