"""One resumable runner for every benchmark: configurations in, one JSON line per finished run out.

A benchmark lists its configurations (anything with a stable ``key()``), and :func:`run_pending`
runs those whose key is not yet in the results file, every N-th from the K-th with ``--shard
K/N``, appending each record as soon as it is done. Workers started with shards ``0/N … N−1/N``
split the work and append to one file; a killed worker loses only its current run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

__all__ = [
    "Keyed",
    "add_runner_arguments",
    "append_line",
    "end_with_newline",
    "finite_json",
    "ints",
    "parse_shard",
    "pending",
    "pending_runs",
    "read_records",
    "run_pending",
]


class Keyed(Protocol):
    """A configuration with a stable identifier (the resume key)."""

    def key(self) -> str: ...


K = TypeVar("K", bound=Keyed)
T = TypeVar("T")


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file; a torn last line (a killed writer) is ignored."""
    if not path.exists():
        return []
    records = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def finite_json(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (strict JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    return value


def end_with_newline(path: Path) -> None:
    """Terminate a torn last line (a killed writer), so the next record starts a line of its own."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb+") as fh:
        fh.seek(-1, os.SEEK_END)
        if fh.read(1) != b"\n":
            fh.write(b"\n")


def append_line(path: Path, line: str) -> None:
    """Append ``line`` and a newline to ``path`` in one ``O_APPEND`` write, then fsync.

    One write call per record keeps the lines of several workers (``--shard``) whole when they
    append to the same file.
    """
    data = (line + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def ints(text: str) -> list[int]:
    """``"4,16"`` → ``[4, 16]`` (an argparse type for lists of ranks or seeds)."""
    return [int(x) for x in text.split(",") if x]


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


def add_runner_arguments(parser: argparse.ArgumentParser, *, out: Path | None) -> None:
    """``--out --shard --threads --dry-run`` with this default results file (``None``: the caller's)."""
    parser.add_argument("--out", type=Path, default=out, help=f"results file (default {out or 'per task'})")
    parser.add_argument(
        "--shard", type=parse_shard, default=(0, 1), help="K/N: every N-th pending run from K"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    parser.add_argument("--dry-run", action="store_true", help="list the pending runs and stop")


def pending_runs(
    runs: Iterable[T], path: Path, *, key: Callable[[T], str], shard: tuple[int, int] | None = None
) -> list[T]:
    """The runs whose ``key`` is not yet in ``path``; with ``shard = (K, N)`` every N-th from the K-th.

    N workers started together with shards 0/N … (N−1)/N split the pending runs between them.
    """
    done = {r.get("key") for r in read_records(path)}
    todo = [run for run in runs if key(run) not in done]
    return todo[shard[0] :: shard[1]] if shard is not None else todo


def pending(configs: Iterable[K], out: Path, shard: tuple[int, int] = (0, 1)) -> list[K]:
    """The configurations whose ``key()`` is not in ``out``, every N-th from the K-th."""
    return pending_runs(configs, out, key=lambda c: c.key(), shard=shard)


def run_pending(
    configs: Sequence[K],
    out: Path,
    execute: Callable[[K], dict[str, Any]],
    *,
    shard: tuple[int, int] = (0, 1),
    log: Callable[[str], None] = print,
) -> int:
    """Run the pending configurations of this shard, appending one record per run to ``out``.

    A run that another worker recorded since the list was drawn is skipped, so workers whose
    shards were drawn at different times never run the same configuration twice.

    Returns:
        The number of runs made.
    """
    todo = pending(configs, out, shard)
    out.parent.mkdir(parents=True, exist_ok=True)
    made = 0
    for i, config in enumerate(todo, 1):
        if config.key() in {r.get("key") for r in read_records(out)}:
            log(f"[{i}/{len(todo)}] {config.key()}: done by another worker, skipped")
            continue
        made += 1
        start = time.perf_counter()
        record = execute(config)
        record.setdefault("key", config.key())
        append_line(out, json.dumps(finite_json(record), sort_keys=True))
        log(f"[{i}/{len(todo)}] {config.key()}: {time.perf_counter() - start:.0f} s")
    return made
