"""Ablation of the head's learning rate: AlphaTuned (static) with and without ``head_lr``.

At the small learning rate of LoRA-α (2e-5) the principled α trains the adapters, but the
fresh classifier head (PEFT's ``modules_to_save``) trains at the base LR unless the wrapper
lifts it. This script runs AlphaTuned static on MiniLM at each rank with ``head_lr=HEAD_LR``
(the library's default) and ``head_lr=None`` (the recipe's LR for the head), on the sweep's
*selection* seeds, and prints the mean held-out loss next to the grid's best cell of the rank
(the oracle, from the sweep results of the same seeds). Records are appended to a resumable
JSON-lines file; each tag names the library's rule (``ablation:<rule>:<variant>``), so a run
under another rule is neither resumed as nor reported with these. Tags without a rule
(``ablation:<variant>``) are the first ablation's, under the rule ``LEGACY_RULE``.

Usage::

    python -m research.probes.head_ablation                      # r = 4, 16, 64; seeds 0, 1; lr 2e-5
    python -m research.probes.head_ablation --shard 0/2 &        # two workers on one file
    python -m research.probes.head_ablation --shard 1/2
    python -m research.probes.head_ablation --report             # only the table, from the file
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from alpha_tuner.demo.train import RunConfig
from alpha_tuner.heads import HEAD_LR
from research.fit import cell_table, grid_oracle, record_loss
from research.runner import ints
from research.sweep import SweepSpec, read_records, rule_tag

from ._options import parse, probe_parser, run_sweep_configs

RESULTS = Path(__file__).parent / "results"
VARIANTS: dict[str, dict[str, Any]] = {
    f"head={HEAD_LR:g}": {"head_lr": HEAD_LR},
    "head=base": {"head_lr": None},
}
#: The rule of the records whose tag names no rule (the √r rule with c = 280 at 2e-5).
LEGACY_RULE = "c=280@2e-05,q=1.34"


def parse_tag(tag: str) -> tuple[str, str] | None:
    """``(rule, variant)`` of an ablation tag, or ``None`` for another run's tag."""
    kind, _, rest = tag.partition(":")
    if kind != "ablation" or not rest:
        return None
    rule, _, variant = rest.rpartition(":")
    return (rule or LEGACY_RULE, variant)


def configs(spec: SweepSpec, ranks: list[int], seeds: list[int], lr: float) -> list[tuple[RunConfig, str]]:
    """Every (run, variant) of the ablation, seed-major."""
    return [
        (spec.base(method="alphatuned-static", rank=r, lr=lr, seed=s, tag=f"ablation:{rule_tag()}:{v}"), v)
        for s in seeds
        for r in ranks
        for v in VARIANTS
    ]


def report(
    path: Path, sweep_path: Path, spec: SweepSpec, ranks: list[int], seeds: list[int], lr: float,
    rule: str,
) -> str:  # fmt: skip
    """A markdown table: mean held-out loss per rank and variant under ``rule``, and the oracle cell."""
    records = read_records(path)
    grid = [r for r in read_records(sweep_path) if r["config"]["method"] == "lora" and not r["config"]["tag"]]
    oracle = grid_oracle(grid, spec.seeds, n_cells=len(spec.lrs) * len(spec.coefficients))
    losses: dict[tuple[int, str], list[float]] = {}
    for rec in records:
        cfg = rec["config"]
        parsed = parse_tag(cfg["tag"])
        if cfg["lr"] == lr and cfg["seed"] in seeds and parsed is not None and parsed[0] == rule:
            losses.setdefault((cfg["rank"], parsed[1]), []).append(record_loss(rec))
    cells = cell_table(grid, spec.seeds)
    oracle_loss = {r: statistics.fmean(cells[(r, lr_, alpha)]) for r, (alpha, lr_) in oracle.items()}
    head = list(VARIANTS)
    lines = [
        f"AlphaTuned static at lr {lr:g}, rule {rule}, mean held-out loss over seeds {seeds}",
        "",
        f"| r | {' | '.join(head)} | oracle (α, LR) | gap {head[0]} | gap {head[1]} |",
        "|---|" + "---|" * (len(head) + 3),
    ]
    for r in ranks:
        means = [
            statistics.fmean(losses[(r, v)]) if len(losses.get((r, v), [])) == len(seeds) else None
            for v in head
        ]
        o = oracle_loss.get(r)
        cell = f"{o:.4f} ({oracle[r][0]:g}, {oracle[r][1]:g})" if o is not None else "–"
        gaps = [f"{m / o - 1:+.1%}" if m is not None and o is not None else "–" for m in means]
        shown = [f"{m:.4f}" if m is not None else "–" for m in means]
        lines.append(f"| {r} | {' | '.join(shown)} | {cell} | {' | '.join(gaps)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = probe_parser(__doc__, out=RESULTS / "head_ablation.jsonl", ranks="4,16,64")
    parser.add_argument(
        "--sweep", type=Path, default=RESULTS / "sweep_minilm.jsonl", help="grid results (oracle)"
    )
    parser.add_argument(
        "--rule",
        default=None,
        help=f"report the runs under this rule (default: the library's; {LEGACY_RULE} was the first)",
    )
    args, spec = parse(parser, argv)
    ranks, seeds = ints(args.ranks), ints(args.seeds)
    if not args.report:
        run_sweep_configs(args, ((c, VARIANTS[v]) for c, v in configs(spec, ranks, seeds, args.lr)))
    print(report(args.out, args.sweep, spec, ranks, seeds, args.lr, args.rule or rule_tag()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
