"""Probe: AlphaTuned at a small base LR with LoRA's A factors at a larger LR.

``research/probes/factor_motion.py`` shows that at lr 2e-5 the A factors hardly leave their random
initialisation, whatever α is. This probe trains AlphaTuned static (head lifted, as shipped) with
the A factors in their own AdamW group at ``--a-lr`` and everything else at ``--lr``, with α = c
at every rank (``lr_exponent=0``, ``rank_exponent=0``: c is the α itself), on the *selection*
seeds, and prints the mean held-out loss per (rank, c). It is not a default of the library.
Records go to a resumable JSON-lines file.

Usage::

    python -m research.probes.a_lr_probe --shard 0/2 & python -m research.probes.a_lr_probe --shard 1/2
    python -m research.probes.a_lr_probe --report
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from alpha_tuner import AlphaTunedOptimizer
from alpha_tuner.demo.data import batches
from alpha_tuner.demo.models import attach_lora, load_base
from alpha_tuner.demo.train import evaluate, make_task
from research.fit import record_loss
from research.runner import ints
from research.sweep import SweepSpec, read_records

from ._options import parse, probe_parser, run_custom

RESULTS = Path(__file__).parent / "results"


def key(model: str, rank: int, lr: float, a_lr: float, c: float, seed: int) -> str:
    """The resume key of one probe run."""
    return f"{model}|a-lr-probe|r={rank}|lr={lr:g}|a_lr={a_lr:g}|alpha={c:g}|seed={seed}"


def train(
    base: object, task: object, spec: SweepSpec, rank: int, lr: float, a_lr: float, c: float, seed: int
) -> dict:
    """One run like the sweep's, with A in its own group; returns its record."""
    torch.manual_seed(seed)
    model = attach_lora(base, "lora", rank, alpha=None, seed=seed)  # type: ignore[arg-type]
    model.train()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in trainable if "lora_A" in n], "lr": a_lr},
        {"params": [p for n, p in trainable if "lora_A" not in n], "lr": lr},
    ]
    inner = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    optimizer = AlphaTunedOptimizer(inner, model, adapt=False, c=c, lr_exponent=0.0, rank_exponent=0.0)
    start = time.perf_counter()
    for batch in batches(task.train, spec.batch_size, spec.steps, seed=seed):  # type: ignore[attr-defined]
        model(**task.encode(batch)).loss.backward()  # type: ignore[attr-defined]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    loss, accuracy = evaluate(model, task)  # type: ignore[arg-type]
    return {
        "key": key(spec.model, rank, lr, a_lr, c, seed),
        "config": {"model": spec.model, "rank": rank, "lr": lr, "a_lr": a_lr, "alpha": c, "seed": seed},
        "eval_loss": loss,
        "eval_accuracy": accuracy,
        "alphas": sorted(set(optimizer.alphas().values())),
        "wall_s": time.perf_counter() - start,
    }


def report(path: Path, ranks: list[int], seeds: list[int], lr: float, a_lr: float, cs: list[float]) -> str:
    """Mean held-out loss per rank and c over ``seeds``."""
    losses: dict[tuple[int, float], dict[int, float]] = {}
    for rec in read_records(path):
        cfg = rec["config"]
        if cfg["lr"] == lr and cfg["a_lr"] == a_lr and cfg["seed"] in seeds:
            losses.setdefault((cfg["rank"], cfg["alpha"]), {})[cfg["seed"]] = record_loss(rec)
    lines = [
        f"AlphaTuned static, lr {lr:g}, A at {a_lr:g}, head lifted, α = c;"
        f" mean held-out loss over seeds {seeds}",
        "",
        f"| r | {' | '.join(f'α = {c:g}' for c in cs)} |",
        "|---|" + "---|" * len(cs),
    ]
    for r in ranks:
        cells = [losses.get((r, c), {}) for c in cs]
        shown = [f"{statistics.fmean(v.values()):.4f}" if len(v) == len(seeds) else "–" for v in cells]
        lines.append(f"| {r} | {' | '.join(shown)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = probe_parser(__doc__, out=RESULTS / "a_lr_probe.jsonl", ranks="4,16,64")
    parser.add_argument("--a-lr", type=float, default=3.2e-4)
    parser.add_argument("--alphas", default="256,512", help="values of α = c")
    args, spec = parse(parser, argv)
    ranks, seeds = ints(args.ranks), ints(args.seeds)
    cs = [float(x) for x in args.alphas.split(",")]
    if not args.report:

        def execute(pending: Sequence[tuple[int, float, int]]) -> Iterator[dict[str, Any]]:
            base = load_base(spec.model)
            task = make_task(base, spec.eval_size)
            for r, c, s in pending:
                yield train(base, task, spec, r, args.lr, args.a_lr, c, s)

        todo = [(r, c, s) for s in seeds for r in ranks for c in cs]
        run_custom(args, todo, lambda t: key(spec.model, t[0], args.lr, args.a_lr, t[1], t[2]), execute)
    print(report(args.out, ranks, seeds, args.lr, args.a_lr, cs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
