"""When and where a run steps: the step law's meter read over training, layer by layer.

The benchmark records keep one reading of A's relative step ``a`` and of the weight update ``u``
per run (their EMA at the end, geometric means over the layers). Two runs with the same end
readings can still step differently: early or late in the run, and in some layers more than
others. This probe keeps every measurement the step law folds (``observe_steps``, wrapped for the
run: each measured layer's ``a`` and ``u`` and the schedule's factor of the step), so it reads
the steps themselves, not the law's EMA (which a control step sets to the target). It runs any
method with the meter: the law (``steps*``) or plain LoRA with it (``lora-metered``), which
measures and changes nothing.

The report gives, per run and for each third of it, the geometric means over the measured
layers of ``a`` and ``u`` at the schedule's peak (each divided by the step's factor) and of
``u`` as taken, and the spread of ``log u`` and ``log a`` over the layers (the SD of the
layers' mean logs in the last third): how the steps change over the run, and how even they are
between layers.

Usage::

    python -m research.probes.profile --model debates --rank 32 --seeds 100 --method lora-metered \
        --alpha 64 --lr 1e-3
    python -m research.probes.profile --model debates --rank 32 --seeds 100 --tag a=5e-3,u=1e-3
    python -m research.probes.profile --report   # benchmarks/results/profile.md
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import torch

from research.probes._trainer import run_cells, run_parts, trace_probe_main, traced_records

OUT = Path("benchmarks/results/profile.jsonl")
EVERY = 1
#: Where the wrapped ``observe_steps`` writes: the current run's (trace, engine, every), if any.
_SINK: list[tuple[list[dict[str, Any]], Any, int]] = []


def _values(x: torch.Tensor, mask: torch.Tensor | None) -> list[float]:
    """log of ``x`` per layer, NaN where not measured (or not positive)."""
    seen = torch.isfinite(x) & (x > 0) & (True if mask is None else mask.to(torch.bool))
    return torch.where(seen, x.clamp(min=1e-30).log(), math.nan).tolist()


def _install() -> None:
    """Wrap the engine's ``observe_steps`` once per process, so every measurement is recorded
    into :data:`_SINK`'s trace before the law folds it (the law's arithmetic is unchanged)."""
    import alpha_tuner.engine as engine_module

    original = engine_module.observe_steps
    if getattr(original, "profiled", False):
        return

    def observed(
        state: Any, a_step: Any, update: Any, scale: Any, config: Any, mask: Any = None, **kw: Any
    ) -> Any:
        if _SINK:
            trace, engine, every = _SINK[0]
            step = engine.state.steps + 1  # after_step counts the step after it measures
            if step % every == 0:
                trace.append({
                    "step": step,
                    "scale": float(scale),
                    "log_a": _values(a_step, mask),
                    "log_u": _values(update, mask),
                })  # fmt: skip
        return original(state, a_step, update, scale, config, mask, **kw)

    observed.profiled = True  # type: ignore[attr-defined]
    engine_module.observe_steps = observed


def watcher(trace: list[dict[str, Any]], every: int) -> Any:
    """A factory for :func:`research.lm_bench.execute`'s ``watch``: records the run's
    measurements (those at steps divisible by ``every``) into ``trace``."""

    def make(tuner: Any, model: torch.nn.Module) -> list[Any]:
        if tuner is None or tuner.engine.state.law is None:
            raise SystemExit("profile reads the step law's meter: use a steps* method or lora-metered.")
        _install()
        _SINK[:] = [(trace, tuner.engine, every)]
        return []

    return make


def _third_summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Geometric means over (layer, measurement) of a and u at the peak and of u as taken, and
    the SD over the layers of each layer's mean log u and log a (NaN where too few values)."""
    peak: dict[str, dict[int, list[float]]] = {"log_a": {}, "log_u": {}}  # per layer, at the peak
    taken_u: list[float] = []
    for row in rows:
        shift = math.log(row["scale"]) if row["scale"] > 0 else math.nan
        for name, layers in peak.items():
            for i, v in enumerate(row[name]):
                if v is not None and math.isfinite(v) and math.isfinite(shift):
                    layers.setdefault(i, []).append(v - shift)
        taken_u += [v for v in row["log_u"] if v is not None and math.isfinite(v)]

    def gmean(values: list[float]) -> float:
        return math.exp(statistics.fmean(values)) if values else math.nan

    def pooled(name: str) -> list[float]:
        return [v for values in peak[name].values() for v in values]

    def spread(name: str) -> float:
        means = [statistics.fmean(v) for v in peak[name].values()]
        return statistics.stdev(means) if len(means) >= 2 else math.nan

    return {
        "a": gmean(pooled("log_a")), "u": gmean(pooled("log_u")), "u_taken": gmean(taken_u),
        "sd_u": spread("log_u"), "sd_a": spread("log_a"),
    }  # fmt: skip


def report(path: Path) -> str:
    """One row per run: the readings by third of the run and their spread over the layers."""
    out = [
        "# When and where a run steps (`research/probes/profile.py`)",
        "",
        "Every measurement the step law folds. a: A's relative step, u: the weight update, per "
        "step at the schedule's peak (divided by the step's schedule factor), and u as taken; "
        "geometric means over the measured layers, by third of the run. SD: the spread over the "
        "layers of their mean log u and log a in the last third.",
        "",
        "| run | held-out loss | a at the peak, thirds | u at the peak, thirds | u as taken, thirds "
        "| SD log u | SD log a |",
        "|---|---|---|---|---|---|---|",
    ]
    for record, rows in traced_records(path):
        parts = [_third_summary(p) for p in run_parts(record, rows, 3)]

        def thirds(name: str, parts: list[dict[str, float]] = parts) -> str:
            return " / ".join(f"{p[name]:.2e}" for p in parts)

        out.append(
            f"{run_cells(record)} {thirds('a')} | {thirds('u')} | {thirds('u_taken')} | "
            f"{parts[-1]['sd_u']:.2f} | {parts[-1]['sd_a']:.2f} |"
        )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    return trace_probe_main(argv, doc=__doc__, out=OUT, watcher=watcher, every=EVERY, report=report)


if __name__ == "__main__":
    raise SystemExit(main())
