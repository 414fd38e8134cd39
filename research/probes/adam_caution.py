"""Adam's caution and the step law: what the law does when Adam's own steps shrink.

Adam divides each step by ``√v̂``, a long memory of squared gradients (β₂ = 0.999). After a burst
of large gradients, or when the gradient loses its sign from step to step, its normalised step
``RMS(m̂ / (√v̂ + ε))`` falls far below its usual value, and the steps with it. The step law holds
each layer's measured step at a target, so it answers such a fall by raising the layer's
learning rates. This probe trains one run of the benchmark (:func:`research.lm_bench.execute`,
the same Trainer path) and records every 10 steps the median over the LoRA factors of Adam's
normalised step RMS, and the law's per-layer log α against its placement.

Usage::

    python -m research.probes.adam_caution --model minilm --rank 4 --seeds 107,106
    python -m research.probes.adam_caution --model minilm --rank 4 --seeds 107 --tag f=0
    python -m research.probes.adam_caution --model minilm --rank 4 --seeds 101 --method steps-down16
    python -m research.probes.adam_caution --report      # benchmarks/results/adam_caution.md
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path
from typing import Any

import torch

from alpha_tuner.adamstate import adam_step_rms
from research.lm_bench import LMRun, execute
from research.probes._trainer import add_run_arguments, run_seeds
from research.runner import read_records

OUT = Path("benchmarks/results/adam_caution.jsonl")
EVERY = 10


def adam_rms(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> float:
    """Median over ``params`` of :func:`alpha_tuner.adamstate.adam_step_rms` (NaN: not stepped)."""
    values = [v for v in adam_step_rms(optimizer, params, torch.device("cpu")).tolist() if math.isfinite(v)]
    return statistics.median(values) if values else math.nan


def watcher(trace: list[dict[str, Any]]) -> Any:
    """A factory for :func:`execute`'s ``watch``: appends one row to ``trace`` every 10 steps."""
    from transformers import TrainerCallback

    def make(tuner: Any, model: torch.nn.Module) -> list[Any]:
        if tuner is None or tuner.engine.state.law is None:
            raise SystemExit("adam_caution probes the step law: use a steps* method.")
        engine = tuner.engine
        a_params = [t.weight_a for t in engine.targets]
        b_params = [t.weight_b for t in engine.targets]
        w0_norms = [float(t.layer.get_base_layer().weight.float().norm()) for t in engine.targets]

        def displacement() -> float:
            """Median over the layers of ``‖s·B·A‖ / ‖W₀‖``: how far each layer has moved from the
            base weight (B starts at zero), whatever route it took."""
            with torch.no_grad():
                moved = [
                    t.scaling * float((t.weight_b.float() @ t.weight_a.float()).norm()) / w
                    for t, w in zip(engine.targets, w0_norms, strict=True)
                ]
            return statistics.median(moved)

        class Trace(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                if state.global_step % EVERY:
                    return
                law = engine.state.law
                moved = (law.log_alpha - law.log_alpha0).tolist()
                config = engine.step_law
                # What drives the next decision: log target − the EMA of the measured step
                # (medians over the layers; > 0: the law reads the steps as too small).
                a_err = (math.log(config.a_step) - law.log_a_step).tolist()
                u_err = (math.log(config.update) - law.log_update).tolist()
                trace.append({
                    "step": state.global_step,
                    "adam_rms_a": adam_rms(engine.optimizer, a_params),
                    "adam_rms_b": adam_rms(engine.optimizer, b_params),
                    "log_alpha_moved": [min(moved), statistics.median(moved), max(moved)],
                    "log_balance_moved": statistics.median((law.log_balance - law.log_balance0).tolist()),
                    "a_err": statistics.median(a_err),
                    "u_err": statistics.median(u_err),
                    # Layer measurements so far in which the collapse back-off lifted a step.
                    "collapsed": int(law.n_collapsed.sum()),
                    # The distance moved, and the law's EMA of its per-step update u (at the
                    # schedule's peak): a straight path moves ~t·u, a random walk ~√t·u.
                    "displacement": displacement(),
                    "u_bar": statistics.median(torch.exp(law.log_update).tolist()),
                })  # fmt: skip

        return [Trace()]

    return make


def probe(run: LMRun) -> dict[str, Any]:
    """Train ``run`` with the trace on; its benchmark record plus the trace."""
    trace: list[dict[str, Any]] = []
    record = execute(run, watch=watcher(trace))
    keep = ("key", "config", "eval_loss", "train_curve", "alpha_start", "alpha_end", "code", "cpu_capability")
    return {**{k: record[k] for k in keep}, "trace": trace}


def report(path: Path) -> str:
    """One table per recorded run: Adam's step RMS and how far the law moved α, over training."""
    out = ["# Adam's normalised step and the step law's α (`research/probes/adam_caution.py`)", ""]
    for rec in read_records(path):
        out += [f"## {rec['key']}: held-out loss {rec['eval_loss']:.4f}", ""]
        first = rec["trace"][0] if rec["trace"] else {}
        errs = "a_err" in first  # recorded since the errors were
        backoff = "collapsed" in first  # recorded since the collapse back-off was
        moved = "displacement" in first  # recorded since the distance was
        head = "| step | Adam RMS(m̂/√v̂), A | same, B | log(α/α₀): min / median / max | median log(μ/μ₀) |"
        rule = "|---|---|---|---|---|"
        if errs:
            head, rule = head + " median log(a*/ā) | median log(u*/ū) |", rule + "---|---|"
        if backoff:
            head, rule = head + " back-offs so far |", rule + "---|"
        if moved:
            head += " median ‖s·B·A‖/‖W₀‖ | median ū | straightness ‖s·B·A‖/(‖W₀‖·t·ū) |"
            rule += "---|---|---|"
        out += [head, rule]
        for row in rec["trace"]:
            lo, mid, hi = row["log_alpha_moved"]
            out.append(
                f"| {row['step']} | {row['adam_rms_a']:.3f} | {row['adam_rms_b']:.3f} | "
                f"{lo:+.2f} / {mid:+.2f} / {hi:+.2f} | {row['log_balance_moved']:+.2f} |"
                + (f" {row['a_err']:+.2f} | {row['u_err']:+.2f} |" if errs else "")
                + (f" {row['collapsed']} |" if backoff else "")
                + (
                    f" {row['displacement']:.2e} | {row['u_bar']:.2e} |"
                    f" {row['displacement'] / (row['step'] * row['u_bar']):.3f} |"
                    if moved
                    else ""
                )
            )
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    add_run_arguments(parser, out=OUT, model="minilm", rank=4, seeds="107")
    parser.add_argument("--method", default="steps", choices=("steps", "steps-up16", "steps-down16"))
    args = parser.parse_args(argv)
    if args.report:
        target = args.out.with_suffix(".md")
        target.write_text(report(args.out), encoding="utf-8")
        print(f"wrote {target}")
        return 0
    run_seeds(args, probe, method=args.method)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
