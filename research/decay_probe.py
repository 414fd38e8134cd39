"""What the LR schedule's decay is worth on the 150-step sentiment task, beside schedule-free AdamW.

The 150-step MiniLM task runs at a constant LR. There schedule-free AdamW at lr 1e-3, whose
iterate averaging acts like a decaying LR, ends well ahead of the law and of the oracle cell.
This probe reruns the law (lr 1e-4) and each rank's oracle cell (chosen on the selection seeds
at the constant LR) under the Trainer's warm-up + linear decay, on the same held-out seeds, and
gives per rank, as paired gaps (mean ± SE over the seeds; negative = the first is better):

* the law and the oracle cell: linear decay against the constant LR;
* under linear decay: the law against the oracle cell (the same (α, LR), not re-chosen);
* the law against schedule-free AdamW at lr 1e-3, at the constant LR and under linear decay.

Usage::

    python -m research.decay_probe   # writes benchmarks/results/decay_probe.md

The runs (``M`` as in benchmarks/FINDINGS.md: ``python -m research.lm_bench --model minilm --steps 150
--out benchmarks/results/minilm150_bench.jsonl``)::

    $M --schedule linear --warmup 0.1 --stage heldout --seeds 100,101,102,103 --ranks 4,16,64 \\
       --methods steps --lrs 1e-4
    $M --schedule linear --warmup 0.1 --stage heldout --seeds 100,101,102,103 --ranks 4 \\
       --methods lora --recipe-alphas 8 --lrs 1e-3      # and r = 16, 64: α = 128, lr 1e-4
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .bench_report import format_gap, losses_by_seed
from .bench_report import paired_relative as paired
from .lm_bench import setting_records

RESULTS = Path("benchmarks/results/minilm150_bench.jsonl")
OUT = Path("benchmarks/results/decay_probe.md")
SEEDS = (100, 101, 102, 103)
SELECTION_SEEDS = (0, 1)
LAW_LR = 1e-4
SCHEDULE_FREE_LR = 1e-3

Record = Mapping[str, Any]
Losses = dict[int, float]


def _mean(losses: Losses, seeds: Sequence[int]) -> str:
    values = [losses[s] for s in seeds if s in losses]
    return f"{statistics.fmean(values):.4f} ({len(values)})" if values else "–"


def probe_rows(
    records: Sequence[Record], oracle: Mapping[int, tuple[float, float]], seeds: Sequence[int] = SEEDS
) -> list[list[str]]:
    """One row per rank with an oracle cell and a law run under linear decay: the figures of
    :func:`format_probe`'s table, as text."""
    rows = []
    for rank in sorted(oracle):
        alpha, lr = oracle[rank]
        law_c, law_l = (
            losses_by_seed(
                records, method="steps", rank=rank, lr=LAW_LR, alpha=None, tag="", schedule=schedule
            )
            for schedule in ("constant", "linear")
        )
        cell_c, cell_l = (
            losses_by_seed(records, method="lora", rank=rank, lr=lr, alpha=alpha, schedule=schedule)
            for schedule in ("constant", "linear")
        )
        if not any(s in law_l for s in seeds):
            continue
        free = losses_by_seed(
            records, method="schedulefree", rank=rank, lr=SCHEDULE_FREE_LR, schedule="constant"
        )
        rows.append([
            str(rank), f"α = {alpha:g}, lr {lr:g}",
            _mean(law_c, seeds), _mean(law_l, seeds), format_gap(paired(law_l, law_c, seeds)),
            _mean(cell_c, seeds), _mean(cell_l, seeds), format_gap(paired(cell_l, cell_c, seeds)),
            format_gap(paired(law_l, cell_l, seeds)),
            _mean(free, seeds),
            format_gap(paired(law_c, free, seeds)), format_gap(paired(law_l, free, seeds)),
        ])  # fmt: skip
    return rows


def format_probe(records: Sequence[Record], oracle: Mapping[int, tuple[float, float]]) -> str:
    """The probe's table, as Markdown, with its header."""
    head = [
        "r", "oracle cell (constant LR)", "the law, constant", "the law, linear", "linear vs constant",
        "oracle cell, constant", "oracle cell, linear", "linear vs constant",
        "linear: the law vs the oracle cell", f"schedule-free (lr {SCHEDULE_FREE_LR:g})",
        "the law vs schedule-free: constant", "linear",
    ]  # fmt: skip
    lines = [
        "## The LR schedule's decay on the 150-step sentiment task",
        "",
        f"Held-out loss (mean (seeds)) and paired gaps, mean ± SE over seeds {list(SEEDS)}; the law at "
        f"lr {LAW_LR:g} from α = 2r; negative = the first named is better. `python -m research.decay_probe`.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *("| " + " | ".join(row) + " |" for row in probe_rows(records, oracle)),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write :data:`OUT` from :data:`RESULTS` and print it."""
    parser = argparse.ArgumentParser(
        prog="python -m research.decay_probe", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    constant, linear = (
        setting_records(
            args.results, model="minilm", steps=150, schedule=schedule, selection_seeds=SELECTION_SEEDS
        )
        for schedule in ("constant", "linear")
    )
    if constant is None or linear is None:
        parser.exit(2, f"research.decay_probe: {args.results} lacks the 150-step MiniLM runs at a constant "
                       "LR or under linear decay; run the commands in this module's docstring\n")  # fmt: skip
    every = [*constant.records, *linear.records]
    oracle = constant.oracle
    text = format_probe(every, oracle)
    args.out.write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
