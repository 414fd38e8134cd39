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
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .peers import LR_FREE

__all__ = ["format_report", "method_label", "oracle_cells", "plot_curves", "table"]

Record = Mapping[str, Any]


def method_label(config: Mapping[str, Any]) -> str:
    """``lora α=16``, ``lora α=2r``, … : the row a run belongs to."""
    method, alpha, rank = config["method"], config.get("alpha"), config["rank"]
    if method != "lora":
        return method
    if alpha is None or alpha == 2 * rank:
        return "lora α=2r"
    return "lora α=16" if alpha == 16 else f"lora α={alpha:g}"


def _loss(record: Record) -> float:
    loss = record.get("eval_loss")
    return math.inf if loss is None or not math.isfinite(loss) else float(loss)


def _by_seed(records: Iterable[Record], **match: Any) -> dict[int, float]:
    out = {}
    for r in records:
        c = r["config"]
        if all(c.get(k) == v for k, v in match.items()):
            out[int(c["seed"])] = _loss(r)
    return out


def oracle_cells(records: Sequence[Record], seeds: Sequence[int]) -> dict[int, tuple[float, float]]:
    """Per rank, the ``(α, LR)`` of plain LoRA with the lowest mean loss over ``seeds`` (complete cells)."""
    cells: dict[tuple[int, float, float], dict[int, float]] = defaultdict(dict)
    for r in records:
        c = r["config"]
        if c["method"] == "lora" and c["seed"] in seeds and c.get("alpha") is not None:
            cells[(c["rank"], c["lr"], c["alpha"])][c["seed"]] = _loss(r)
    best: dict[int, tuple[float, tuple[float, float]]] = {}
    for (rank, lr, alpha), losses in cells.items():
        if len(losses) < len(seeds):
            continue
        mean = statistics.fmean(losses.values())
        if rank not in best or mean < best[rank][0]:
            best[rank] = (mean, (alpha, lr))
    return {rank: cell for rank, (_, cell) in best.items()}


def _stats(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return mean, se


def table(
    records: Sequence[Record], *, seeds: Sequence[int], selection_seeds: Sequence[int]
) -> dict[str, Any]:
    """Per (rank, LR) cell: method → (mean, SE, n) over ``seeds``; the oracle; who is best."""
    oracle = oracle_cells(records, selection_seeds)
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
                losses = _by_seed(records, method="lora", rank=rank, lr=best_lr, alpha=alpha)
                cell[f"oracle (α={alpha:g}, lr={best_lr:g})"] = [v for s, v in losses.items() if s in seeds]
            rows[(rank, lr)] = {m: (*_stats(v), len(v)) for m, v in cell.items() if v}
    wins: dict[str, int] = defaultdict(int)
    complete = 0
    for stats in rows.values():
        peers = {m: v for m, v in stats.items() if not m.startswith("oracle") and v[2] == len(seeds)}
        if peers:
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
        lines += ["", f"### r = {rank}", "", "| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |"]
        lines.append("|---|" + "---|" * len(lrs))
        for m in methods:
            shown = [_fmt(rows[(rank, lr)].get(m), len(seeds)) for lr in lrs]
            lines.append(f"| {m} | " + " | ".join(shown) + " |")
    lines += ["", f"Best method per complete (rank, LR) cell, of {result['cells']}:"]
    for m, n in sorted(result["wins"].items(), key=lambda kv: -kv[1]):
        lines.append(f"- {m}: {n} ({n / max(result['cells'], 1):.0%})")
    lines += ["", "Median step time (s/step, same machine, every run of the method):"]
    lines += [f"- {m}: {s:.2f}" for m, s in sorted(result["step_s"].items())]
    return "\n".join(lines) + "\n"


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
