"""``alpha-tuner demo``: four LoRA methods fine-tune one model on one task, side by side.

Every method gets the same base model, the same LoRA rank, the same seed (hence the same
LoRA and head initialisation and the same batches), the same base learning rate and the
same held-out examples. It prints a table of held-out loss, accuracy and time per method
and writes ``demo.png`` (training loss, α and drift ratio ρ over training), ``demo.json`` (the
full records) and ``demo.md`` (the table) to the output folder, all three or none.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
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

    lr: float
    steps: int
    batch_size: int
    eval_size: int


DEFAULTS = {
    "minilm": DemoDefaults(lr=2e-5, steps=150, batch_size=8, eval_size=256),
    "smollm2": DemoDefaults(lr=2e-5, steps=20, batch_size=4, eval_size=32),
    "tiny": DemoDefaults(lr=2e-5, steps=20, batch_size=8, eval_size=64),
}


def run_demo(
    *,
    model: str = "minilm",
    rank: int = 16,
    lr: float | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    eval_size: int | None = None,
    seed: int = 0,
    methods: tuple[str, ...] = ("lora", "rslora", "loraplus", "alphatuned"),
    progress: bool = True,
    device: str = "cpu",
) -> dict[str, Any]:
    """Train every method once and return ``{"settings": ..., "records": [...]}``.

    Raises:
        ValueError: For an unknown method.
        alpha_tuner.demo.assets.AssetMissingError: If the model or data is not installed.
    """
    from .models import load_base
    from .train import RunConfig, make_task, run

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"Unknown methods {unknown}; choose from {METHODS}.")
    d = DEFAULTS[model]
    settings: dict[str, Any] = {
        "model": model, "rank": rank, "lr": lr or d.lr, "steps": steps or d.steps,
        "batch_size": batch_size or d.batch_size, "eval_size": eval_size or d.eval_size, "seed": seed,
        "device": device,
    }  # fmt: skip
    start, cpu = time.perf_counter(), time.process_time()
    base = load_base(model)
    task = make_task(base, settings["eval_size"])
    records = []
    for method in methods:
        config = RunConfig(
            model=model, method=method, rank=rank, lr=settings["lr"], seed=seed, steps=settings["steps"],
            batch_size=settings["batch_size"], eval_size=settings["eval_size"],
        )  # fmt: skip
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=config.steps, desc=f"{LABELS[method]:<28}", unit="step", leave=True)

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
    """The result as a Markdown table (method, α start→end, held-out loss and accuracy, time)."""
    s = result["settings"]
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
    cpu = f", {s['total_cpu_s']:.0f} CPU-s" if "total_cpu_s" in s else ""
    lines.append(f"\ntotal {s['total_s']:.0f} s wall{cpu} (model loading included)")
    return "\n".join(lines)


def main(args: Any) -> int:
    """Run the demo from parsed command-line arguments and write the table, PNG and JSON."""
    from .figure import plot_demo

    result = run_demo(
        model=args.model,
        rank=args.rank,
        lr=args.lr,
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
