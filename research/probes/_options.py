"""The command-line options the resumable benchmark scripts share (head_ablation, lifted_head_c, a_lr_probe).

Each script appends one JSON line per finished run to ``--out``, skips the runs already there
(:func:`research.runner.pending_runs`), and with ``--report`` only prints its table.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from alpha_tuner.demo.train import RunConfig
from research.runner import append_line, finite_json, parse_shard, pending_runs
from research.sweep import SweepSpec, run_configs


def probe_parser(doc: str | None, *, out: Path, ranks: str, lr: float = 2e-5) -> argparse.ArgumentParser:
    """A parser with the shared options and these defaults (``doc``'s first line as description)."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n")[0])
    add_arguments(parser, out=out, ranks=ranks)
    parser.add_argument("--lr", type=float, default=lr, help=f"base learning rate (default {lr:g})")
    return parser


def add_arguments(parser: argparse.ArgumentParser, *, out: Path, ranks: str) -> None:
    """``--ranks --seeds --out --shard --threads --model --steps --report`` with these defaults."""
    parser.add_argument("--ranks", default=ranks)
    parser.add_argument("--seeds", default="0,1", help="selection seeds (not the bar's held-out ones)")
    parser.add_argument("--out", type=Path, default=out)
    parser.add_argument(
        "--shard", type=parse_shard, default=(0, 1), help="K/N: run every N-th pending run from the K-th"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default="minilm", help="minilm, or tiny for a smoke test")
    parser.add_argument("--steps", type=int, default=SweepSpec.steps)
    parser.add_argument("--report", action="store_true", help="only print the table")


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, SweepSpec]:
    """Parse the probe's command line; set the torch threads unless only reporting."""
    args = parser.parse_args(argv)
    if not args.report:
        torch.set_num_threads(args.threads)
    return args, SweepSpec(model=args.model, steps=args.steps)


def run_sweep_configs(args: argparse.Namespace, todo: Iterable[tuple[RunConfig, dict[str, Any]]]) -> None:
    """Run this shard's pending ``(config, tuner options)`` pairs through the sweep's loop."""
    todo = list(todo)
    options = {cfg.key(): opts for cfg, opts in todo}
    pending = pending_runs([cfg for cfg, _ in todo], args.out, key=RunConfig.key, shard=args.shard)
    for record in run_configs(pending, args.out, progress=False, tuner_options=options):
        print(f"{record['key']}: {record['eval_loss']:.4f}", file=sys.stderr, flush=True)


def run_custom(
    args: argparse.Namespace,
    todo: Sequence[Any],
    key: Callable[[Any], str],
    execute: Callable[[Sequence[Any]], Iterable[dict[str, Any]]],
) -> None:
    """Run this shard's pending items with the probe's own loop; one JSON line per record."""
    pending = pending_runs(todo, args.out, key=key, shard=args.shard)
    if not pending:
        return
    for record in execute(pending):
        append_line(args.out, json.dumps(finite_json(record), sort_keys=True))
        print(f"{record['key']}: {record['eval_loss']:.4f}", file=sys.stderr, flush=True)
