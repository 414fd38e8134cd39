"""The command-line options the resumable benchmark scripts share (head_ablation, lifted_head_c, a_lr_probe).

Each script appends one JSON line per finished run to ``--out``, skips the runs already there
(:func:`research.runner.pending_runs`), and with ``--report`` only prints its table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from research.sweep import SweepSpec


def add_arguments(parser: argparse.ArgumentParser, *, out: Path, ranks: str) -> None:
    """``--ranks --seeds --out --shard --threads --model --steps --report`` with these defaults."""
    parser.add_argument("--ranks", default=ranks)
    parser.add_argument("--seeds", default="0,1", help="selection seeds (not the bar's held-out ones)")
    parser.add_argument("--out", type=Path, default=out)
    parser.add_argument("--shard", default="0/1", help="K/N: run every N-th pending run from the K-th")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default="minilm", help="minilm, or tiny for a smoke test")
    parser.add_argument("--steps", type=int, default=SweepSpec.steps)
    parser.add_argument("--report", action="store_true", help="only print the table")


def ints(text: str) -> list[int]:
    """``"4,16"`` → ``[4, 16]``."""
    return [int(x) for x in text.split(",")]


def shard(args: argparse.Namespace) -> tuple[int, int]:
    """``--shard K/N`` as ``(K, N)``."""
    k, n = (int(x) for x in args.shard.split("/"))
    return k, n
