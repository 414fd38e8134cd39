"""``alpha-tuner demo``: four LoRA methods fine-tune one model on one task, side by side.

Every method gets the same base model, the same LoRA rank, the same seed (hence the same
LoRA and head initialisation and the same batches), the same base learning rate and the
same held-out examples. It prints a table of held-out loss, accuracy and time per method
and writes ``demo.png`` (training loss, α and drift ratio ρ over training), ``demo.json`` (the
full records) and ``demo.md`` (the table) to the output folder, all three or none.

With several base learning rates (``--lrs``, the default for SmolLM2) every method runs at each
of them, and the table takes the benchmark's form: held-out loss per method and base LR, the
best method per LR, each method's spread over the LRs (how much the result depends on the LR
the recipe happens to use) and its time per step.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .models import LORAPLUS_RATIO, METHODS, RSLORA_ALPHA

__all__ = ["DEFAULTS", "LABELS", "format_table", "main", "run_demo"]

LABELS = {
    "lora": "vanilla LoRA (α=2r)",
    "rslora": f"rsLoRA (α={RSLORA_ALPHA:g})",
    "loraplus": f"LoRA+ (α=2r, ratio {LORAPLUS_RATIO:g})",
    "alphatuned": "AlphaTuned (defaults)",
    "alphatuned-static": "AlphaTuned (static α)",
}


@dataclass(frozen=True)
class DemoDefaults:
    """Per-model defaults of the demo, sized for about 5 minutes on 2 CPU cores (MiniLM)."""

    lrs: tuple[float, ...]
    steps: int
    batch_size: int
    eval_size: int


DEFAULTS = {
    "minilm": DemoDefaults(lrs=(2e-5,), steps=150, batch_size=8, eval_size=256),
    # The causal LM at two base LRs, in the benchmark's table form, within about 5 minutes.
    "smollm2": DemoDefaults(lrs=(1e-4, 1e-3), steps=15, batch_size=4, eval_size=32),
    "tiny": DemoDefaults(lrs=(2e-5,), steps=20, batch_size=8, eval_size=64),
}


def run_demo(
    *,
    model: str = "minilm",
    rank: int = 16,
    lr: float | None = None,
    lrs: tuple[float, ...] | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    eval_size: int | None = None,
    seed: int = 0,
    methods: tuple[str, ...] = ("lora", "rslora", "loraplus", "alphatuned"),
    progress: bool = True,
    device: str = "cpu",
) -> dict[str, Any]:
    """Train every method once per base LR and return ``{"settings": ..., "records": [...]}``.

    ``lr`` runs one base LR, ``lrs`` several; neither: the model's default LRs.

    Raises:
        ValueError: For an unknown method, or both ``lr`` and ``lrs``.
        alpha_tuner.demo.assets.AssetMissingError: If the model or data is not installed.
    """
    from .models import load_base
    from .train import RunConfig, make_task, run

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"Unknown methods {unknown}; choose from {METHODS}.")
    if lr is not None and lrs:
        raise ValueError("Give one base LR (lr) or several (lrs), not both.")
    d = DEFAULTS[model]
    chosen = (lr,) if lr is not None else tuple(lrs or d.lrs)
    settings: dict[str, Any] = {
        "model": model, "rank": rank, "lr": chosen[0], "lrs": list(chosen), "steps": steps or d.steps,
        "batch_size": batch_size or d.batch_size, "eval_size": eval_size or d.eval_size, "seed": seed,
        "device": device,
    }  # fmt: skip
    start, cpu = time.perf_counter(), time.process_time()
    base = load_base(model)
    task = make_task(base, settings["eval_size"])
    records = []
    for base_lr, method in ((x, m) for x in chosen for m in methods):
        config = RunConfig(
            model=model, method=method, rank=rank, lr=base_lr, seed=seed, steps=settings["steps"],
            batch_size=settings["batch_size"], eval_size=settings["eval_size"],
        )  # fmt: skip
        bar = None
        if progress:
            from tqdm.auto import tqdm

            desc = LABELS[method] if len(chosen) == 1 else f"{LABELS[method]}, lr {base_lr:g}"
            bar = tqdm(total=config.steps, desc=f"{desc:<28}", unit="step", leave=True)

        def tick(step: int, loss: float, bar: Any = bar) -> None:
            if bar is not None:
                bar.update()
                if step % 10 == 0:
                    bar.set_postfix(loss=f"{loss:.4f}")

        records.append(run(config, base, task, on_step=tick, device=device))
        if bar is not None:
            bar.close()
    settings["total_s"] = time.perf_counter() - start
    settings["total_cpu_s"] = time.process_time() - cpu  # all threads; a busy machine barely changes it
    return {"settings": settings, "records": records}


def format_table(result: dict[str, Any]) -> str:
    """The result as a Markdown table: with one base LR, method, α start→end, held-out loss and
    accuracy, and time; with several, :func:`format_lr_table`."""
    s = result["settings"]
    if len(s.get("lrs", [s["lr"]])) > 1:
        return format_lr_table(result)
    lines = [
        f"{s['model']}, r={s['rank']}, lr={s['lr']:g}, {s['steps']} steps × batch {s['batch_size']}, "
        f"{s['eval_size']} held-out examples, seed {s['seed']}",
        "",
        "| method | α (start → end) | held-out loss | accuracy | time (s) |",
        "|---|---|---|---|---|",
    ]
    for rec in result["records"]:
        method = rec["config"]["method"]
        alpha = f"{rec['alpha_start']:.4g} → {rec['alpha_end']:.4g}"
        lines.append(
            f"| {LABELS[method]} | {alpha} | {rec['eval_loss']:.4f} | {rec['eval_accuracy']:.3f} "
            f"| {rec['wall_s']:.1f} |"
        )
    return "\n".join(lines) + _totals(s)


def format_lr_table(result: dict[str, Any]) -> str:
    """Held-out loss per method (rows) and base LR (columns), the benchmark's form.

    Also: the best method at each LR, each method's spread over the LRs (largest / smallest
    loss − 1; ``diverged`` counts as infinite) and its median time per training step.
    """
    s = result["settings"]
    lrs = [float(x) for x in s["lrs"]]
    loss: dict[str, dict[float, float]] = {}
    step_s: dict[str, list[float]] = {}
    for rec in result["records"]:
        method, value = rec["config"]["method"], rec["eval_loss"]
        loss.setdefault(method, {})[float(rec["config"]["lr"])] = value if _finite(value) else math.inf
        step_s.setdefault(method, []).append(rec["train_s"] / max(rec["config"]["steps"], 1))
    header = " | ".join(f"lr {x:g}" for x in lrs)
    lines = [
        f"{s['model']}, r={s['rank']}, {s['steps']} steps × batch {s['batch_size']}, "
        f"{s['eval_size']} held-out examples, seed {s['seed']}; held-out loss (lower is better)",
        "",
        f"| method | {header} | spread over LRs | s/step |",
        "|---|" + "---|" * (len(lrs) + 2),
    ]
    for method, by_lr in loss.items():
        cells = " | ".join(_cell(by_lr.get(x, math.nan)) for x in lrs)
        values = [by_lr[x] for x in lrs if x in by_lr]
        spread = (
            "–"
            if len(values) < 2
            else ("∞" if math.isinf(max(values)) else f"{max(values) / min(values) - 1:.1%}")
        )
        lines.append(f"| {LABELS[method]} | {cells} | {spread} | {statistics.median(step_s[method]):.2f} |")
    best = []
    for x in lrs:
        ranked = sorted((by_lr[x], m) for m, by_lr in loss.items() if x in by_lr and not math.isinf(by_lr[x]))
        best.append(LABELS[ranked[0][1]] if ranked else "–")
    lines.append(f"| best | {' | '.join(best)} | | |")
    return "\n".join(lines) + _totals(s)


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _cell(value: float) -> str:
    return "diverged" if math.isinf(value) else ("–" if math.isnan(value) else f"{value:.4f}")


def _totals(s: dict[str, Any]) -> str:
    cpu = f", {s['total_cpu_s']:.0f} CPU-s" if "total_cpu_s" in s else ""
    return f"\n\ntotal {s['total_s']:.0f} s wall{cpu} (model loading included)"


def main(args: Any) -> int:
    """Run the demo from parsed command-line arguments and write the table, PNG and JSON."""
    from .figure import plot_demo

    result = run_demo(
        model=args.model,
        rank=args.rank,
        lr=args.lr,
        lrs=args.lrs,
        steps=args.steps,
        batch_size=args.batch_size,
        eval_size=args.eval_size,
        seed=args.seed,
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        progress=not args.no_progress,
        device=args.device,
    )
    out: Path = args.out
    table = format_table(result)
    with staged_outputs(out, ("demo.json", "demo.png", "demo.md")) as staged:
        staged["demo.json"].write_text(json.dumps(result, indent=1, default=float) + "\n", encoding="utf-8")
        plot_demo(result, staged["demo.png"], labels=LABELS)
        staged["demo.md"].write_text(table + "\n", encoding="utf-8")
    print(table)
    print(f"\nwrote {out / 'demo.png'}, {out / 'demo.json'} and {out / 'demo.md'}")
    return 0


@contextlib.contextmanager
def staged_outputs(folder: Path, names: tuple[str, ...]) -> Iterator[dict[str, Path]]:
    """Paths to write ``names`` to, moved into ``folder`` together only if the block completes.

    The files are written under temporary names in ``folder`` and renamed at the end (each
    rename is atomic); an exception or Ctrl-C inside the block removes them, so the folder never
    holds a half-written or partial set of outputs.
    """
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=folder))
    staged = {name: tmp / name for name in names}
    try:
        yield staged
        for name, path in staged.items():
            os.replace(path, folder / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
