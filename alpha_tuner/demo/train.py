"""The shared train/eval loop: one configuration in, one JSON-able record out.

Every method runs through :func:`run`: the same seeded model copy, the same batches (set by
the seed), the same held-out examples, constant learning rate, no gradient clipping. Every
``measure_every`` steps the record gets the layers' mean α and mean drift ratio ρ (peers are
measured by a non-adapting wrapper that does not change their training).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from . import assets
from .data import (
    Encoder,
    Example,
    batches,
    encode_causal_lm,
    encode_classification,
    load_reviews,
    split_examples,
    synthetic_sentiment,
)
from .models import BaseModel, attach_lora, build_optimizer

__all__ = ["RunConfig", "Task", "evaluate", "make_task", "run"]


@dataclass(frozen=True)
class RunConfig:
    """One training run. ``alpha=None`` means the method's own α (see :mod:`.models`)."""

    model: str
    method: str
    rank: int
    lr: float
    seed: int
    steps: int
    batch_size: int = 8
    alpha: float | None = None
    eval_size: int = 512
    eval_every: int = 0
    tag: str = ""

    def key(self) -> str:
        """A stable identifier of the configuration (the resume key of sweep files).

        ``tag`` distinguishes runs whose method depends on library constants (AlphaTuned's
        principled rule), so a run made under other constants is not mistaken for this one.
        """
        alpha = "default" if self.alpha is None else f"{self.alpha:.6g}"
        return (
            f"{self.model}|{self.method}|r={self.rank}|alpha={alpha}|lr={self.lr:.6g}|seed={self.seed}"
            f"|steps={self.steps}|bs={self.batch_size}|eval={self.eval_size}"
            + (f"|{self.tag}" if self.tag else "")
        )

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict."""
        return asdict(self)


@dataclass
class Task:
    """Examples and how to encode them; ``kind`` decides what accuracy means."""

    kind: str
    train: list[Example]
    held_out: list[Example]
    encode: Encoder


def make_task(base: BaseModel, eval_size: int) -> Task:
    """The task of a base model: review sentiment (or review text for causal LMs).

    The ``tiny`` test model gets generated snippets instead, so it needs no assets.
    """
    if base.spec.name == "tiny":
        examples = synthetic_sentiment(2000, seed=0)
    else:
        examples = load_reviews(assets.reviews_path())
    split = split_examples(examples, eval_size)
    if base.spec.task == "classification":
        encode = encode_classification(base.tokenizer, base.spec.max_length)
    else:
        encode = encode_causal_lm(base.tokenizer, base.spec.max_length)
    return Task(base.spec.task, split.train, split.held_out, encode)


@torch.no_grad()
def evaluate(
    model: nn.Module, task: Task, *, batch_size: int = 64, device: str = "cpu"
) -> tuple[float, float]:
    """Mean loss and accuracy on the held-out examples.

    Classification: mean cross-entropy per example and accuracy. Causal LM: mean next-token
    cross-entropy per token and top-1 next-token accuracy.
    """
    was_training = model.training
    model.eval()
    loss_sum = correct = count = 0.0
    for i in range(0, len(task.held_out), batch_size):
        batch = {k: v.to(device) for k, v in task.encode(task.held_out[i : i + batch_size]).items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        if task.kind == "classification":
            loss_sum += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
            correct += float((logits.argmax(-1) == labels).sum())
            count += labels.numel()
        else:
            logits, labels = logits[:, :-1], labels[:, 1:]
            mask = labels != -100
            loss_sum += float(torch.nn.functional.cross_entropy(logits[mask], labels[mask], reduction="sum"))
            correct += float((logits.argmax(-1)[mask] == labels[mask]).sum())
            count += float(mask.sum())
    model.train(was_training)
    return loss_sum / max(count, 1.0), correct / max(count, 1.0)


def run(
    config: RunConfig,
    base: BaseModel,
    task: Task,
    *,
    measure_every: int = 10,
    on_step: Callable[[int, float], None] | None = None,
    device: str = "cpu",
    tuner_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train one configuration and return its record.

    The record holds the config, final held-out loss and accuracy, wall time, whether
    training diverged (a non-finite loss stops the run), the training-loss curve (mean per
    ``measure_every`` steps), the held-out curve (every ``eval_every`` steps when > 0) and the
    α/ρ trajectory (layer means per measurement). ``tuner_options`` go to the AlphaTuned
    wrapper (see :func:`.models.build_optimizer`); a record made with them should carry a
    ``tag`` that names them.
    """
    torch.manual_seed(config.seed)
    model = attach_lora(base, config.method, config.rank, alpha=config.alpha, seed=config.seed).to(device)
    model.train()
    optimizer, tuner = build_optimizer(
        model, config.method, config.lr, measure_every=measure_every, tuner_options=tuner_options
    )
    alpha_start = _mean(tuner.alphas().values()) if tuner is not None else float("nan")
    curve: list[list[float]] = []
    evals: list[list[float]] = []
    telemetry: list[list[float]] = []
    window: list[float] = []
    diverged = False
    start = time.perf_counter()
    for step, batch in enumerate(batches(task.train, config.batch_size, config.steps, seed=config.seed), 1):
        loss = model(**{k: v.to(device) for k, v in task.encode(batch).items()}).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        if not math.isfinite(value):
            diverged = True
            break
        window.append(value)
        if on_step is not None:
            on_step(step, value)
        if step % measure_every == 0 or step == config.steps:
            curve.append([step, sum(window) / len(window)])
            window = []
            if tuner is not None:
                rho = [r for r in tuner.drift_ratios().values() if math.isfinite(r)]
                telemetry.append([step, _mean(tuner.alphas().values()), _mean(rho)])
        if config.eval_every and step % config.eval_every == 0 and step < config.steps:
            evals.append([step, *evaluate(model, task, device=device)])
    train_s = time.perf_counter() - start
    eval_loss, eval_acc = (float("nan"), float("nan")) if diverged else evaluate(model, task, device=device)
    if not diverged:
        evals.append([config.steps, eval_loss, eval_acc])
    rho_late = [t[2] for t in telemetry[len(telemetry) // 2 :] if math.isfinite(t[2])]
    return {
        "key": config.key(),
        "config": config.to_dict(),
        "eval_loss": eval_loss,
        "eval_accuracy": eval_acc,
        "diverged": diverged or not math.isfinite(eval_loss),
        "alpha_start": alpha_start,
        "alpha_end": _mean(tuner.alphas().values()) if tuner is not None else float("nan"),
        "rho_mean": _mean(rho_late),
        "train_s": train_s,
        "wall_s": time.perf_counter() - start,
        "train_curve": curve,
        "eval_curve": evals,
        "telemetry": telemetry,
    }


def _mean(values: Sequence[float] | Any) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")
