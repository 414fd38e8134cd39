"""How each task's loss responds to the law's targets, on the selection and held-out seeds.

The law holds two relative steps on every task: A's step ``a``
(:class:`alpha_tuner.steplaw.StepLaw.a_step`, 1e-2) and the weight's update ``u``
(:attr:`~alpha_tuner.steplaw.StepLaw.update`, 3e-4). This table puts, for every benchmark task
and rank, the law's runs at the defaults beside runs tagged ``u=<value>``, ``a=<value>`` or both
(same seeds, same batches), with the paired gap of each to the defaults and to the task's oracle
cell (the best plain-LoRA cell of the selection grid). A constant target serves every task only
if one value is near the best on all of them. Beside the held-out loss, the paired gap of the
run's mean training loss (over the minibatch losses the Trainer logged, the whole run) says
whether a target changes how fast the run fits its own data, which a tuner could in principle
see, or only how well that transfers to unseen text.

Usage::

    python -m research.target_response   # writes benchmarks/results/update_response.md
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from alpha_tuner.steplaw import StepLaw
from research.bench_report import format_gap, losses_by_label, losses_by_seed, paired_relative
from research.lead import TASKS, Task
from research.lm_bench import HELD_OUT_SEEDS, Setting, setting_records
from research.runner import read_records

OUT = Path("benchmarks/results/update_response.md")
#: Runs of the law on part of a task's training set (``lm_bench --train-size``).
SUBSETS = Path("benchmarks/results/train_size.jsonl")
DEFAULT_A = StepLaw().a_step  # what untagged `steps` records ran with
DEFAULT_U = StepLaw().update
LAW = "steps"
_TAGGED = re.compile(r"^steps \[([^\]]+)\]$")
_TARGET = re.compile(r"^([au])=([0-9.eE+-]+)$")


def targets_of(label: str) -> tuple[float, float] | None:
    """The targets ``(a, u)`` of a law row: the defaults for ``steps``; for ``steps [a=x]``,
    ``steps [u=y]`` or ``steps [a=x,u=y]`` the tagged values and the default of the other;
    ``None`` for any other row (another tag is an ablation of another constant)."""
    if label == LAW:
        return DEFAULT_A, DEFAULT_U
    match = _TAGGED.match(label)
    if match is None:
        return None
    values: dict[str, float] = {}
    for part in match.group(1).split(","):
        target = _TARGET.match(part)
        if target is None or target.group(1) in values:
            return None
        values[target.group(1)] = float(target.group(2))
    return values.get("a", DEFAULT_A), values.get("u", DEFAULT_U)


def mean_train_loss(record: Mapping[str, Any]) -> float | None:
    """The run's mean training loss: the mean of its logged curve (``train_curve``, the Trainer's
    10-step means), ``None`` where the record has no finite curve."""
    curve = [float(loss) for _, loss in record.get("train_curve") or ()]
    if not curve or not all(math.isfinite(x) for x in curve):
        return None
    return statistics.fmean(curve)


def _law_rows(labels: Iterable[str]) -> list[tuple[tuple[float, float], str]]:
    """The law's rows among ``labels`` with their targets ``(a, u)``, in the order of the targets."""
    return sorted((t, label) for label in labels if (t := targets_of(label)) is not None)


def _sci(x: float) -> str:
    """``3e-4``, ``1.5e-4``: a target as the tags spell it."""
    mantissa, exponent = f"{x:.6e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


Gap = tuple[float, float, int]


class TargetRow(NamedTuple):
    """One (task, rank) row of a target on the selection seeds, with its paired gaps."""

    task: str
    rank: int
    targets: tuple[float, float]
    to_default: Gap
    to_oracle: Gap | None
    schedule: str = ""  # a probe task's schedule, named beside the task (``Task.probe``)


def _target_cells(
    targets: tuple[float, float],
    label: str,
    got: Mapping[int, float],
    gaps: Sequence[Gap],
    seeds: Sequence[int],
) -> list[str]:
    """The targets ``a``, ``u``, the mean loss (n) and the paired ``gaps`` to the defaults (held-out
    loss, then, where given, training loss), as table cells; ``–`` for the defaults' own row."""
    shown = [_sci(x) + (" (default)" if label == LAW else "") for x in targets]
    shown.append(f"{statistics.fmean(got.values()):.4f} ({len(got)})")
    return shown + ["–" if label == LAW else format_gap(gap, seeds=len(seeds)) for gap in gaps]


def task_rows(
    task: Task,
    setting: Setting,
    lr: float = 1e-4,
    *,
    held_out: bool = False,
    pairs: list[tuple[Gap, Gap]] | None = None,
    collect: list[TargetRow] | None = None,
) -> list[str]:
    """Markdown rows of one task: per rank and target, the mean loss over the seeds below the
    task's held-out ones (or over its held-out seeds) and the paired gaps to the default target and
    to the oracle cell (chosen on the task's selection seeds either way). ``pairs``, if given,
    collects (held-out gap, training-loss gap) of every row whose update target is not the
    default's; ``collect``, if given, every row on the selection seeds (:func:`worst_case`)."""
    records, oracle = setting.records, setting.oracle
    # selection: every seed below the held-out ones (the u comparison ran on more seeds than the grid)
    below = sorted({int(r["config"]["seed"]) for r in records if r["config"]["seed"] < min(task.seeds)})
    seeds, stage = (task.seeds, "held-out") if held_out else (below, "selection")
    losses = losses_by_label(records, seeds)
    train = losses_by_label(records, seeds, value=mean_train_loss)
    rows = []
    for rank in sorted({r for (label, r, x) in losses if label == LAW and x == lr}):
        default = losses[(LAW, rank, lr)]
        train_default = train.get((LAW, rank, lr), {})
        cell = oracle.get(rank)
        best = {}
        if cell is not None:
            best = losses_by_seed(records, method="lora", rank=rank, alpha=cell[0], lr=cell[1])
        labels = [label for (label, r, x) in losses if r == rank and x == lr]
        here = _law_rows(labels)
        if held_out and len(here) < 2:  # the held-out rows only where another target ran there too
            continue
        for targets, label in here:
            got = losses[(label, rank, lr)]
            oracle_gap = paired_relative(got, best, seeds) if best else None
            to_oracle = "–" if oracle_gap is None else format_gap(oracle_gap, seeds=len(seeds))
            where = "–" if cell is None else f"α = {cell[0]:g}, lr {cell[1]:g}"
            gaps = (
                paired_relative(got, default, seeds),
                paired_relative(train.get((label, rank, lr), {}), train_default, seeds),
            )
            if pairs is not None and targets[1] != DEFAULT_U:
                pairs.append(gaps)
            if collect is not None and not held_out:
                collect.append(
                    TargetRow(
                        task.name, rank, targets, gaps[0], oracle_gap, task.schedule if task.probe else ""
                    )
                )
            cells = [task.name, str(rank), stage, *_target_cells(targets, label, got, gaps, seeds)]
            cells += [to_oracle, where]
            rows.append("| " + " | ".join(cells) + " |")
    return rows


def subset_rows(records: Sequence[Mapping[str, Any]], lr: float = 1e-4) -> list[str]:
    """Markdown rows of the runs on part of a training set: per (task, steps, training-set size,
    rank, selection or held-out seeds) and target, the mean loss and the paired gap to the default
    target on the same seeds."""
    groups: dict[tuple[str, int, int, int, str], list[Mapping[str, Any]]] = defaultdict(list)
    for r in records:
        c = r["config"]
        if c.get("train_size") is not None and c["lr"] == lr:
            stage = "selection" if c["seed"] < min(HELD_OUT_SEEDS) else "held-out"
            groups[(c["model"], c["steps"], c["train_size"], c["rank"], stage)].append(r)
    rows = []
    for (model, steps, size, rank, stage), runs in sorted(groups.items()):
        seeds = sorted({int(r["config"]["seed"]) for r in runs})
        losses = losses_by_label(runs, seeds)
        default = losses.get((LAW, rank, lr), {})
        passes = steps * int(runs[0]["config"]["batch_size"]) / size
        for targets, label in _law_rows(lab for (lab, _, _) in losses):
            cells = [model, str(steps), str(size), f"{passes:.1f}", str(rank), stage]
            got = losses[(label, rank, lr)]
            cells += _target_cells(targets, label, got, [paired_relative(got, default, seeds)], seeds)
            rows.append("| " + " | ".join(cells) + " |")
    return rows


def agreement(pairs: Sequence[tuple[Gap, Gap]]) -> str:
    """How often a changed update target moves the training loss the way it moves the held-out
    loss: rows with both gaps, same sign, and rows where both differ from zero by more than two
    standard errors in opposite directions."""
    both = [(h, t) for h, t in pairs if h[2] and t[2] and math.isfinite(h[0]) and math.isfinite(t[0])]
    same = sum((h[0] > 0) == (t[0] > 0) for h, t in both)

    def clear(g: Gap) -> bool:
        return g[2] > 1 and abs(g[0]) > 2 * g[1]

    opposed = sum((h[0] > 0) != (t[0] > 0) and clear(h) and clear(t) for h, t in both)
    return (
        f"Rows with an update target other than the default's: the training loss moves the way the "
        f"held-out loss moves in {same} of {len(both)}; in {opposed} both move by more than two "
        "standard errors in opposite directions."
    )


def worst_case(rows: Sequence[TargetRow]) -> list[str]:
    """Markdown rows: per target, over the (task, rank) rows where it ran on the selection seeds, the
    worst and the mean paired gap to the oracle cell beside the defaults' on the same rows, and the
    worst paired gap to the defaults. A constant that serves every task is one whose worst case is
    small; comparing on the same rows keeps a target that ran on the easy tasks only from looking
    better than it is."""
    default = {(r.task, r.rank): r for r in rows if r.targets == (DEFAULT_A, DEFAULT_U)}
    by_target: dict[tuple[float, float], list[TargetRow]] = defaultdict(list)
    for r in rows:
        if (r.task, r.rank) in default and r.to_oracle is not None and r.to_oracle[2]:
            by_target[r.targets].append(r)

    def worst(gaps: Sequence[tuple[Gap, str]]) -> str:
        gap, where = max(gaps, key=lambda g: g[0][0])
        return f"{format_gap(gap, seeds=gap[2])} ({where}; {gap[2]} seeds)"

    out = []
    for targets, here in sorted(by_target.items()):
        is_default = targets == (DEFAULT_A, DEFAULT_U)
        where = [f"{_short(r.task, r.schedule)}, r = {r.rank}" for r in here]
        to_oracle = _known([r.to_oracle for r in here], where)
        base_gaps = _known([default[(r.task, r.rank)].to_oracle for r in here], where)
        cells = [_sci(x) + (" (default)" if is_default else "") for x in targets]
        cells += [f"{len(here)} ({len({r.task for r in here})})", worst(to_oracle), worst(base_gaps)]
        cells.append(
            f"{statistics.fmean(g[0] for g, _ in to_oracle):+.1%} / "
            f"{statistics.fmean(g[0] for g, _ in base_gaps):+.1%}"
        )
        to_default = [(r.to_default, w) for r, w in zip(here, where, strict=True)]
        cells.append("–" if is_default else worst(to_default))
        out.append("| " + " | ".join(cells) + " |")
    return out


def _known(gaps: Sequence[Gap | None], where: Sequence[str]) -> list[tuple[Gap, str]]:
    """The gaps that paired, each with its row's name."""
    return [(g, w) for g, w in zip(gaps, where, strict=True) if g is not None and g[2]]


def _short(name: str, schedule: str = "") -> str:
    """``MiniLM debates (a task …), 150 steps, …`` → ``debates 150``: a task's name in a cell,
    with ``schedule`` after it where given (a probe's, which shares the name's first words)."""
    words = name.split(" (")[0].split(",")[0].split()
    steps = re.search(r"(\d+) steps", name)
    short = " ".join(words[1:] if words[0] == "MiniLM" else words) + (f" {steps.group(1)}" if steps else "")
    return short + (f" {schedule}" if schedule else "")


def format_response(tasks: Sequence[Task] = TASKS, lr: float = 1e-4, subsets: Path = SUBSETS) -> str:
    """The whole table over ``tasks`` (those whose results file exists)."""
    out = [
        "# The law's targets on every task (`python -m research.target_response`)",
        "",
        f"The law at base LR {lr:g} from the recipe's α = 2r, on each task's selection seeds and, where "
        "they ran, its held-out seeds; `a` is A's mean relative step per step it holds and `u` the "
        f"weight's mean relative update (the defaults {_sci(DEFAULT_A)} and {_sci(DEFAULT_U)}). Gaps "
        "are paired over the seeds (mean ± SE, relative; negative = lower loss); the oracle cell is "
        "chosen on the selection seeds. A tag other than `a` and `u` (an ablation) is left out.",
        "",
        "| task | r | seeds | a | u | held-out loss (n) | vs the defaults | training loss vs the "
        "defaults | vs the oracle cell | oracle cell |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    pairs: list[tuple[Gap, Gap]] = []
    collected: list[TargetRow] = []
    for task in tasks:
        setting = None
        if task.out.exists():
            setting = setting_records(
                task.out, model=task.model, selection_seeds=task.selection_seeds, steps=task.steps,
                schedule=task.schedule,
            )  # fmt: skip
        if setting is not None:
            out += task_rows(task, setting, lr, pairs=pairs, collect=collected) + task_rows(
                task, setting, lr, held_out=True, pairs=pairs
            )
    out += ["", agreement(pairs)]
    out += [
        "",
        "## One constant for every task: each target's worst case on the selection seeds",
        "",
        "Over the (task, rank) rows where a target ran on a task's selection seeds: its paired gap to "
        "the oracle cell at its worst and on the mean, beside the defaults' on the same rows, and its "
        "worst paired gap to the defaults (relative; negative = lower loss; the oracle cell's seeds "
        "pair with the grid's). A target that serves every task keeps its worst case small.",
        "",
        "| a | u | rows (tasks) | worst vs the oracle cell | the defaults' worst, same rows | mean vs "
        "the oracle: target / defaults | worst vs the defaults |",
        "|---|---|---|---|---|---|---|",
        *worst_case(collected),
    ]
    if subsets.exists():
        out += [
            "",
            f"## On part of the training set (`lm_bench --train-size`, `{subsets.name}`)",
            "",
            "The same law on a fixed subset of a task's training set (every run draws the same one), so "
            "that the run passes over its data more often; passes = steps × batch / examples.",
            "",
            "| task | steps | examples | passes | r | seeds | a | u | held-out loss (n) | vs the defaults |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *subset_rows(read_records(subsets), lr),
        ]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    args.out.write_text(format_response(), encoding="utf-8")
    print(args.out.read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
