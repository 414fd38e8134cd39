"""One resumable runner for every benchmark: configurations in, one JSON line per finished run out.

A benchmark lists its configurations (anything with a stable ``key()``), and :func:`run_pending`
runs those whose key is not yet in the results file, every N-th from the K-th with ``--shard
K/N``, appending each record as soon as it is done. Workers started with shards ``0/N … N−1/N``
split the work and append to one file; a killed worker loses only its current run.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from alpha_tuner.experiments.sweep import append_line, finite_json, read_records

__all__ = ["Keyed", "add_runner_arguments", "parse_shard", "pending", "read_records", "run_pending"]


class Keyed(Protocol):
    """A configuration with a stable identifier (the resume key)."""

    def key(self) -> str: ...


T = TypeVar("T", bound=Keyed)


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` → ``(K, N)``.

    Raises:
        argparse.ArgumentTypeError: If it is not ``K/N`` with 0 ≤ K < N.
    """
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard must be K/N (e.g. 0/2), got {text!r}") from None
    if not 0 <= k < n:
        raise argparse.ArgumentTypeError(f"--shard K/N needs 0 <= K < N, got {text!r}")
    return k, n


def add_runner_arguments(parser: argparse.ArgumentParser, *, out: Path) -> None:
    """``--out --shard --threads --dry-run`` with this default results file."""
    parser.add_argument("--out", type=Path, default=out, help=f"results file (default {out})")
    parser.add_argument("--shard", type=parse_shard, default=(0, 1), help="K/N: every N-th pending run from K")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    parser.add_argument("--dry-run", action="store_true", help="list the pending runs and stop")


def pending(configs: Iterable[T], out: Path, shard: tuple[int, int] = (0, 1)) -> list[T]:
    """The configurations whose key is not in ``out``, every N-th from the K-th."""
    done = {r.get("key") for r in read_records(out)}
    todo = [c for c in configs if c.key() not in done]
    return todo[shard[0] :: shard[1]]


def run_pending(
    configs: Sequence[T],
    out: Path,
    execute: Callable[[T], dict[str, Any]],
    *,
    shard: tuple[int, int] = (0, 1),
    log: Callable[[str], None] = print,
) -> int:
    """Run the pending configurations of this shard, appending one record per run to ``out``.

    Returns:
        The number of runs made.
    """
    todo = pending(configs, out, shard)
    out.parent.mkdir(parents=True, exist_ok=True)
    for i, config in enumerate(todo, 1):
        start = time.perf_counter()
        record = execute(config)
        record.setdefault("key", config.key())
        append_line(out, json.dumps(finite_json(record), sort_keys=True))
        log(f"[{i}/{len(todo)}] {config.key()}: {time.perf_counter() - start:.0f} s")
    return len(todo)
