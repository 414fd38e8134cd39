"""What a user gets: the step law's defaults against a tuned LoRA run and the peers, every task.

One table for the head of BENCHMARKS.md and the README, made from the benchmark's own records
(:mod:`research.lm_bench`), so that the figures quoted there are the records' and nothing else.
Per task and rank:

* the law's held-out loss at each base LR (mean over the held-out seeds it ran on);
* its paired gap to the oracle, the best plain-LoRA (α, LR) cell of the rank chosen on the
  selection seeds (per base LR: mean ± SE of the per-seed relative gap; negative = the law is
  better);
* the spread of its mean loss across base LRs, beside plain LoRA's at the same recipe α;
* how many of the peers' (peer, base LR) cells it beats on the mean paired gap, and where it
  does not.

A line below the table sums the peer cells beaten over its rows, for every peer and for the
peers the tuning-free bar names (:data:`BAR_PEERS`). A second table says whether
the online part earns its place: the law from its own placement, the static placement (wrap time
only) and the law from a deliberately wrong α (×16, ÷16), each as a paired gap to the law.

``lead.md`` ends with the coverage (not spliced into other documents): per task and rank, the
cells of the law and the peers that have run on fewer than :data:`MIN_PAIRED` held-out seeds
(not for a probe, a setting where only the law and the oracle cell were meant to run).

Usage::

    python -m research.lead                     # writes benchmarks/results/lead.md and prints it
    python -m research.lead --into BENCHMARKS.md  # and replaces the block between its markers
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .bench_report import PEERS, format_gap, losses_by_label, losses_by_seed, method_label, paired_relative
from .lm_bench import LRS, Setting, setting_records
from .peers import LR_FREE

Record = Mapping[str, Any]
#: The law's defaults from each recipe α (row label, the name shown, plain LoRA's row at that α).
LAWS = (("steps", "2r", "lora α=2r"), ("steps α=16", "16", "lora α=16"))
LAW = LAWS[0][0]
#: The rows that test the online part (from the recipe's α = 2r), as (name, row label).
ONLINE = (("static", "steps-static"), ("from α × 16", "steps-up16"), ("from α ÷ 16", "steps-down16"))


@dataclass(frozen=True)
class Task:
    """One benchmark setting: its results file and how :func:`setting_records` reads it."""

    name: str
    out: Path
    model: str
    steps: int
    schedule: str
    seeds: tuple[int, ...]
    selection_seeds: tuple[int, ...]
    probe: bool = False  # only the law and the oracle cell were meant to run: no coverage list


#: A peer cell counts where it shares this many seeds with the law (or all of the law's, if fewer).
MIN_PAIRED = 4
#: The peers the tuning-free bar names, each label with the name the bar gives it (vanilla LoRA
#: at either recipe α); the lead table counts every peer, and this subset beside it.
BAR_PEERS = {
    "lora α=2r": "vanilla LoRA",
    "lora α=16": "vanilla LoRA",
    "rslora": "rsLoRA",
    "loraplus": "LoRA+",
    "prodigy": "Prodigy",
}
RESULTS = Path("benchmarks/results")
TASKS = (
    Task("MiniLM sentiment, 150 steps, constant LR", RESULTS / "minilm150_bench.jsonl", "minilm", 150,
         "constant", (100, 101, 102, 103, 104, 105, 106, 107), (0, 1)),
    Task("MiniLM sentiment, 150 steps, warm-up + linear (a probe: the law and the oracle cell)",
         RESULTS / "minilm150_bench.jsonl", "minilm", 150, "linear", (100, 101, 102, 103), (0, 1),
         probe=True),
    Task("MiniLM sentiment, 600 steps, warm-up + cosine", RESULTS / "minilm_bench.jsonl", "minilm", 600,
         "cosine", (100, 101, 102, 103, 104, 105, 106, 107), (0, 1)),
    Task("causal LM (SmolLM2-135M), 300 steps, warm-up + linear", RESULTS / "lm_bench.jsonl", "smollm2",
         300, "linear", (100, 101, 102, 103), (0, 1)),
    Task("causal LM (SmolLM2-135M), 600 steps, warm-up + linear", RESULTS / "lm_bench.jsonl", "smollm2",
         600, "linear", (100, 101, 102, 103), (0,)),
    Task("MiniLM debates (a task the constants never saw), 150 steps, warm-up + linear",
         RESULTS / "debates_bench.jsonl", "debates", 150, "linear", (100, 101, 102, 103), (0, 1)),
    Task("MiniLM convention party (another task the constants never saw), 150 steps, warm-up + linear",
         RESULTS / "party_bench.jsonl", "party", 150, "linear", (100, 101, 102, 103), (0, 1)),
)  # fmt: skip


def _gap(stat: tuple[float, float, int]) -> str:
    return format_gap(stat, digits=2)


def lead_rows(
    records: Sequence[Record],
    oracle: Mapping[int, tuple[float, float]],
    seeds: Sequence[int],
    *,
    law_row: str = LAW,
    plain_row: str = "lora α=2r",
) -> list[dict[str, Any]]:
    """One entry per rank where the law (row ``law_row``) ran on ``seeds``: the lead table's figures.

    Each entry has ``rank``, ``lrs``, ``law`` (LR → (mean, n)), ``oracle`` (LR → paired gap
    (mean, SE, n)), ``oracle_cell`` ((α, LR) or ``None``), ``spread`` (``"law"``, and ``"plain"``
    for plain LoRA's row ``plain_row`` at the same recipe α: (max − min) / min of the mean loss
    over the law's LRs, each mean over the seeds that row ran at every one of them, at least two),
    ``beaten`` and ``cells`` (peer cells the law beats on the mean paired gap, of those sharing
    at least :data:`MIN_PAIRED` seeds with it, or all of its seeds where it ran on fewer),
    ``bar`` (the same two counts over :data:`BAR_PEERS` only), and ``behind`` (peer label, LR,
    gap) where it does not.
    """
    losses = losses_by_label(records, seeds)
    rows = []
    for rank in sorted({rank for (label, rank, _) in losses if label == law_row}):
        lrs = sorted(lr for (label, r, lr) in losses if label == law_row and r == rank)
        law = {lr: losses[(law_row, rank, lr)] for lr in lrs}
        row: dict[str, Any] = {
            "rank": rank,
            "lrs": lrs,
            "law": {lr: (statistics.fmean(v.values()), len(v)) for lr, v in law.items()},
            "oracle_cell": oracle.get(rank),
            "oracle": {},
            "spread": {},
            "beaten": 0,
            "cells": 0,
            "bar": (0, 0),
            "behind": [],
        }
        if rank in oracle:
            alpha, best_lr = oracle[rank]
            best = losses_by_seed(records, method="lora", rank=rank, lr=best_lr, alpha=alpha)
            row["oracle"] = {lr: paired_relative(law[lr], best, seeds) for lr in lrs}
        for label in (law_row, plain_row):
            runs = [losses.get((label, rank, lr), {}) for lr in lrs]
            common = set.intersection(*(set(v) for v in runs))  # the seeds it ran at every LR
            if len(lrs) > 1 and len(common) >= 2:
                means = [statistics.fmean(v[s] for s in common) for v in runs]
                row["spread"]["law" if label == law_row else "plain"] = (max(means) - min(means)) / min(means)
        won: list[tuple[str, bool]] = []  # (peer, whether the law beats it) per counted cell
        for peer in PEERS:
            for lr in lrs:
                other = losses.get((peer, rank, 1.0 if peer in LR_FREE else lr), {})
                mean, se, n = paired_relative(law[lr], other, seeds)
                if n < min(len(law[lr]), MIN_PAIRED):  # too few seeds in common to count
                    continue
                won.append((peer, mean < 0))
                if mean >= 0:
                    row["behind"].append((peer, lr, (mean, se, n)))
        bar = [w for peer, w in won if peer in BAR_PEERS]
        row.update(beaten=sum(w for _, w in won), cells=len(won), bar=(sum(bar), len(bar)))
        rows.append(row)
    return rows


def online_rows(records: Sequence[Record], seeds: Sequence[int]) -> list[tuple[int, float, list[str]]]:
    """Per (rank, LR) where a static or wrong-start row ran: the law's mean and each row's gap."""
    losses = losses_by_label(records, seeds)
    out = []
    cells = sorted({(r, lr) for (label, r, lr) in losses for _, row in ONLINE if label == row})
    for rank, lr in cells:
        law = losses.get((LAW, rank, lr), {})
        if not law:
            continue
        shown = [f"{statistics.fmean(law.values()):.4f} ({len(law)})"]
        shown += [_gap(paired_relative(losses.get((row, rank, lr), {}), law, seeds)) for _, row in ONLINE]
        out.append((rank, lr, shown))
    return out


def _setting(task: Task) -> Setting | None:
    return setting_records(
        task.out, model=task.model, steps=task.steps, schedule=task.schedule,
        selection_seeds=task.selection_seeds,
    )  # fmt: skip


def coverage(records: Sequence[Record], seeds: Sequence[int]) -> list[tuple[int, list[str]]]:
    """Per rank where the law ran: its cells and the peers' at every base LR of :data:`LRS`
    (the LR-free peers once) that ran on fewer than :data:`MIN_PAIRED` of ``seeds`` (or all of
    them, if fewer), each as ``"<row> at <lr> (<seeds run>)"``. Plain LoRA at α = 16 is left
    out where its runs fall in another row (:func:`method_label`: the α = 2r row at r = 8)."""
    losses = losses_by_label(records, seeds)
    need = min(MIN_PAIRED, len(seeds))
    out = []
    for rank in sorted({rank for (label, rank, _) in losses if label == LAW}):
        short = []
        plain16 = method_label({"method": "lora", "alpha": 16.0, "rank": rank})  # "lora α=2r" at r = 8
        for label in (LAW, *PEERS):
            if label == "lora α=16" and plain16 != label:
                continue  # its runs are another row's
            for lr in (1.0,) if label in LR_FREE else LRS:
                n = len(losses.get((label, rank, lr), {}))
                if n < need:
                    short.append(f"{label}{'' if label in LR_FREE else f' at {lr:g}'} ({n})")
        out.append((rank, short))
    return out


def format_coverage(tasks: Sequence[Task] = TASKS) -> str:
    """The cells short of held-out seeds (:func:`coverage`), task by task, as Markdown."""
    lines = [
        f"Cells of the law and the peers with fewer than {MIN_PAIRED} held-out seeds (seeds run):",
        "",
    ]
    for task in tasks:
        setting = None if task.probe else _setting(task)
        if setting is None:
            continue
        for rank, short in coverage(setting.records, task.seeds):
            lines.append(f"- {task.name}, r = {rank}: " + ("; ".join(short) or "none"))
    return "\n".join(lines) + "\n"


def format_lead(tasks: Sequence[Task] = TASKS) -> str:
    """Both tables, as Markdown, for every task that has records."""
    lead = [
        "| task | r | recipe α | the law's held-out loss at lr 1e-5 / 1e-4 / 1e-3 (seeds) | gap to "
        "the oracle (paired, per LR) | spread over LRs: the law / plain LoRA at the recipe's α | "
        "peer cells beaten (same LR) | behind |",
        "|---|---|---|---|---|---|---|---|",
    ]
    online = [
        "| task | r | lr | the law (seeds) | static | " + " | ".join(name for name, _ in ONLINE[1:]) + " |",
        "|---|---|---|---|---|---|---|",
    ]
    notes = []
    totals: dict[str, tuple[int, int]] = {}
    bar = (0, 0)
    for task in tasks:
        setting = _setting(task)
        if setting is None:
            continue
        records, oracle = setting.records, setting.oracle
        rows = [
            (recipe, row)
            for law_row, recipe, plain_row in LAWS
            for row in lead_rows(records, oracle, task.seeds, law_row=law_row, plain_row=plain_row)
        ]
        for recipe, row in sorted(rows, key=lambda pair: pair[1]["rank"]):
            law = " / ".join(
                f"{row['law'][lr][0]:.4f} ({row['law'][lr][1]})" if lr in row["law"] else "–" for lr in LRS
            )
            gaps = " / ".join(_gap(row["oracle"][lr]) if lr in row["oracle"] else "–" for lr in LRS)
            spread = " / ".join(
                f"{row['spread'][k]:.1%}" if k in row["spread"] else "–" for k in ("law", "plain")
            )
            behind = "; ".join(f"{p} at {lr:g}: {_gap(g)}" for p, lr, g in row["behind"]) or "none"
            lead.append(
                f"| {task.name} | {row['rank']} | {recipe} | {law} | {gaps} | {spread} | "
                f"{row['beaten']} of {row['cells']} | {behind} |"
            )
            beaten, cells = totals.get(task.name, (0, 0))
            totals[task.name] = (beaten + row["beaten"], cells + row["cells"])
            bar = (bar[0] + row["bar"][0], bar[1] + row["bar"][1])
            if row["oracle_cell"] and recipe == LAWS[0][1]:
                alpha, lr = row["oracle_cell"]
                where = (
                    " (chosen at the task's own horizon: no grid at this one)"
                    if row["rank"] in setting.borrowed
                    else ""
                )
                notes.append(f"{task.name}, r = {row['rank']}: oracle α = {alpha:g}, lr {lr:g}{where}")
        for rank, lr, shown in online_rows(records, task.seeds):
            online.append(f"| {task.name} | {rank} | {lr:g} | " + " | ".join(shown) + " |")
    text = [
        "Held-out loss (lower is better); gaps are paired over the seeds both ran, mean ± SE (seeds), "
        "negative = the law is better. Oracle cells (chosen on the selection seeds): "
        + "; ".join(notes)
        + ".",
        "",
        *lead,
        "",
        _total_line(totals, bar),
        "",
        "The online part: the law from its own placement, and paired gaps to it of the static "
        "placement (wrap time only) and of the law started from a wrong α (positive = worse than "
        "the law):",
        "",
        *online,
    ]
    return "\n".join(text) + "\n"


def _share(beaten: int, cells: int) -> str:
    return f" ({beaten / cells:.1%})" if cells else ""


def _total_line(totals: Mapping[str, tuple[int, int]], bar: tuple[int, int]) -> str:
    """Peer cells beaten, summed over every row of the table and per task, and over the rows
    against :data:`BAR_PEERS` only (``bar``: beaten, cells)."""
    beaten, cells = (sum(t[i] for t in totals.values()) for i in (0, 1))
    per_task = "; ".join(f"{name}: {b} of {c}" for name, (b, c) in totals.items())
    return (
        f"Peer cells beaten, summed over the rows: {beaten} of {cells}{_share(beaten, cells)} ({per_task}). "
        f"Against the peers the tuning-free bar names ({', '.join(dict.fromkeys(BAR_PEERS.values()))}): "
        f"{bar[0]} of {bar[1]}{_share(*bar)}."
    )


START, END = "<!-- lead:start (python -m research.lead --into) -->", "<!-- lead:end -->"


def splice(document: str, block: str) -> str:
    """``document`` with the text between its :data:`START` and :data:`END` lines replaced by ``block``.

    Raises:
        ValueError: the document lacks either marker, or has them out of order.
    """
    start, end = document.find(START), document.find(END)
    if start < 0 or end < start:
        raise ValueError(f"no '{START}' ... '{END}' block to replace: add both lines where the table goes")
    return document[: start + len(START)] + "\n\n" + block.strip() + "\n\n" + document[end:]


def main(argv: list[str] | None = None) -> int:
    """Write ``benchmarks/results/lead.md``, print it, and splice it into ``--into`` documents."""
    parser = argparse.ArgumentParser(
        prog="python -m research.lead", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "lead.md")
    parser.add_argument(
        "--into", type=Path, nargs="*", default=[], help="documents whose lead block to replace"
    )
    args = parser.parse_args(argv)
    text = format_lead()
    covered = format_coverage()
    updated = {}
    for path in args.into:
        try:
            updated[path] = splice(path.read_text(encoding="utf-8"), text)
        except (OSError, ValueError) as err:
            parser.exit(2, f"research.lead: {path}: {err}\n")
    args.out.write_text(text + "\n" + covered, encoding="utf-8")
    for path, document in updated.items():
        path.write_text(document, encoding="utf-8")
    print(text + "\n" + covered)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
