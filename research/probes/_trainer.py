"""What the probes that train one benchmark run through the Trainer share (adam_caution, hypergrad,
sensitivity).

Each appends one JSON line per finished run to ``--out``, skips the runs already there, and with
``--report`` only writes its table.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from research.lm_bench import TASK_DEFAULTS, LMRun
from research.runner import append_line, finite_json, read_records


def add_run_arguments(
    parser: argparse.ArgumentParser, *, out: Path, model: str, rank: int, seeds: str
) -> None:
    """``--model --rank --seeds --lr --steps --schedule --warmup --tag --out --report`` with these
    defaults."""
    parser.add_argument("--model", default=model, choices=sorted(TASK_DEFAULTS))
    parser.add_argument("--rank", type=int, default=rank)
    parser.add_argument("--seeds", default=seeds)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument(
        "--steps", type=int, help="default: the task's (600 minilm, 300 smollm2, 150 debates and party)"
    )
    parser.add_argument("--schedule", help="the LR schedule (default: the task's; constant, linear, cosine)")
    parser.add_argument("--warmup", type=float, help="the warm-up fraction (default: LMRun's, 0.1)")
    parser.add_argument("--tag", default="")
    parser.add_argument("--out", type=Path, default=out)
    parser.add_argument("--report", action="store_true", help="write the table next to --out, run nothing")


def run_seeds(
    args: argparse.Namespace,
    probe: Callable[[LMRun], dict[str, Any]],
    *,
    key_suffix: str = "",
    **fields: Any,
) -> None:
    """Run ``probe`` on the task's run of every seed in ``args.seeds`` not yet in ``args.out``.

    ``fields`` are further :class:`LMRun` fields (``method``, ``alpha``); a record's key is its
    run's key plus ``key_suffix`` (for a probe setting that is not a run field).
    """
    done = {r["key"] for r in read_records(args.out)}
    d = TASK_DEFAULTS[args.model]
    torch.set_num_threads(1)
    for seed in (int(s) for s in args.seeds.split(",")):
        run = LMRun(
            rank=args.rank, lr=args.lr, seed=seed, steps=args.steps or d.steps, batch_size=d.batch_size,
            block=d.block, schedule=args.schedule or d.schedule, model=args.model, tag=args.tag,
            **({} if args.warmup is None else {"warmup": args.warmup}), **fields,
        )  # fmt: skip
        key = run.key() + key_suffix
        if key in done:
            continue
        record = probe(run)
        record["key"] = key
        append_line(args.out, json.dumps(finite_json(record)))


#: A probe's watcher factory: ``(trace, every)`` → :func:`research.lm_bench.execute`'s ``watch``.
WatcherFactory = Callable[[list[dict[str, Any]], int], Any]
_KEEP = ("key", "config", "eval_loss", "train_curve", "code", "cpu_capability", "cpu")


def law_alpha(tuner: Any) -> torch.Tensor | None:
    """A copy of the step law's per-layer log α now; ``None`` for a peer or a tuner without the law."""
    law = None if tuner is None else tuner.engine.state.law
    return None if law is None else law.log_alpha.clone()


def unrescaled(before: torch.Tensor | None, now: torch.Tensor | None) -> bool:
    """No control step rescaled the factors between two reads of :func:`law_alpha` (or there is
    no law to rescale them), so a parameter difference between the reads is an optimizer step."""
    return before is None or now is None or torch.equal(before, now)


def traced_run(run: LMRun, watcher: WatcherFactory, every: int) -> dict[str, Any]:
    """Train ``run`` with ``watcher``'s trace on: its benchmark record's main fields, ``every``
    and the ``trace`` rows."""
    from research.lm_bench import execute

    trace: list[dict[str, Any]] = []
    record = execute(run, watch=watcher(trace, every))
    return {**{k: record[k] for k in _KEEP}, "every": every, "trace": trace}


def trace_probe_main(
    argv: list[str] | None,
    *,
    doc: str | None,
    out: Path,
    watcher: WatcherFactory,
    every: int,
    report: Callable[[Path], str],
) -> int:
    """The command line of a probe that traces a run every ``every`` steps (hypergrad,
    sensitivity): train the seeds' runs of any lm_bench method, or ``--report`` its table."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n")[0])
    add_run_arguments(parser, out=out, model="debates", rank=8, seeds="0")
    parser.add_argument("--method", default="steps", help="any lm_bench method (default: the law)")
    parser.add_argument("--alpha", type=float, help="plain LoRA's α (default: the recipe's)")
    parser.add_argument("--every", type=int, default=every, help=f"sample every N steps (default {every})")
    args = parser.parse_args(argv)
    if args.report:
        target = args.out.with_suffix(".md")
        target.write_text(report(args.out), encoding="utf-8")
        print(target.read_text(encoding="utf-8"))
        return 0
    run_seeds(
        args, lambda run: traced_run(run, watcher, args.every), key_suffix=f"|every={args.every}",
        method=args.method, alpha=args.alpha,
    )  # fmt: skip
    return 0


def traced_records(path: Path) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Each record of a probe's results file that has trace rows, with those rows."""
    for record in read_records(path):
        if record["trace"]:
            yield record, record["trace"]


def run_parts(
    record: Mapping[str, Any], rows: list[dict[str, Any]], parts: int
) -> list[list[dict[str, Any]]]:
    """``rows`` split into ``parts`` equal stretches of ``record``'s run by their ``step`` (a row
    at a boundary closes the earlier stretch)."""
    n = record["config"]["steps"]
    return [[r for r in rows if k * n / parts < r["step"] <= (k + 1) * n / parts] for k in range(parts)]


def run_cells(record: Mapping[str, Any]) -> str:
    """A probe table's first two cells for one record: its run (the key, ``·`` for ``|``) and
    its held-out loss."""
    return f"| {record['key'].replace('|', ' · ')} | {record['eval_loss']:.4f} |"
