"""Leave one rank out: does a fit on the other ranks of the sweep predict the best α at this one?

The sweep's grid (``benchmarks/results/sweep_minilm.jsonl``) covers r = 4, 16, 64 and 256. This
script leaves one rank (default 256, the largest) out of the calibration and prints, per
learning rate, the best α measured there (parabola-refined, as in the sweep report) against
what the other ranks predict:

* the per-LR power law ``c·r^p`` fitted on the other ranks, and the same at p = ½;
* the joint rule of :mod:`research.rule_fit` (``α = c(η)·r^p(η)``, the library's
  form) fitted on the other ranks' points only;
* the library's rule now (fitted on every rank, so not a prediction);

then the per-LR exponent p refitted with every rank. Usage::

    python -m research.probes.held_out_rank              # -> benchmarks/results/held_out_rank.md
    python -m research.probes.held_out_rank --rank 4
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from alpha_tuner.principled import REFERENCE_LR, principled_alpha
from research.fit import bootstrap_power_law, cell_table, grid_records, rank_tables
from research.rule_fit import bootstrap_rule, rule_alpha
from research.sweep import SweepSpec, read_records

RESULTS = Path(__file__).parent / "results"


def report(results: Path, rank: int) -> str:
    """Markdown: measured best α at ``rank`` against the predictions of the other ranks."""
    spec = SweepSpec()
    cells = cell_table(grid_records(read_records(results), spec.seeds), spec.seeds)
    if not any(c[0] == rank for c in cells):
        raise SystemExit(
            f"no complete grid cell at r = {rank} in {results}; run the grid first (see --help)."
        )
    others = {c: v for c, v in cells.items() if c[0] != rank}
    tables = {lr: t for lr in spec.lrs if len(t := rank_tables(others, lr)) >= 2}
    joint = bootstrap_rule(tables, reference_lr=REFERENCE_LR, n_boot=200).params if len(tables) >= 2 else None
    lines = [
        f"Held-out rank r = {rank}: best α on the selection seeds {list(spec.seeds)}, against fits "
        f"on the other ranks {sorted({c[0] for c in others})}",
        "",
        f"| LR | measured α* at r = {rank} | other ranks' fit c·r^p | the same at p = ½ "
        "| joint rule fitted on the other ranks | library rule (all ranks) | p, other ranks "
        "| p, all ranks [90 % interval] |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for lr in spec.lrs:
        rest = rank_tables(others, lr)
        mine = rank_tables(cells, lr).get(rank)
        if len(rest) < 2 or mine is None:
            lines.append(f"| {lr:g} | (incomplete) | | | | | | |")
            continue
        fit_rest = bootstrap_power_law(rest)
        fit_all = bootstrap_power_law({**rest, rank: mine})
        measured = fit_all.alpha_star[rank]
        edge = " (grid edge)" if fit_all.censored[rank] else ""
        predicted = "–" if joint is None else f"{rule_alpha(rank, lr, joint):.4g}"
        lines.append(
            f"| {lr:g} | {measured:.4g}{edge} | {fit_rest.c * rank**fit_rest.p:.4g} "
            f"| {fit_rest.c_at_half * math.sqrt(rank):.4g} | {predicted} "
            f"| {principled_alpha(rank, lr):.4g} | {fit_rest.p:.2f} | {fit_all.p:.2f} "
            f"[{fit_all.p_interval[0]:.2f}, {fit_all.p_interval[1]:.2f}] |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--results", type=Path, default=RESULTS / "sweep_minilm.jsonl")
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--out", type=Path, default=RESULTS / "held_out_rank.md")
    args = parser.parse_args()
    text = report(args.results, args.rank)
    args.out.write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
