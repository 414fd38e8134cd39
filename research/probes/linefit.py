"""How far along its own step would the loss keep falling? A line fit of the loss along a step.

A step ``Δₜ`` of every trainable parameter (LoRA factors and head) is a direction; the loss along
it, ``f(k) = L(θₜ + k·Δₜ)``, read at ``k = 0, 1, 2`` on one fixed minibatch and fitted by a
parabola, gives the multiple ``k* = −f'(0) / f''`` of the step that the parabola puts at its
minimum. ``k* ≈ 1``: the step was about the size this batch's loss wants along it; ``k* ≫ 1``:
the loss would have kept falling (a stochastic line search, as in Vaswani et al. 2019, would
lengthen the step); ``k* < 1``: it overshot. Read on two batches:

- ``same``: the step's own minibatch (which pulled the step, so ``k*`` leans long);
- ``next``: the following minibatch, which the step never saw (an unbiased sample of the
  expected loss along the step, and noisier).

The model is read in eval mode (no dropout) under ``no_grad``; the factors are put back before
the run goes on, so the run itself is not changed (its held-out loss equals the benchmark's
record of the same run). Every ``--every`` steps (at steps 5, 15, …, away from the law's control
steps) the probe keeps the parameters before the optimizer step and the minibatch the step was
taken on; before the next step it reads ``f`` on both batches. A sample where a control step
rescaled the factors in between (the law's α moved) is dropped.

Usage::

    python -m research.probes.linefit --model debates --rank 8 --seeds 0 --lr 1e-4
    python -m research.probes.linefit --model minilm --steps 150 --schedule constant --warmup 0 \
        --rank 16 --seeds 0
    python -m research.probes.linefit --report   # benchmarks/results/linefit.md
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import torch

from research.probes._trainer import (
    law_alpha,
    run_cells,
    run_parts,
    trace_probe_main,
    traced_records,
    unrescaled,
)

OUT = Path("benchmarks/results/linefit.jsonl")
EVERY = 10


def parabola_minimum(f0: float, f1: float, f2: float) -> tuple[float, float, float]:
    """``(k*, slope, curvature)`` of the parabola through ``(0, f0), (1, f1), (2, f2)``.

    ``slope`` is ``f'(0)``, ``curvature`` is ``f''``; ``k*`` is ``inf`` where the parabola is not
    convex and the loss falls along the step (it never turns), ``-inf`` where it is not convex and
    rises (the step points uphill).
    """
    curvature = f2 - 2.0 * f1 + f0
    slope = f1 - f0 - curvature / 2.0
    if curvature > 0:
        return -slope / curvature, slope, curvature
    return (math.inf if slope < 0 else -math.inf), slope, curvature


def watcher(trace: list[dict[str, Any]], every: int = EVERY) -> Any:
    """A factory for :func:`research.lm_bench.execute`'s ``watch``: one row of ``trace`` per
    sampled step (every ``every`` steps, from step ``every // 2``)."""
    offset = every // 2
    from transformers import TrainerCallback

    def make(tuner: Any, model: torch.nn.Module) -> list[Any]:
        params = [p for p in model.parameters() if p.requires_grad]
        seen: dict[str, Any] = {"inputs": None, "reading": False}

        def keep_inputs(module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
            if not seen["reading"]:
                seen["inputs"] = kwargs

        model.register_forward_pre_hook(keep_inputs, with_kwargs=True)

        @torch.no_grad()
        def along(inputs: dict[str, Any], base: list[torch.Tensor], after: list[torch.Tensor]) -> list[float]:
            """The loss on ``inputs`` at ``base + k·(after − base)`` for k = 0, 1, 2 (``base`` and
            ``after`` themselves at k = 0 and 1); leaves ``params`` at ``after``, bit for bit."""
            was_training = model.training
            model.eval()
            seen["reading"] = True
            losses = []
            try:
                for point in (base, after, [2 * a - b for a, b in zip(after, base, strict=True)]):
                    for p, x in zip(params, point, strict=True):
                        p.copy_(x)
                    losses.append(float(model(**inputs).loss.double()))
            finally:
                for p, a in zip(params, after, strict=True):
                    p.copy_(a)
                seen["reading"] = False
                model.train(was_training)
            return losses

        class Trace(TrainerCallback):
            def __init__(self) -> None:
                self.before: list[torch.Tensor] = []
                self.inputs: dict[str, Any] | None = None
                self.alpha: torch.Tensor | None = None

            def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                g = state.global_step  # optimizer steps completed so far
                if self.before and self.inputs is not None and seen["inputs"] is not None:
                    if unrescaled(self.alpha, law_alpha(tuner)):
                        after = [p.detach().clone() for p in params]
                        row: dict[str, Any] = {"step": g}
                        for name, inputs in (("same", self.inputs), ("next", seen["inputs"])):
                            row[name] = along(inputs, self.before, after)
                        trace.append(row)
                    self.before, self.inputs = [], None
                if g % every == offset:
                    self.before = [p.detach().clone() for p in params]
                    self.inputs = seen["inputs"]
                    self.alpha = law_alpha(tuner)

        return [Trace()]

    return make


def mean_parabola_minimum(rows: list[dict[str, Any]], batch: str) -> float:
    """``k*`` of the mean of the samples' parabolas, which is the parabola through the mean
    losses: the line fit of the loss averaged over the samples' batches, far steadier than any
    one sample's ``k*``."""
    return parabola_minimum(*(statistics.fmean(r[batch][i] for r in rows) for i in range(3)))[0]


def report(path: Path) -> str:
    """Per run and batch: ``k*`` of the mean parabola over the run's first half, its second half
    and all of it, and the median of the samples' own ``k*``."""
    out = [
        "# How far along its own step would the loss keep falling? (`research/probes/linefit.py`)",
        "",
        "k* = the multiple of the step Δₜ at which a parabola through the minibatch loss at "
        "θₜ + k·Δₜ, k = 0, 1, 2, is lowest (> 1: the loss would have kept falling; < 1: the step "
        "overshot). 'same': the step's own minibatch; 'next': the following one. 'mean fit': k* of "
        "the samples' parabolas averaged (−mean f′(0) / mean f″) over the run's first half, second "
        "half and all of it; 'median': the median of the samples' own k* (every 10 steps; inf "
        "where a sample's fit is concave and falls).",
        "",
        "| run | held-out loss | same: mean fit, 1st half / 2nd half / all | same: median | "
        "next: mean fit, 1st half / 2nd half / all | next: median | samples |",
        "|---|---|---|---|---|---|---|",
    ]
    for rec, rows in traced_records(path):
        parts = (*run_parts(rec, rows, 2), rows)
        cells = []
        for batch in ("same", "next"):
            fits = " / ".join(f"{mean_parabola_minimum(part, batch):.2f}" if part else "–" for part in parts)
            median = statistics.median(parabola_minimum(*r[batch])[0] for r in rows)
            cells += [fits, f"{median:.2f}"]
        out.append(f"{run_cells(rec)} {' | '.join(cells)} | {len(rows)} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    return trace_probe_main(argv, doc=__doc__, out=OUT, watcher=watcher, every=EVERY, report=report)


if __name__ == "__main__":
    raise SystemExit(main())
