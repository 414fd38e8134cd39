"""The bar's gap to the oracle at the small LR, on any set of held-out seeds.

``alpha-tuner sweep report`` scores the bar on the sweep's held-out seeds (100–103), where every
method ran. This script gives the part of the bar that compares AlphaTuned with the grid's best
cell (the oracle) on another set of seeds, for instance the four held-out seeds together with
the confirmation seeds 104–107 on which only AlphaTuned at the smallest LR and the oracle ran::

    alpha-tuner sweep bar --heldout-seeds 104,105,106,107 --lrs 2e-5 \\
        --methods alphatuned-static,alphatuned,oracle
    python -m research.probes.oracle_gap --seeds 104,105,106,107
    python -m research.probes.oracle_gap --seeds 100,101,102,103,104,105,106,107

``--lr`` scores AlphaTuned at another of the sweep's learning rates against the same oracle.
Per AlphaTuned variant and rank: the relative gap of the mean held-out loss to the oracle's, the
paired gap of each seed and its standard error (:func:`research.fit.paired_gap`).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from research.report import oracle_gaps
from research.sweep import SweepSpec, read_records, tuner_tag

RESULTS = Path(__file__).parent / "results"
VARIANTS = {"alphatuned-static": "static", "alphatuned": "adaptive"}


def table(records: list[dict], spec: SweepSpec, lr: float | None = None) -> str:
    """A markdown table of :func:`oracle_gaps` at ``lr`` (default: the smallest) on the held-out seeds."""
    gaps = oracle_gaps(records, spec, lr)
    seeds = ", ".join(str(s) for s in spec.heldout_seeds)
    at = min(spec.lrs) if lr is None else lr
    lines = [
        f"AlphaTuned ({tuner_tag()}) at lr {at:g} against each rank's oracle cell, held-out seeds {seeds}",
        "",
        "| r | variant | mean loss gap | per-seed gaps (%) | standard error | oracle loss (LR) |",
        "|---|---|---|---|---|---|",
    ]
    for variant, name in VARIANTS.items():
        for rank, g in sorted(gaps.get(variant, {}).items()):
            paired = ", ".join(f"{100 * x:+.1f}" for x in g["paired"])
            lines.append(
                f"| {rank} | {name} | {100 * g['gap']:+.2f} % | {paired} | {100 * g['se']:.2f} % |"
                f" {g['oracle']:.4f} ({g['oracle_lr']:g}) |"
            )
    if len(lines) == 4:
        lines.append("| – | no rank has AlphaTuned and oracle runs on every one of these seeds | | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "sweep_minilm.jsonl", help="sweep results")
    parser.add_argument("--seeds", required=True, help="held-out seeds, e.g. 100,101,102,103")
    parser.add_argument(
        "--lr", type=float, default=None, help="AlphaTuned's LR (default: the sweep's smallest)"
    )
    args = parser.parse_args(argv)
    spec = replace(SweepSpec(), heldout_seeds=tuple(int(x) for x in args.seeds.split(",")))
    print(table(read_records(args.out), spec, args.lr))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
