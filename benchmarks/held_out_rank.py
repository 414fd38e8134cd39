"""A rank the calibration never saw: does the fit of α* = c·r^p on r = 4, 16, 64 predict r = 256?

The library's rule (c = 280 at 2e-5, exponent 1.34, α = c(η)·√r) was set from the MiniLM sweep
on r = 4, 16, 64 (``benchmarks/results/sweep_minilm.jsonl``). The same grid at r = 256, on the
same selection seeds, goes in its own file (``sweep_minilm_r256.jsonl``) so that the calibrated
report stays as it was::

    alpha-tuner sweep grid --ranks 256 --out benchmarks/results/sweep_minilm_r256.jsonl --shard 0/2 &
    alpha-tuner sweep grid --ranks 256 --out benchmarks/results/sweep_minilm_r256.jsonl --shard 1/2
    alpha-tuner sweep bar --ranks 256 --out benchmarks/results/sweep_minilm_r256.jsonl   # held-out seeds
    alpha-tuner sweep report --ranks 256 --out benchmarks/results/sweep_minilm_r256.jsonl
    python benchmarks/held_out_rank.py     # -> benchmarks/results/held_out_rank.md

This script prints, per learning rate, the best α measured at r = 256 (parabola-refined, as in
the report) against three predictions made without it: the three-rank power law c·256^p, the
same at p = ½, and the library's rule; then the power law refitted on all four ranks.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from alpha_tuner.experiments.fit import bootstrap_power_law, cell_table, grid_records, rank_tables
from alpha_tuner.experiments.sweep import SweepSpec, read_records
from alpha_tuner.principled import principled_alpha

RESULTS = Path(__file__).parent / "results"


def report(calibration: Path, held_out: Path, rank: int) -> str:
    """Markdown: measured best α at ``rank`` against the predictions of the calibration ranks."""
    spec = SweepSpec()
    cells = cell_table(grid_records(read_records(calibration), spec.seeds), spec.seeds)
    held = cell_table(grid_records(read_records(held_out), spec.seeds), spec.seeds)
    if not any(c[0] == rank for c in held):
        raise SystemExit(
            f"no complete grid cell at r = {rank} in {held_out}; run the grid first (see --help)."
        )
    lines = [
        f"Held-out rank r = {rank}: best α on the selection seeds {list(spec.seeds)} "
        f"(calibration ranks {sorted({c[0] for c in cells})})",
        "",
        f"| LR | measured α* at r = {rank} | 3-rank fit c·r^p | 3-rank fit at p = ½ | library rule "
        "| p on 3 ranks | p on 4 ranks [90 % interval] |",
        "|---|---|---|---|---|---|---|",
    ]
    for lr in spec.lrs:
        three = rank_tables(cells, lr)
        mine = rank_tables(held, lr).get(rank)
        if len(three) < 2 or mine is None:
            lines.append(f"| {lr:g} | (incomplete) | | | | | |")
            continue
        fit3 = bootstrap_power_law(three)
        fit4 = bootstrap_power_law({**three, rank: mine})
        measured = fit4.alpha_star[rank]
        edge = " (grid edge)" if fit4.censored[rank] else ""
        lines.append(
            f"| {lr:g} | {measured:.4g}{edge} | {fit3.c * rank**fit3.p:.4g} "
            f"| {fit3.c_at_half * math.sqrt(rank):.4g} "
            f"| {principled_alpha(rank, lr):.4g} | {fit3.p:.2f} | {fit4.p:.2f} "
            f"[{fit4.p_interval[0]:.2f}, {fit4.p_interval[1]:.2f}] |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calibration", type=Path, default=RESULTS / "sweep_minilm.jsonl")
    parser.add_argument("--held-out", type=Path, default=RESULTS / "sweep_minilm_r256.jsonl")
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--out", type=Path, default=RESULTS / "held_out_rank.md")
    args = parser.parse_args()
    text = report(args.calibration, args.held_out, args.rank)
    args.out.write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
