"""Calibration of c in the configuration that ships: AlphaTuned static with the head lifted.

The sweep's grid (``alpha-tuner sweep grid``) calibrates α with plain LoRA, whose classifier
head trains at the base LR; AlphaTuned gives the head a learning rate of at least ``HEAD_LR``.
This script runs AlphaTuned static at one LR with the head lifted and an explicit ``c`` (the
rule's α at ``reference_lr``; with the rank-free rule α = c at every rank) for each
coefficient, rank and *selection* seed, and prints the mean held-out loss per (rank, c) next to
the grid's best cell of the rank (the oracle, same seeds). Records go to a resumable JSON-lines
file; the tag of each names c and the head's LR, so runs under other settings never collide.

Usage::

    python -m research.probes.lifted_head_c --shard 0/2 &   # two workers on one file
    python -m research.probes.lifted_head_c --shard 1/2
    python -m research.probes.lifted_head_c --report        # only the table, from the file
"""

from __future__ import annotations

import statistics
from pathlib import Path

from alpha_tuner.demo.train import RunConfig
from alpha_tuner.heads import HEAD_LR
from alpha_tuner.principled import LR_EXPONENT, REFERENCE_LR
from research.fit import cell_table, grid_oracle, record_loss
from research.runner import ints
from research.sweep import SweepSpec, read_records

from ._options import parse, probe_parser, run_sweep_configs

RESULTS = Path(__file__).parent / "results"


def tag(c: float, lr: float = REFERENCE_LR) -> str:
    """The resume key's tag of a run with coefficient ``c``, rank exponent 0 and the head lifted.

    Away from ``REFERENCE_LR`` the run's α also depends on ``LR_EXPONENT``, which the tag then names.
    """
    q = f",q={LR_EXPONENT:g}" if lr != REFERENCE_LR else ""
    return f"lifted:c={c:g}@{REFERENCE_LR:g}{q},p=0,head={HEAD_LR:g}"


def tuner_options(c: float) -> dict[str, float]:
    """The wrapper's options of a run: the rule with coefficient ``c`` and rank exponent 0."""
    return {"c": c, "rank_exponent": 0.0, "rank_exponent_slope": 0.0}


def configs(
    spec: SweepSpec, ranks: list[int], seeds: list[int], lr: float, coefficients: list[float]
) -> list[tuple[RunConfig, float]]:
    """Every (run, c), seed-major so that a partial run covers every cell once first."""
    return [
        (spec.base(method="alphatuned-static", rank=r, lr=lr, seed=s, tag=tag(c, lr)), c)
        for s in seeds
        for r in ranks
        for c in coefficients
    ]


def report(
    path: Path, sweep_path: Path, spec: SweepSpec, ranks: list[int], seeds: list[int], lr: float,
    coefficients: list[float],
) -> str:  # fmt: skip
    """A markdown table: mean held-out loss per rank and c, the best c, and the oracle cell."""
    tags = {tag(c, lr): c for c in coefficients}
    losses: dict[tuple[int, float], dict[int, float]] = {}
    for rec in read_records(path):
        cfg = rec["config"]
        if cfg["lr"] == lr and cfg["seed"] in seeds and cfg["tag"] in tags:
            losses.setdefault((cfg["rank"], tags[cfg["tag"]]), {})[cfg["seed"]] = record_loss(rec)
    grid = [r for r in read_records(sweep_path) if r["config"]["method"] == "lora" and not r["config"]["tag"]]
    oracle = grid_oracle(grid, seeds, n_cells=len(spec.lrs) * len(spec.coefficients))
    cells = cell_table(grid, seeds)
    lines = [
        f"AlphaTuned static at lr {lr:g}, head at ≥ {HEAD_LR:g}, rank-free α = c;"
        f" mean held-out loss over seeds {seeds} (gap to the oracle in brackets)",
        "",
        f"| r | {' | '.join(f'c = {c:g}' for c in coefficients)} | best c | oracle (α, LR) |",
        "|---|" + "---|" * (len(coefficients) + 2),
    ]
    for r in ranks:
        o = None
        if r in oracle:
            alpha, lr_ = oracle[r]
            o = statistics.fmean(cells[(r, lr_, alpha)])
        means = {
            c: statistics.fmean(losses[(r, c)].values())
            for c in coefficients
            if len(losses.get((r, c), {})) == len(seeds)
        }
        shown = [
            "–" if c not in means else f"{means[c]:.4f}" + (f" ({means[c] / o - 1:+.1%})" if o else "")
            for c in coefficients
        ]
        best = f"{min(means, key=means.__getitem__):g}" if means else "–"
        cell = f"{o:.4f} ({oracle[r][0]:g}, {oracle[r][1]:g})" if o is not None else "–"
        lines.append(f"| {r} | {' | '.join(shown)} | {best} | {cell} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = probe_parser(__doc__, out=RESULTS / "lifted_head_c.jsonl", ranks="4,16,64,256", lr=REFERENCE_LR)
    parser.add_argument("--coefficients", default="512,1130,2048", help="values of c to try")
    parser.add_argument(
        "--sweep", type=Path, default=RESULTS / "sweep_minilm.jsonl", help="grid results (oracle)"
    )
    args, spec = parse(parser, argv)
    ranks, seeds = ints(args.ranks), ints(args.seeds)
    coefficients = [float(x) for x in args.coefficients.split(",")]
    if not args.report:
        todo = configs(spec, ranks, seeds, args.lr, coefficients)
        run_sweep_configs(args, ((cfg, tuner_options(c)) for cfg, c in todo))
    print(report(args.out, args.sweep, spec, ranks, seeds, args.lr, coefficients))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
