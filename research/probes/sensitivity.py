"""How much does the loss respond to a relative change of each adapted weight? A probe across tasks.

The law holds each layer's relative update ``u = ‖ΔW‖/‖W₀‖`` per step at one target on every
task. To first order a step lowers the loss by ``Σ ‖∇_W L‖·‖ΔW‖·cos``, so the relative loss
change that one unit of ``u`` can buy is the layer's *sensitivity*

    S = ‖∇_W L‖_F · ‖W₀‖_F / L.

A task whose loss is less sensitive needs larger relative updates for the same progress (the
idea behind Polyak's step ``η = L / ‖∇L‖²``). LoRA never forms ``∇_W L``, but ``∇_B L = s·∇_W L·Aᵀ``,
and while A's rows are near their random start ``‖∇_W L·Aᵀ‖ ≈ ‖∇_W L‖·‖A‖_F/√k`` for a
``d × k`` layer, so the probe reads ``Ŝ = ‖∇_B L‖·√k·‖W₀‖ / (s·‖A‖_F·L)`` per layer and step
(invariant to α and to the balance of A and B). The loss is the minibatch's, taken from the
model's output by a forward hook; gradients are read as the optimizer sees them (after the
Trainer's clipping, whose factor is recorded as ``clip``).

Usage::

    python -m research.probes.sensitivity --model debates --rank 8 --seeds 0 --lr 1e-4
    python -m research.probes.sensitivity --model minilm --steps 150 --rank 16 --seeds 0
    python -m research.probes.sensitivity --report   # benchmarks/results/sensitivity.md
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import torch

from research.probes._trainer import run_cells, run_parts, trace_probe_main, traced_records

OUT = Path("benchmarks/results/sensitivity.jsonl")
EVERY = 5


def sensitivity(
    grad_b: torch.Tensor, lora_a: torch.Tensor, scaling: float, w0_norm: float, loss: float
) -> float:
    """``Ŝ = ‖∇_B L‖·√k·‖W₀‖ / (s·‖A‖_F·L)`` of one layer (``lora_a``: A, shape (r, k)); NaN where
    ``s``, ``‖A‖`` or ``L`` is not positive."""
    norm_a = float(lora_a.detach().double().norm())
    if not (loss > 0 and norm_a > 0 and scaling > 0):
        return math.nan
    grad = float(grad_b.detach().double().norm())
    return grad * math.sqrt(lora_a.shape[1]) * w0_norm / (scaling * norm_a * loss)


def _lora_layers(model: torch.nn.Module) -> list[tuple[Any, str]]:
    """PEFT LoRA layers with their default adapter (``lora_A[name]``, ``lora_B[name]``)."""
    out = []
    for module in model.modules():
        a = getattr(module, "lora_A", None)
        if isinstance(a, torch.nn.ModuleDict) and "default" in a and hasattr(module, "base_layer"):
            out.append((module, "default"))
    return out


def watcher(trace: list[dict[str, Any]], every: int = EVERY) -> Any:
    """A factory for :func:`execute`'s ``watch``: one row of ``trace`` every ``every`` steps."""
    from transformers import TrainerCallback

    def make(tuner: Any, model: torch.nn.Module) -> list[Any]:
        layers = _lora_layers(model)
        w0 = [float(m.base_layer.weight.detach().double().norm()) for m, _ in layers]
        seen: dict[str, torch.Tensor] = {}

        def keep_loss(module: torch.nn.Module, inputs: Any, output: Any) -> None:
            loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
            if module.training and isinstance(loss, torch.Tensor):
                seen["loss"] = loss.detach()

        model.register_forward_hook(keep_loss)

        class Trace(TrainerCallback):
            def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                if state.global_step % every or "loss" not in seen:
                    return
                loss = float(seen["loss"])
                values = []
                for (module, name), n0 in zip(layers, w0, strict=True):
                    a, b = module.lora_A[name].weight, module.lora_B[name].weight
                    if b.grad is not None:
                        value = sensitivity(b.grad, a, float(module.scaling[name]), n0, loss)
                        values += [value] if math.isfinite(value) else []
                if values:
                    trace.append({
                        "step": state.global_step + 1, "loss": loss, "s_median": statistics.median(values),
                        "s_mean": statistics.fmean(values),
                    })  # fmt: skip

        return [Trace()]

    return make


def _mean(v: list[float]) -> str:
    return f"{statistics.fmean(v):.3g}" if v else "–"


def report(path: Path) -> str:
    """Per run: the median over layers of Ŝ, averaged over each third of the run."""
    out = [
        "# How much does the loss respond to a relative weight change? (`research/probes/sensitivity.py`)",
        "",
        "Ŝ = ‖∇_B L‖·√k·‖W₀‖ / (s·‖A‖·L): the relative loss change per unit relative update of a "
        "layer, along its gradient (median over the layers, mean over the samples of each third of "
        "the run). L is the minibatch loss.",
        "",
        "| run | held-out loss | Ŝ first third | Ŝ second third | Ŝ last third | mean L, last third |",
        "|---|---|---|---|---|---|",
    ]
    for rec, rows in traced_records(path):
        thirds = run_parts(rec, rows, 3)
        cells = [_mean([r["s_median"] for r in t]) for t in thirds]
        out.append(f"{run_cells(rec)} {' | '.join(cells)} | {_mean([r['loss'] for r in thirds[2]])} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    return trace_probe_main(argv, doc=__doc__, out=OUT, watcher=watcher, every=EVERY, report=report)


if __name__ == "__main__":
    raise SystemExit(main())
