"""How straight is a run's path? A probe of the coherence of the adapters' updates.

Distance-over-gradients methods (DoG, Ivgi et al. 2023; Prodigy and D-Adaptation are relatives)
set the step from how far the weights have travelled: while consecutive steps add up (the path
is straight) the solution is still far and the step can grow; once they cancel (a random walk)
the step is as large as the noise allows. For a LoRA layer the change of the weight since wrap
time is ``ΔW = s·B·A`` (B starts at zero), so both quantities are exact and cheap:

* the coherence over a window of ``w`` steps, ``κ_w = ‖ΔW_t − ΔW_{t−w}‖ / Σ_{i∈(t−w, t]} ‖ΔW_i − ΔW_{i−1}‖``:
  1 for a straight path, about ``1/√w`` for a random walk;
* the distance ``D = ‖ΔW_t‖ / ‖W₀‖`` travelled since wrap time.

Every step this probe forms each layer's dense ``s·B·A`` (function-preserving rescales of the
law do not change it) and the norm of its change; every 10 steps (``--every``) it records the
median over the layers of ``κ_10``, ``κ_40``, ``κ`` over the whole run so far, and ``D``.

Usage::

    python -m research.probes.coherence --model debates --rank 8 --seeds 0,1 --lr 1e-4
    python -m research.probes.coherence --model minilm --steps 150 --rank 16 --seeds 0,1 --lr 1e-4
    python -m research.probes.coherence --report   # benchmarks/results/coherence.md
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch

from research.probes._trainer import run_cells, run_parts, trace_probe_main, traced_records

OUT = Path("benchmarks/results/coherence.jsonl")
EVERY = 10
LAGS = (10, 40)
LAG_FIELDS = tuple(f"k{lag}" for lag in LAGS)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _weight_change(layer: Any) -> torch.Tensor:
    """``s·B·A`` of a PEFT LoRA layer's default adapter, dense, float32."""
    b = layer.lora_B["default"].weight.float()
    a = layer.lora_A["default"].weight.float()
    return float(layer.scaling["default"]) * (b @ a)


def _base_weight(layer: Any) -> torch.Tensor:
    """The frozen weight W₀ a LoRA layer adapts, float32."""
    weight: torch.Tensor = layer.get_base_layer().weight
    return weight.detach().float()


def _halves(halves: list[list[dict[str, Any]]], field: str) -> str:
    """The means of ``field`` over the samples of the run's first and second half, "x / y"."""
    means = []
    for part in halves:
        v = [r[field] for r in part if r.get(field) is not None]
        means.append(f"{statistics.fmean(v):.3f}" if v else "–")
    return " / ".join(means)


def watcher(trace: list[dict[str, Any]], every: int = EVERY) -> Any:
    """A factory for :func:`execute`'s ``watch``: one row of ``trace`` every ``every`` steps."""
    from peft.tuners.lora import LoraLayer
    from transformers import TrainerCallback

    def make(tuner: Any, model: torch.nn.Module) -> list[Any]:
        layers = [m for m in model.modules() if isinstance(m, LoraLayer) and "default" in m.lora_A]
        w0 = [float(_base_weight(m).norm()) for m in layers]

        def delta() -> list[torch.Tensor]:
            with torch.no_grad():
                return [_weight_change(m) for m in layers]

        class Trace(TrainerCallback):
            def __init__(self) -> None:
                self.prev: list[torch.Tensor] | None = None
                self.lengths: list[list[float]] = []  # per step, per layer: ‖ΔW_i − ΔW_{i−1}‖
                self.snaps: dict[int, list[torch.Tensor]] = {}

            def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                t = state.global_step + 1  # optimizer steps done, this one included
                now = delta()
                prev = self.prev if self.prev is not None else [torch.zeros_like(d) for d in now]
                self.lengths.append([float((a - b).norm()) for a, b in zip(now, prev, strict=True)])
                self.prev = now
                if t % every:
                    return
                row: dict[str, Any] = {"step": t}
                zero = [torch.zeros_like(d) for d in now]
                for lag, base in [(lag, self.snaps.get(t - lag)) for lag in LAGS] + [(t, zero)]:
                    if base is None:
                        continue
                    path = [sum(step[j] for step in self.lengths[t - lag : t]) for j in range(len(now))]
                    ks = [float((a - b).norm()) / p for a, b, p in zip(now, base, path, strict=True) if p > 0]
                    row["k_all" if lag == t else f"k{lag}"] = _median(ks)
                row["dist"] = _median([float(d.norm()) / w for d, w in zip(now, w0, strict=True) if w > 0])
                trace.append(row)
                self.snaps[t] = now
                for old in [s for s in self.snaps if s <= t - max(LAGS)]:
                    del self.snaps[old]

        return [Trace()]

    return make


def fit_coherence(rows: list[dict[str, Any]], *, first: int = 30) -> tuple[float, float]:
    """``(c², τ)`` of the path model ``κ(t)² = c² + (1 − c²)·τ/t`` fitted by least squares to the
    whole-run coherence of the samples from step ``first`` on (NaN without two of them).

    A path whose steps are a fixed direction of weight c plus noise that stays correlated over
    about τ steps (Adam's momentum) has that κ: c² is the share of the step that keeps one
    direction over the run."""
    pts = [(1.0 / r["step"], r["k_all"] ** 2) for r in rows if r["step"] >= first and r.get("k_all")]
    if len(pts) < 2:
        return float("nan"), float("nan")
    mx = statistics.fmean(x for x, _ in pts)
    my = statistics.fmean(y for _, y in pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    slope = sum((x - mx) * (y - my) for x, y in pts) / sxx
    c2 = my - slope * mx
    return c2, slope / (1.0 - c2) if c2 < 1 else float("nan")


def report(path: Path) -> str:
    """Per run: the mean coherences over the run's first and second half, and the end distance."""
    out = [
        "# How straight is a run's path? (`research/probes/coherence.py`)",
        "",
        "κ_w: the distance the adapter's weight change ΔW = s·B·A moved over w steps, over the path "
        "length it took (1: a straight path; a random walk gives about 1/√w: 0.32 for w = 10, "
        "0.16 for 40); medians over the layers, means over the samples of each half. D: ‖ΔW‖/‖W₀‖ at "
        "the end, median over the layers. c², τ: the fit of κ(t)² = c² + (1 − c²)·τ/t over the "
        "samples from step 30 on (`fit_coherence`).",
        "",
        "| run | held-out loss | κ₁₀ 1st / 2nd half | κ₄₀ 1st / 2nd half | κ whole run, at the end | D end "
        "| c² | τ |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rec, rows in traced_records(path):
        c2, tau = fit_coherence(rows)
        halves = [_halves(run_parts(rec, rows, 2), f) for f in LAG_FIELDS]
        end = rows[-1]
        out.append(
            f"{run_cells(rec)} {halves[0]} | {halves[1]} | {end['k_all']:.3f} | {end['dist']:.2e} | "
            f"{c2:.3f} | {tau:.1f} |"
        )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    return trace_probe_main(argv, doc=__doc__, out=OUT, watcher=watcher, every=EVERY, report=report)


if __name__ == "__main__":
    raise SystemExit(main())
