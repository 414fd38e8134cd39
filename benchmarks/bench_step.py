"""Time and memory of ``AlphaTunedOptimizer.step()`` against the bare inner optimizer.

The LoRA set has the shapes of Llama-7B with r = 16 on q, k, v, o, gate, up and down of all
32 blocks (224 layers, 39,976,960 LoRA parameters). The base weights (6.5e9 parameters) are
created on the ``meta`` device, so they take no memory: ``peft.get_peft_model`` builds real
PEFT LoRA layers around them, and only the LoRA factors are materialised on the benchmark
device. No forward or backward pass runs; gradients are random and fixed, and only
``opt.step()`` is timed.

Usage::

    python benchmarks/bench_step.py                  # full run (a few minutes on 2 CPU cores)
    python benchmarks/bench_step.py --quick          # smoke mode: tiny shapes, seconds
    python benchmarks/bench_step.py --json out.json  # also write the results as JSON

Reported:

* the median wall-time ratio of the wrapped ``step()`` to the bare ``step()`` of the same
  inner AdamW configuration, bare and wrapped steps interleaved one by one: at the default
  cadence (the optimizer's defaults ``measure_every``, ``measure_phases``, ``control_every``,
  read from its signature) as the median over full control cycles of the ratio of summed
  times, and measuring every step (one phase per step) as the median of per-step ratios; both
  also with ``measure_phases=1`` (all layers at each measurement) for comparison;
* the Gram route (``drift.drift_norms``) against the dense d×k route
  (``tests/drift_reference.dense_drift_norms``) on the same layers, and one full measurement by
  ``DriftMeter`` against the unchunked ``tests/drift_reference.drift_norms_grouped``;
* the extra memory of a measurement step, as a fraction of the LoRA parameter bytes: on
  CPU from the allocation events of ``torch.profiler`` (peak of the running total), on CUDA
  from ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from alpha_tuner import AlphaTunedOptimizer, StepLaw
from alpha_tuner.drift import drift_norms, lora_matrices

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from drift_reference import dense_drift_norms, drift_norms_grouped

from alpha_tuner.measure import DriftMeter

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: Inner AdamW configurations that can be benchmarked.
INNER: dict[str, dict[str, Any]] = {
    "foreach": {"foreach": True},
    "fused": {"fused": True},
    "for-loop": {"foreach": False},
}
TARGETS = {"default cadence": 1.05, "every step": 1.5, "extra memory": 1.0}


def _default(name: str) -> int:
    """The optimizer's own default for ``name``, so the benchmark follows the library."""
    return int(inspect.signature(AlphaTunedOptimizer.__init__).parameters[name].default)


DEFAULT_EVERY, DEFAULT_PHASES, DEFAULT_CONTROL = (
    _default(n) for n in ("measure_every", "measure_phases", "control_every")
)
#: Timed cadences: (measure_every, measure_phases, control_every, target).
CADENCES: dict[str, tuple[int, int, int, str]] = {
    "default cadence": (DEFAULT_EVERY, DEFAULT_PHASES, DEFAULT_CONTROL, "default cadence"),
    "every step": (1, DEFAULT_PHASES, 10**9, "every step"),
    "default cadence, 1 phase": (DEFAULT_EVERY, 1, DEFAULT_EVERY * 6, "default cadence"),
    "every step, 1 phase": (1, 1, 10**9, "every step"),
}


@dataclass(frozen=True)
class Shapes:
    """A Llama-like LoRA set: ``blocks`` × the seven projections at rank ``r``."""

    blocks: int
    hidden: int
    intermediate: int
    r: int

    def describe(self) -> str:
        h, i, r = self.hidden, self.intermediate, self.r
        return (
            f"{self.blocks} blocks × (q,k,v,o: A {r}×{h}, B {h}×{r}; gate,up: A {r}×{h}, B {i}×{r}; "
            f"down: A {r}×{i}, B {h}×{r}), r={r}"
        )


LLAMA_7B = Shapes(blocks=32, hidden=4096, intermediate=11008, r=16)
QUICK = Shapes(blocks=2, hidden=64, intermediate=172, r=8)


class _Block(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        for name in PROJECTIONS[:4]:
            setattr(self, name, nn.Linear(hidden, hidden, bias=False))
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)


class _Stack(nn.Module):
    def __init__(self, shapes: Shapes) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Block(shapes.hidden, shapes.intermediate) for _ in range(shapes.blocks))


def build_lora_model(
    shapes: Shapes, device: torch.device, seed: int = 0
) -> tuple[nn.Module, list[nn.Parameter]]:
    """A PEFT model with meta base weights and real LoRA factors and gradients on ``device``."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    with torch.device("meta"):
        base = _Stack(shapes)
    config = LoraConfig(r=shapes.r, lora_alpha=2 * shapes.r, target_modules=list(PROJECTIONS))
    model = get_peft_model(base, config)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.lora_A.to_empty(device=device)
            module.lora_B.to_empty(device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.normal_(0.0, 0.02, generator=g)
            p.grad = torch.randn(p.shape, generator=g, device=device) * 1e-3
    return model, params


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _pair(shapes: Shapes, device: torch.device, inner: str, **wrap: Any) -> tuple[Any, AlphaTunedOptimizer]:
    bare_model, bare_params = build_lora_model(shapes, device)
    bare = torch.optim.AdamW(bare_params, lr=2e-5, **INNER[inner])
    model, params = build_lora_model(shapes, device)
    # The fast start is a transient of the first control interval (and, with the "every step"
    # cadences' control_every of 10**9, it would never end): the benchmark is of the steady state.
    wrap.setdefault("fast_start", False)
    wrapped = AlphaTunedOptimizer(torch.optim.AdamW(params, lr=2e-5, **INNER[inner]), model, **wrap)
    del bare_model
    return bare, wrapped


def time_ratio(
    shapes: Shapes,
    device: torch.device,
    inner: str,
    *,
    measure_every: int,
    control_every: int,
    steps: int,
    block: int,
    measure_phases: int = DEFAULT_PHASES,
    law: str = "steps",
) -> dict[str, float]:
    """Interleave bare and wrapped steps; median over blocks of ``block`` steps of the time ratio."""
    bare, wrapped = _pair(
        shapes,
        device,
        inner,
        measure_every=measure_every,
        measure_phases=measure_phases,
        control_every=control_every,
        steps=StepLaw() if law == "steps" else None,
    )
    if law == "steps":
        # The base weights are on the meta device, so ‖W₀‖ is unknown and the law would leave every
        # layer alone; set it to 1 so that each control step really rescales A, B and their moments.
        engine = wrapped.engine
        layers = engine._law_layers
        assert layers is not None
        engine._law_layers = replace(layers, weight_norms=torch.ones_like(layers.weight_norms))
    for _ in range(measure_every * measure_phases + 1):  # warm-up: state, a measurement per phase
        bare.step()
        wrapped.step()
    meter = wrapped._meter
    assert meter is not None
    measured: list[bool] = []
    real_measure = meter.measure

    def counted_measure() -> Any:
        measured[-1] = True
        return real_measure()

    meter.measure = counted_measure  # type: ignore[method-assign]
    t_bare: list[float] = []
    t_wrapped: list[float] = []
    controlled: list[bool] = []
    gc.collect()
    gc.disable()  # as timeit does: a collection would land on whichever step triggers it
    try:
        for _ in range(steps):
            measured.append(False)
            controlled.append((wrapped.engine.state.steps + 1) % control_every == 0)
            t_bare.append(_timed(bare.step, device))
            t_wrapped.append(_timed(wrapped.step, device))
    finally:
        gc.enable()
        meter.measure = real_measure  # type: ignore[method-assign]
    ratios = [
        sum(t_wrapped[i : i + block]) / sum(t_bare[i : i + block]) for i in range(0, steps - block + 1, block)
    ]
    extra = [w - b for w, b in zip(t_wrapped, t_bare, strict=True)]

    def extra_ms(measuring: bool, controlling: bool) -> float:
        """Median extra time of the wrapped step over the bare one, for one kind of step."""
        kinds = zip(extra, measured, controlled, strict=True)
        picked = [e for e, m, c in kinds if m == measuring and c == controlling]
        return 1e3 * statistics.median(picked) if picked else math.nan

    return {
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "blocks": len(ratios),
        "bare_ms": 1e3 * statistics.median(t_bare),
        "wrapped_ms": 1e3 * sum(t_wrapped) / len(t_wrapped),
        "measure_step_ms": 1e3 * statistics.median(t for t, m in zip(t_wrapped, measured, strict=True) if m),
        "measurements": sum(measured),
        # Wrapped minus bare, median per kind of step: what each part of the cadence costs.
        "plain_extra_ms": extra_ms(False, False),
        "measure_extra_ms": extra_ms(True, False),
        "control_extra_ms": extra_ms(control_every % measure_every == 0, True),
    }


def _median_time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()
    return statistics.median(_timed(fn, device) for _ in range(repeats))


def gram_vs_dense(shapes: Shapes, device: torch.device, repeats: int) -> dict[str, float]:
    """Per-layer Gram and dense norms on one block's seven layers; full meter vs unchunked."""
    model, _ = build_lora_model(shapes, device)
    from alpha_tuner.discovery import find_lora_targets

    targets = find_lora_targets(model)
    g = torch.Generator(device=device).manual_seed(1)
    layers = []
    for t in targets:
        a, b = lora_matrices(t.weight_a.detach(), t.weight_b.detach())
        da = torch.randn(a.shape, generator=g, device=device) * 2e-5
        db = torch.randn(b.shape, generator=g, device=device) * 2e-5
        layers.append((a, b, da, db))
    block = layers[: len(PROJECTIONS)]

    def gram() -> None:
        for x in block:
            drift_norms(*x)

    def dense() -> None:
        for x in block:
            dense_drift_norms(*x)

    worst = 0.0
    for x in block:
        want, got = dense_drift_norms(*(y.double() for y in x)), drift_norms(*x)
        for w, v in zip(want, got, strict=True):
            worst = max(worst, float(((v.double() - w) / w).abs().max()))
    meter = DriftMeter(targets, device)

    def full_meter() -> None:
        meter.snapshot()  # factors unchanged: the timing does not depend on the values
        meter.measure()

    snap_ms = 1e3 * _median_time(meter.snapshot, device, repeats)
    meter.discard()
    return {
        "gram_ms": 1e3 * _median_time(gram, device, repeats),
        "dense_ms": 1e3 * _median_time(dense, device, repeats),
        "gram_max_rel_err": worst,
        "meter_ms": 1e3 * _median_time(full_meter, device, repeats) - snap_ms,
        "snapshot_ms": snap_ms,
        "unchunked_ms": 1e3 * _median_time(lambda: drift_norms_grouped(layers), device, repeats),
        "layers": len(layers),
        "chunks": meter.num_chunks,
        "groups": meter.num_groups,
    }


@contextmanager
def _peak(device: torch.device) -> Iterator[dict[str, int]]:
    """Yields a dict that receives the peak bytes allocated above the level at entry."""
    out: dict[str, int] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield out
        torch.cuda.synchronize(device)
        out["peak"] = torch.cuda.max_memory_allocated(device) - start
        return
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield out

    def walk(nodes: list[Any]) -> Iterator[Any]:
        for node in nodes:
            yield node
            yield from walk(node.children)

    events = [
        n
        for n in walk(prof.profiler.kineto_results.experimental_event_tree())
        if n.tag == _EventType.Allocation
    ]
    running = peak = 0
    for node in sorted(events, key=lambda n: n.start_time_ns):
        running += node.extra_fields.alloc_size
        peak = max(peak, running)
    out["peak"] = peak


def memory(shapes: Shapes, device: torch.device, inner: str) -> dict[str, Any]:
    """Peak extra bytes of a measurement step, as fractions of the LoRA parameter bytes.

    ``held``: what the meter keeps between measurements (its workspace, and on CPU the
    snapshot's storage). ``own``: what the wrapper itself needs, the peak of ``snapshot()`` +
    ``measure()`` of the largest phase (default phases) plus ``held``. ``extra``: the peak of
    a wrapped measurement step minus that of a bare step, plus ``held``.
    """
    bare, wrapped = _pair(shapes, device, inner, measure_every=1, control_every=10**9)
    for _ in range(2):
        bare.step()
        wrapped.step()
    lora_bytes = sum(p.numel() * p.element_size() for g in bare.param_groups for p in g["params"])
    meter = wrapped._meter
    assert isinstance(meter, DriftMeter)  # single process: not the sharded meter

    def nbytes(tensors: Iterable[torch.Tensor]) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    workspace = nbytes(meter._workspaces.values())
    held = meter.held_bytes
    kept = held - workspace
    sizes = [sum(c.nbytes for c in chunks) for chunks in meter._phase_chunks]
    phase = sizes.index(max(sizes))
    with _peak(device) as p_bare:
        bare.step()
    with _peak(device) as p_wrapped:
        wrapped.step()
    with _peak(device) as p_own:
        meter.snapshot(phase)
        meter.measure()
    with _peak(device) as p_snap:
        meter.snapshot(phase)
    meter.discard()
    return {
        "lora_mb": lora_bytes / 2**20,
        "own": (p_own["peak"] + held) / lora_bytes,
        "extra": (p_wrapped["peak"] - p_bare["peak"] + held) / lora_bytes,
        "snapshot": (p_snap["peak"] + kept) / lora_bytes,
        "snapshot_kept": bool(kept),
        "workspace": workspace / lora_bytes,
        "bare_step": p_bare["peak"] / lora_bytes,
        "chunk_mb": meter.chunk_bytes / 2**20,
        "phases": meter.num_phases,
    }


def machine() -> dict[str, str]:
    """Processor, cores, threads, torch version and load average (the CPU may be shared)."""
    model = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next(
            line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")
        )
    except (OSError, StopIteration):
        pass
    info = {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if hasattr(os, "getloadavg"):
        info["load"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return info


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    shapes = QUICK if args.quick else LLAMA_7B
    cycles = 1 if args.quick else args.cycles
    every_steps = 6 if args.quick else args.every_steps
    results: dict[str, Any] = {
        "machine": machine(), "shapes": shapes.describe(), "quick": args.quick, "law": args.law,
    }  # fmt: skip
    if device.type == "cuda":
        results["machine"]["gpu"] = torch.cuda.get_device_name(device)
    results["timing"] = {}
    results["memory"] = {}
    inners = args.inner or (["fused"] if args.quick else ["foreach", "fused"])
    for inner in inners:
        results["timing"][inner] = {}
        for name, (every, phases, control, _) in CADENCES.items():
            skipped = args.quick and name.endswith("1 phase")
            if skipped or (args.cadence == "default" and name != "default cadence"):
                continue
            default = every > 1
            results["timing"][inner][name] = time_ratio(
                shapes,
                device,
                inner,
                measure_every=every,
                measure_phases=phases,
                control_every=control,
                steps=control * cycles if default else every_steps,
                block=control if default else 1,
                law=args.law,
            )
        if args.cadence == "all":
            results["memory"][inner] = memory(shapes, device, inner)
    if args.cadence == "all":
        results["gram"] = gram_vs_dense(shapes, device, repeats=2 if args.quick else 3)
    results["machine"]["load_after"] = machine().get("load", "")
    return results


def _met(value: float, target: float) -> str:
    return "yes" if value <= target else "no"


def report(results: dict[str, Any]) -> str:
    """The results as Markdown: machine, shapes, and one table."""
    m = results["machine"]
    lines = [
        f"machine: {m['cpu']}, {m['cores']} cores, {m['threads']} torch threads"
        + (f", GPU {m['gpu']}" if "gpu" in m else ""),
        f"torch {m['torch']}, Python {m['python']}; load average before {m.get('load', '?')}, "
        f"after {m.get('load_after', '?')}",
        f"shapes: {results['shapes']}",
        "",
        "| quantity | inner AdamW | value | target | met |",
        "|---|---|---|---|---|",
    ]
    for inner, timing in results["timing"].items():
        for cadence, t in timing.items():
            target = TARGETS[CADENCES[cadence][3]]
            detail = f" (range {t['ratio_min']:.3f}–{t['ratio_max']:.3f} over {t['blocks']})"
            lines.append(
                f"| step time ratio, {cadence} | {inner} | {t['ratio']:.3f}×{detail} | ≤ {target}× | "
                f"{_met(t['ratio'], target)} |"
            )
        t = timing["default cadence"]
        lines.append(
            f"| bare step / wrapped mean / measuring step (ms) | {inner} | {t['bare_ms']:.1f} / "
            f"{t['wrapped_ms']:.1f} / {t['measure_step_ms']:.1f} | | |"
        )
        lines.append(
            f"| extra time of a plain / measuring / measuring + control step (ms, median) | {inner} | "
            f"{t['plain_extra_ms']:.3f} / {t['measure_extra_ms']:.3f} / {t['control_extra_ms']:.3f} | | |"
        )
    for inner, mem in results["memory"].items():
        target = TARGETS["extra memory"]
        lines.append(
            f"| extra memory of a measurement step ({mem['phases']} phases) / LoRA bytes | {inner} | "
            f"{mem['own']:.3f}× "
            f"(snapshot {mem['snapshot']:.3f}×{' kept' if mem['snapshot_kept'] else ''} + workspace "
            f"{mem['workspace']:.3f}× + rest; vs a bare step "
            f"{mem['extra']:.3f}×, whose own transient is {mem['bare_step']:.3f}×) | ≤ {target}× | "
            f"{_met(mem['own'], target)} |"
        )
    g = results.get("gram")
    if g is None:
        return "\n".join(lines)
    lines += [
        f"| Gram vs dense, one block's 7 layers (ms) | – | {g['gram_ms']:.2f} vs {g['dense_ms']:.2f} "
        f"(dense / Gram {g['dense_ms'] / g['gram_ms']:.1f}×; "
        f"max rel. diff {g['gram_max_rel_err']:.1e}) | | |",
        f"| one measurement, all {g['layers']} layers (ms) | – | DriftMeter {g['meter_ms']:.1f} + snapshot "
        f"{g['snapshot_ms']:.1f} ({g['chunks']} chunks, {g['groups']} groups) vs unchunked "
        f"drift_norms_grouped {g['unchunked_ms']:.1f} | | |",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one cycle: a smoke test")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--inner",
        nargs="+",
        default=None,
        choices=sorted(INNER),
        help="inner AdamW variants (default: foreach and fused; fused with --quick)",
    )
    parser.add_argument("--cycles", type=int, default=3, help="control cycles timed at the default cadence")
    parser.add_argument("--every-steps", type=int, default=20, help="steps timed when measuring every step")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: unchanged)"
    )
    parser.add_argument(
        "--law", choices=("steps", "backoff"), default="steps",
        help="the tuner's law: the step law (the library's default) or the α rule with back-off (steps=None)",
    )  # fmt: skip
    parser.add_argument(
        "--cadence", choices=("all", "default"), default="all",
        help="default: time only the default cadence (no memory or Gram figures); for repeated runs",
    )  # fmt: skip
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run(args)
    print(report(results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
