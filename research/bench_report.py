"""Tables and figures of a Trainer benchmark's results file (:mod:`research.lm_bench` records).

For every (rank, base LR) cell: the held-out loss of each method as mean ± standard error over
the seeds asked for, the oracle (the best plain-LoRA cell of the α × LR grid of that rank, chosen
on the *selection* seeds and reported on the same seeds as the table), the fraction of cells in
which each method is best, and each method's median step time. The LR-free methods (Prodigy,
D-Adaptation) ignore the base LR: their one run per rank and seed appears in every LR column.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .peers import LR_FREE

#: The law's rows that compete in the per-cell count (:func:`competes`).
_LAW_DEFAULTS = frozenset({"steps", "steps-static"})
#: The peers a gap report compares against, as row labels, in its column order.
PEERS = ("lora α=2r", "lora α=16", "rslora", "loraplus", "prodigy", "dadapt", "schedulefree")

__all__ = [
    "format_gap",
    "format_report",
    "grid_runs",
    "losses_by_seed",
    "method_label",
    "oracle_cells",
    "paired_relative",
    "plot_curves",
    "pruned_grid_note",
    "table",
]

Record = Mapping[str, Any]


def base_method(config: Mapping[str, Any]) -> str:
    """The method; ``lora-metered`` (plain LoRA with the step law's meter, which changes nothing
    in training) counts as ``lora``."""
    return "lora" if config["method"] == "lora-metered" else str(config["method"])


def method_label(config: Mapping[str, Any]) -> str:
    """``lora α=16``, ``lora α=2r``, ``steps [a=…,u=…] α=16``, … : the row a run belongs to."""
    method, alpha, rank = base_method(config), config.get("alpha"), config["rank"]
    if method != "lora":
        label = method + (f" [{config['tag']}]" if config.get("tag") and method.startswith("steps") else "")
        if alpha is not None and alpha != 2 * rank and method.startswith(("steps", "alphatuned")):
            label += f" α={alpha:g}"
        return label
    if alpha is None or alpha == 2 * rank:
        return "lora α=2r"
    return "lora α=16" if alpha == 16 else f"lora α={alpha:g}"


def _loss(record: Record) -> float:
    loss = record.get("eval_loss")
    return math.inf if loss is None or not math.isfinite(loss) else float(loss)


def losses_by_seed(records: Iterable[Record], **match: Any) -> dict[int, float]:
    """Seed → held-out loss of the runs whose config matches ``match`` (plain LoRA's α = 2r
    spelled out, ``lora-metered`` as ``lora``; a diverged run's loss is infinite)."""
    out = {}
    for r in records:
        c = {**r["config"], "method": base_method(r["config"])}
        if c.get("method") == "lora" and c.get("alpha") is None:
            c["alpha"] = 2.0 * c["rank"]
        if all(c.get(k) == v for k, v in match.items()):
            out[int(c["seed"])] = _loss(r)
    return out


def losses_by_label(
    records: Iterable[Record], seeds: Sequence[int], value: Callable[[Record], float | None] | None = None
) -> dict[tuple[str, int, float], dict[int, float]]:
    """(row label, rank, base LR) → seed → held-out loss over ``seeds``; the LR-free methods'
    runs under LR 1.0 (they ignore the base LR), a diverged run's loss infinite. ``value``, if
    given, reads another figure of a record instead (a record where it gives ``None`` is left out)."""
    out: dict[tuple[str, int, float], dict[int, float]] = defaultdict(dict)
    for r in records:
        c = r["config"]
        got = _loss(r) if value is None else value(r)
        if c["seed"] in seeds and got is not None:
            lr = 1.0 if c["method"] in LR_FREE else c["lr"]
            out[(method_label(c), c["rank"], lr)][int(c["seed"])] = got
    return out


#: Per rank, plain LoRA's ``(LR, α)`` cells: seed → loss.
GridCells = dict[int, dict[tuple[float, float], dict[int, float]]]
#: Per rank, plain LoRA's ``(LR, α)`` cells: seed → record.
GridRuns = dict[int, dict[tuple[float, float], dict[int, Record]]]


def grid_runs(records: Iterable[Record], seeds: Sequence[int]) -> GridRuns:
    """Plain LoRA's runs over ``seeds`` by rank and ``(LR, α)`` cell (α = 2r spelled out), in the
    order the records first name them."""
    runs: GridRuns = defaultdict(lambda: defaultdict(dict))
    for r in records:
        c = r["config"]
        if base_method(c) == "lora" and c["seed"] in seeds:
            alpha = 2.0 * c["rank"] if c.get("alpha") is None else c["alpha"]
            runs[c["rank"]][(c["lr"], alpha)][c["seed"]] = r
    return runs


def _grid_cells(records: Iterable[Record], seeds: Sequence[int]) -> GridCells:
    """Plain LoRA's cells over ``seeds``, rank by rank, in the order the records first name them."""
    return {
        rank: {cell: {seed: _loss(r) for seed, r in by_seed.items()} for cell, by_seed in cells.items()}
        for rank, cells in grid_runs(records, seeds).items()
    }


def _complete(
    cells: Mapping[tuple[float, float], Mapping[int, float]], seeds: Sequence[int]
) -> list[tuple[float, float, float]]:
    """``(mean loss, α, LR)`` of the cells that ran on every one of ``seeds``, in ``cells``' order."""
    return [
        (statistics.fmean(v.values()), alpha, lr) for (lr, alpha), v in cells.items() if len(v) == len(seeds)
    ]


def oracle_cells(records: Sequence[Record], seeds: Sequence[int]) -> dict[int, tuple[float, float]]:
    """Per rank, the ``(α, LR)`` of plain LoRA with the lowest mean loss over ``seeds`` (complete cells)."""
    best = {rank: _complete(cells, seeds) for rank, cells in _grid_cells(records, seeds).items()}
    return {rank: min(cands, key=lambda c: c[0])[1:] for rank, cands in best.items() if cands}


def pruned_grid_note(records: Sequence[Record], seeds: Sequence[int]) -> str:
    """Where the grid ran the later selection seeds on part of its cells only: a line naming, per
    rank, the cells the oracle was chosen among (mean over ``seeds``) and how many cells ran on
    the first seed alone. Empty where every cell ran on every seed (or there is one seed)."""
    if len(seeds) < 2:
        return ""
    parts = []
    for rank, cells in sorted(_grid_cells(records, seeds).items()):
        full = sorted(_complete(cells, seeds))
        first_only = sum(len(v) == 1 and seeds[0] in v for v in cells.values())
        if first_only and full:
            shown = ", ".join(f"α = {alpha:g}, lr {lr:g}: {mean:.4f}" for mean, alpha, lr in full)
            parts.append(f"r = {rank}: {shown} ({first_only} more on seed {seeds[0]} only)")
    if not parts:
        return ""
    seed_text = ", ".join(str(s) for s in seeds)
    return (
        f"Oracle cells chosen among the grid cells run on every selection seed ({seed_text}; mean "
        "loss): " + "; ".join(parts) + ".\n"
    )


def _stats(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return mean, se


def table(
    records: Sequence[Record],
    *,
    seeds: Sequence[int],
    selection_seeds: Sequence[int],
    oracle: Mapping[int, tuple[float, float]] | None = None,
) -> dict[str, Any]:
    """Per (rank, LR) cell: method → (mean, SE, n) over ``seeds``; the oracle; who is best.

    ``oracle`` (rank → (α, LR)) gives the oracle cells chosen elsewhere (default: chosen on
    ``selection_seeds`` among ``records``).
    """
    oracle = oracle_cells(records, selection_seeds) if oracle is None else oracle
    rows: dict[tuple[int, float], dict[str, tuple[float, float, int]]] = {}
    ranks = sorted({r["config"]["rank"] for r in records})
    lrs = sorted({r["config"]["lr"] for r in records if r["config"]["method"] not in LR_FREE})
    for rank in ranks:
        for lr in lrs:
            cell: dict[str, list[float]] = defaultdict(list)
            for r in records:
                c = r["config"]
                if c["rank"] != rank or c["seed"] not in seeds:
                    continue
                if c["lr"] == lr or c["method"] in LR_FREE:
                    label = method_label(c)
                    if label.startswith("lora α=") and label not in ("lora α=16", "lora α=2r"):
                        continue  # other grid cells only feed the oracle
                    cell[label].append(_loss(r))
            if rank in oracle:
                alpha, best_lr = oracle[rank]
                losses = losses_by_seed(records, method="lora", rank=rank, lr=best_lr, alpha=alpha)
                cell[f"oracle (α={alpha:g}, lr={best_lr:g})"] = [v for s, v in losses.items() if s in seeds]
            rows[(rank, lr)] = {m: (*_stats(v), len(v)) for m, v in cell.items() if v}
    wins: dict[str, int] = defaultdict(int)
    complete = 0
    for stats in rows.values():
        peers = {m: v for m, v in stats.items() if competes(m) and v[2] == len(seeds)}
        if len(peers) > 1:  # a cell where one method ran is not a comparison
            complete += 1
            wins[min(peers, key=lambda m: peers[m][0])] += 1
    step = defaultdict(list)
    for r in records:
        if r.get("step_s") is not None:
            step[method_label(r["config"]).split(" α=")[0]].append(float(r["step_s"]))
    return {
        "rows": rows,
        "oracle": oracle,
        "wins": dict(wins),
        "cells": complete,
        "step_s": {m: statistics.median(v) for m, v in step.items()},
    }


def _fmt(stat: tuple[float, float, int] | None, n_seeds: int) -> str:
    if stat is None:
        return "–"
    mean, se, n = stat
    if not math.isfinite(mean):
        return "diverged"
    text = f"{mean:.4f}" + (f" ± {se:.4f}" if math.isfinite(se) else "")
    return text + (f" ({n}/{n_seeds})" if n < n_seeds else "")


def format_report(result: Mapping[str, Any], *, seeds: Sequence[int], title: str) -> str:
    """The tables as Markdown."""
    rows = result["rows"]
    intro = f"Held-out loss, mean ± SE over seeds {list(seeds)} (n/{len(seeds)}: seeds done so far)."
    lines = [f"## {title}", "", intro]
    for rank in sorted({k[0] for k in rows}):
        lrs = sorted(lr for r, lr in rows if r == rank)
        methods = sorted({m for (r, _), cell in rows.items() if r == rank for m in cell}, key=_order)
        if not methods:
            lines += [
                "",
                f"### r = {rank}",
                "",
                "No runs on these seeds yet (its records are on other seeds).",
            ]
            continue
        lines += ["", f"### r = {rank}", "", "| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |"]
        lines.append("|---|" + "---|" * len(lrs))
        for m in methods:
            shown = [_fmt(rows[(rank, lr)].get(m), len(seeds)) for lr in lrs]
            lines.append(f"| {m} | " + " | ".join(shown) + " |")
    lines += [
        "",
        f"Best method per (rank, LR) cell where two or more methods ran on every seed, of {result['cells']} "
        "(peers and the law's defaults; probes and wrong starts not counted):",
    ]
    for m, n in sorted(result["wins"].items(), key=lambda kv: -kv[1]):
        lines.append(f"- {m}: {n} ({n / max(result['cells'], 1):.0%})")
    lines += ["", "Median step time (s/step, same machine, every run of the method):"]
    lines += [f"- {m}: {s:.2f}" for m, s in sorted(result["step_s"].items())]
    return "\n".join(lines) + "\n"


def competes(label: str) -> bool:
    """Whether a row is a method in the per-cell count: a peer, or the law as its defaults from the
    benchmark's recipe (α = 2r), adaptive or static (``steps``, ``steps-static``). Not the oracle,
    nor any other row of the law: tagged options (``steps [...]``), another recipe α
    (``steps α=16``: one row per method in the count) or a deliberately wrong start
    (``steps-up16``, ``steps-down16``, ``steps-peak``)."""
    if label.startswith("steps"):
        return label in _LAW_DEFAULTS
    return not label.startswith("oracle")


def _order(method: str) -> tuple[int, str]:
    order = ["lora α=16", "lora α=2r", "rslora", "loraplus", "schedulefree", "prodigy", "dadapt"]
    if method.startswith("oracle"):
        return (100, method)
    return (order.index(method) if method in order else 50, method)


def plot_curves(records: Sequence[Record], path: Path, *, seed: int, lr: float) -> None:
    """Training-loss curves of every method at one base LR and seed, one panel per rank."""
    from alpha_tuner.demo.figure import pyplot

    plt = pyplot()
    ranks = sorted({r["config"]["rank"] for r in records})
    fig, axes = plt.subplots(1, len(ranks), figsize=(6 * len(ranks), 4.2), squeeze=False)
    styles = ["-", "--", "-.", ":"]
    markers = ["o", "s", "^", "v", "D", "x", "+", "*", "P"]
    for ax, rank in zip(axes[0], ranks, strict=True):
        chosen = [
            r for r in records
            if r["config"]["rank"] == rank and r["config"]["seed"] == seed
            and (r["config"]["lr"] == lr or r["config"]["method"] in LR_FREE)
            and (r["config"]["method"] != "lora" or method_label(r["config"]) in ("lora α=16", "lora α=2r"))
        ]  # fmt: skip
        for i, r in enumerate(sorted(chosen, key=lambda r: _order(method_label(r["config"])))):
            curve = r["train_curve"]
            ax.plot([s for s, _ in curve], [v for _, v in curve], ls=styles[i % 4], marker=markers[i % 9],
                    markevery=5, label=f"{method_label(r['config'])} (held-out {_loss(r):.3f})")  # fmt: skip
        ax.set(title=f"r = {rank}, base lr {lr:g}, seed {seed}", xlabel="step", ylabel="training loss")
        ax.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def paired_relative(
    a: Mapping[int, float], b: Mapping[int, float], seeds: Sequence[int]
) -> tuple[float, float, int]:
    """Mean and SE of ``a − b`` over the seeds both have (relative to ``b``'s mean), and that count."""
    common = [s for s in seeds if s in a and s in b]
    if not common:
        return math.nan, math.nan, 0
    base = statistics.fmean(b[s] for s in common)
    diffs = [(a[s] - b[s]) / base for s in common]
    mean, se = _stats(diffs)
    return mean, se, len(common)


def format_gap(stat: tuple[float, float, int], *, digits: int = 1, seeds: int | None = None) -> str:
    """``+1.2% ± 0.3% (4)`` for a :func:`paired_relative` result (``–`` where nothing paired).

    Args:
        stat: ``(mean, se, n)``.
        digits: Decimals of the percentages.
        seeds: The number of seeds asked for: the count ``(n)`` is shown only where it differs
            (``None``: always shown).
    """
    mean, se, n = stat
    if n == 0 or not math.isfinite(mean):
        return "–"
    shown = f"{mean:+.{digits}%}" + (f" ± {se:.{digits}%}" if math.isfinite(se) else "")
    return shown + ("" if n == seeds else f" ({n})")


def gap_report(
    records: Sequence[Record],
    *,
    method: str,
    seeds: Sequence[int],
    selection_seeds: Sequence[int],
    peers: Sequence[str] | None = None,
    oracle: Mapping[int, tuple[float, float]] | None = None,
) -> str:
    """Paired gaps of ``method`` (a row label) to the oracle and to each peer, cell by cell.

    A gap is ``(loss(method) − loss(other)) / mean loss(other)`` per seed, reported as mean ± SE
    over the seeds both have (negative: ``method`` is better). The oracle is the best plain-LoRA
    cell of the rank on ``selection_seeds``. ``peers`` (row labels) default to those of
    :data:`PEERS` that ran on ``seeds``; ``oracle`` (rank → (α, LR)) overrides the oracle cells.
    The last lines give the spread of ``method``'s mean loss across base LRs,
    ``(max − min) / min``, beside plain LoRA's at the recipe's α.
    """
    oracle = oracle_cells(records, selection_seeds) if oracle is None else oracle
    by_label = losses_by_label(records, seeds)
    cells = sorted({(rank, lr) for (m, rank, lr) in by_label if m == method})
    if peers is None:  # every standard peer that ran on these seeds
        ran = {m for (m, _, _) in by_label}
        peers = [p for p in PEERS if p in ran]
    header = "| " + " | ".join(["r", "lr", "vs oracle", *(f"vs {p}" for p in peers)]) + " |"
    lines = [
        f"Paired gaps of `{method}`, mean ± SE over seeds {list(seeds)} (relative; negative = better):",
        "",
    ]
    lines += [header, "|---|---|---|" + "---|" * len(peers)]
    spread_rows: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))

    def fmt(stat: tuple[float, float, int]) -> str:
        return format_gap(stat, seeds=len(seeds))

    for rank, lr in cells:
        mine = by_label[(method, rank, lr)]
        row = [str(rank), f"{lr:g}"]
        if rank in oracle:
            alpha, best_lr = oracle[rank]
            row.append(
                fmt(
                    paired_relative(
                        mine,
                        losses_by_seed(records, method="lora", rank=rank, lr=best_lr, alpha=alpha),
                        seeds,
                    )
                )
            )
        else:
            row.append("–")
        for peer in peers:
            other = by_label.get((peer, rank, 1.0 if peer in LR_FREE else lr), {})
            row.append(fmt(paired_relative(mine, other, seeds)))
        lines.append("| " + " | ".join(row) + " |")
        for label in (method, "lora α=2r"):
            values = by_label.get((label, rank, lr), {})
            if len(values) == len(seeds):
                spread_rows[label][rank].append(statistics.fmean(values.values()))
    lines += ["", "Spread of the mean loss across base LRs, (max − min) / min:"]
    for label, ranks in spread_rows.items():
        shown = [
            f"r={rank}: {(max(v) - min(v)) / min(v):.1%} over {len(v)} LRs"
            for rank, v in sorted(ranks.items())
            if len(v) > 1
        ]
        lines.append(f"- {label}: " + ("; ".join(shown) or "–"))
    return "\n".join(lines) + "\n"
