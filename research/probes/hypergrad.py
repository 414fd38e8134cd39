"""Does the next gradient still point along the last step? A probe of the step size's hypergradient.

The loss after a step ``Δₜ`` changes with the step's size as ``⟨∇L(θₜ₊₁), Δₜ⟩`` (the
hypergradient of the learning rate, Baydin et al. 2018). The next minibatch gradient ``gₜ₊₁`` is
an unbiased sample of ``∇L(θₜ₊₁)`` that is independent of ``Δₜ``, so the cosine
``c₁ = cos(−gₜ₊₁, Δₜ)`` says, on average, whether the step was too small (``c₁ > 0``: the loss
still falls along it), about right (``≈ 0``) or too large (``< 0``: it overshot). ``c₀ =
cos(−gₜ, Δₜ)`` is the same for the gradient the step was taken from. Cosines are immune to the
Trainer's gradient clipping, which rescales a step's gradient before the optimizer sees it.

Every 10 steps (``--every``; at steps 5, 15, …, away from the law's control steps) this probe copies the LoRA
factors and gradients before the optimizer step, forms ``Δₜ`` after it, and reads ``gₜ₊₁`` before
the next step; a sample where a control step rescaled the factors in between is dropped. It
records per sample the cosines over all LoRA factors together and the median over the layers.

Usage::

    python -m research.probes.hypergrad --model debates --rank 8 --seeds 0 --lr 1e-4
    python -m research.probes.hypergrad --model minilm --steps 150 --rank 16 --seeds 0 --lr 1e-4
    python -m research.probes.hypergrad --report   # benchmarks/results/hypergrad.md
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import torch

from research.probes._trainer import law_alpha, run_cells, run_parts, trace_probe_main, unrescaled
from research.runner import read_records

OUT = Path("benchmarks/results/hypergrad.jsonl")
EVERY = 10


def _cos(x: list[torch.Tensor], y: list[torch.Tensor]) -> float:
    dot = sum(float((a.double() * b.double()).sum()) for a, b in zip(x, y, strict=True))
    nx = math.sqrt(sum(float(a.double().square().sum()) for a in x))
    ny = math.sqrt(sum(float(b.double().square().sum()) for b in y))
    return dot / (nx * ny) if nx > 0 and ny > 0 else math.nan


def watcher(trace: list[dict[str, Any]], every: int = EVERY) -> Any:
    """A factory for :func:`execute`'s ``watch``: one row of ``trace`` per sampled step (every
    ``every`` steps, from step ``every // 2``; 1: every step)."""
    offset = every // 2
    from transformers import TrainerCallback

    def make(tuner: Any, model: torch.nn.Module) -> list[Any]:
        layers: dict[str, list[torch.nn.Parameter]] = {}
        for name, p in model.named_parameters():
            if p.requires_grad and ("lora_A" in name or "lora_B" in name):
                layers.setdefault(name.split(".lora_")[0], []).append(p)
        params = [p for ps in layers.values() for p in ps]

        def grads() -> list[torch.Tensor]:
            return [-p.grad.detach() for p in params if p.grad is not None]

        class Trace(TrainerCallback):
            def __init__(self) -> None:
                self.before: list[torch.Tensor] = []
                self.grad: list[torch.Tensor] = []
                self.step: list[torch.Tensor] = []
                self.alpha: torch.Tensor | None = None
                self.row: dict[str, Any] | None = None

            def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                g = state.global_step  # optimizer steps completed so far
                if self.row is not None:  # the step after a sample: the next gradient
                    now = grads()
                    if unrescaled(self.alpha, law_alpha(tuner)) and len(now) == len(params):
                        self.row["c1"] = _cos(now, self.step)
                        per_layer, i = [], 0
                        for ps in layers.values():
                            n = len(ps)
                            per_layer.append(_cos(now[i : i + n], self.step[i : i + n]))
                            i += n
                        finite = [v for v in per_layer if math.isfinite(v)]
                        self.row["c1_layers"] = statistics.median(finite) if finite else math.nan
                        trace.append(self.row)
                    self.row = None
                if g % every == offset and all(p.grad is not None for p in params):
                    self.before = [p.detach().clone() for p in params]
                    self.grad = [g.clone() for g in grads()]
                    self.alpha = law_alpha(tuner)

            def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                if state.global_step % every != offset or not self.before:
                    return
                self.step = [p.detach() - b for p, b in zip(params, self.before, strict=True)]
                if unrescaled(self.alpha, law_alpha(tuner)):
                    self.row = {"step": state.global_step + 1, "c0": _cos(self.grad, self.step)}
                self.before, self.grad = [], []

        return [Trace()]

    return make


def report(path: Path) -> str:
    """Per run: the mean cosines over the run's first and second half, and over all of it."""
    out = [
        "# Does the next gradient still point along the last step? (`research/probes/hypergrad.py`)",
        "",
        "c₁ = cos(−gₜ₊₁, Δₜ): > 0, the loss still falls along the step just taken (a larger step "
        "would have gone further); < 0, it overshot. c₀ = cos(−gₜ, Δₜ). Means over the samples "
        "(every 10 steps, or as the key's `every` says; SE over the samples, which neighbouring "
        "samples make too small); 'layers' is the median over the layers of each sample's c₁.",
        "",
        "| run | held-out loss | c₁ first half | c₁ second half | c₁ all ± SE | c₁ layers, all | c₀ all | "
        "samples |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rec in read_records(path):
        rows = [r for r in rec["trace"] if "c1" in r]
        if not rows:
            continue
        first, second = ([r["c1"] for r in part] for part in run_parts(rec, rows, 2))

        def mean(v: list[float | None]) -> str:  # None: a NaN the record could not hold
            finite = [x for x in v if x is not None]
            return f"{statistics.fmean(finite):+.4f}" if finite else "–"

        def se(v: list[float]) -> str:
            return f" ± {statistics.stdev(v) / math.sqrt(len(v)):.4f}" if len(v) > 1 else ""

        out.append(
            f"{run_cells(rec)} {mean(first)} | {mean(second)} | "
            f"{mean([r['c1'] for r in rows])}{se([r['c1'] for r in rows])} | "
            f"{mean([r['c1_layers'] for r in rows])} | "
            f"{mean([r['c0'] for r in rows])} | {len(rows)} |"
        )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    return trace_probe_main(argv, doc=__doc__, out=OUT, watcher=watcher, every=EVERY, report=report)


if __name__ == "__main__":
    raise SystemExit(main())
