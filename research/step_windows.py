"""How large the steps of each task's good plain-LoRA runs are, beside the law's.

The grid's plain-LoRA runs carry the step law's meter (``lora-metered``: it measures and changes
nothing), so each has the two quantities the law holds: A's relative step ``a`` and the
weight's relative update ``u`` per step. The meter reads each over the schedule's factor at its
step (a peak-LR figure, :mod:`alpha_tuner.steplaw`); times the schedule's mean factor ``f̄`` it is
in the units of the law's targets (``StepLaw(a_step=1e-2, update=3e-4)``: the mean step over
the run). Per task and rank, on the selection seeds:

* the oracle cell (the best (α, LR) of the grid) with its loss, ``a`` and ``u``;
* every cell within :data:`WINDOW` of the oracle's mean loss, the *window*: the steps that would
  meet the tuning-free bar on that task, as far as the grid samples them;
* the law's ``a`` and ``u`` (lr 1e-4 from α = 2r, every seed it ran on: the law holds them, so
  they hardly vary).

Below the table: the ``u`` every row's window shares, if any. If none, no constant update
target puts every task's run among its sampled good cells; as the grid samples ``u`` 2–4×
apart, the line also says how far the two windows furthest apart could reach (up to the next
cells out), and whether they could meet there.

Usage::

    python -m research.step_windows   # writes benchmarks/results/step_windows.md and prints it
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from .bench_report import grid_runs
from .lead import TASKS, Task
from .lm_bench import setting_records

OUT = Path("benchmarks/results/step_windows.md")
#: A cell is in the window where its mean loss is within this fraction of the oracle cell's.
WINDOW = 0.02
LAW_LR = 1e-4

Record = Mapping[str, Any]


class Cell(NamedTuple):
    """A plain-LoRA (α, LR) cell, or the law, over some seeds: the mean loss, and the geometric
    means of a and u (the law's target units) over the runs with a reading."""

    alpha: float
    lr: float
    loss: float
    a: float | None  # None where no run of the cell has a reading
    u: float | None
    n: int  # runs
    read: int  # runs with a reading


class WindowRow(NamedTuple):
    """One (task, rank): the oracle cell, the cells within :data:`WINDOW` of it, the law."""

    task: Task
    rank: int
    oracle: Cell
    window: list[Cell]  # the oracle cell included, by u (cells without u last)
    below: Cell | None  # the cell outside the window with the largest u below the window's
    above: Cell | None  # the cell outside it with the smallest u above the window's
    law: Cell | None


def _reading(run: Record, key: str) -> float | None:
    """The run's ``key`` reading times its schedule's mean factor: 1 at a constant LR without
    warm-up, else the record's ``schedule_mean`` (records made before the law read the schedule
    have none). ``None`` without both."""
    config = run["config"]
    constant = config.get("schedule") == "constant" and not config.get("warmup")
    value, mean = run.get(key), 1.0 if constant else run.get("schedule_mean")
    ok = all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in (value, mean))
    return float(value) * float(mean) if ok else None  # type: ignore[arg-type]


def _cell(alpha: float, lr: float, runs: Sequence[Record]) -> Cell:
    loss = statistics.fmean(float(r["eval_loss"]) for r in runs)
    read = [(a, u) for r in runs if (a := _reading(r, "a_step_end")) and (u := _reading(r, "update_end"))]
    if not read:
        return Cell(alpha, lr, loss, None, None, len(runs), 0)
    a = statistics.geometric_mean(a for a, _ in read)
    u = statistics.geometric_mean(u for _, u in read)
    return Cell(alpha, lr, loss, a, u, len(runs), len(read))


def grid(records: Iterable[Record], seeds: Sequence[int]) -> dict[int, list[Cell]]:
    """Per rank, plain LoRA's cells that ran on every one of ``seeds`` (a diverged run, with no
    finite loss, leaves its cell out)."""
    out: dict[int, list[Cell]] = {}
    for rank, cells in grid_runs(records, seeds).items():
        out[rank] = [
            _cell(float(alpha), lr, list(runs.values())) for (lr, alpha), runs in cells.items()
            if len(runs) == len(seeds)
            and all(r.get("eval_loss") is not None and math.isfinite(r["eval_loss"]) for r in runs.values())
        ]  # fmt: skip
    return out


def law_cell(records: Iterable[Record], rank: int) -> Cell | None:
    """The law's defaults at lr :data:`LAW_LR` from α = 2r, over every seed it ran on."""
    runs = [
        r for r in records
        if r["config"]["method"] == "steps" and r["config"]["rank"] == rank and r["config"]["lr"] == LAW_LR
        and r["config"].get("alpha") is None and not r["config"].get("tag")
        and r.get("eval_loss") is not None and math.isfinite(r["eval_loss"])
    ]  # fmt: skip
    return _cell(2.0 * rank, LAW_LR, runs) if runs else None


def window_rows(
    task: Task, records: Sequence[Record], oracle: Mapping[int, tuple[float, float]], seeds: Sequence[int]
) -> list[WindowRow]:
    """One row per rank whose oracle cell ran here on every one of ``seeds``."""
    rows = []
    for rank, cells in sorted(grid(records, seeds).items()):
        if rank not in oracle:
            continue
        alpha, lr = oracle[rank]
        best = next((c for c in cells if (c.alpha, c.lr) == (alpha, lr)), None)
        if best is None:  # the oracle cell is borrowed from another setting
            continue
        inside = [c for c in cells if c.loss <= best.loss * (1.0 + WINDOW)]
        inside.sort(key=lambda c: (c.u is None, c.u or 0.0))
        us = [c.u for c in inside if c.u is not None]
        outside = [(c.u, c) for c in cells if c not in inside and c.u is not None]
        lower = [pair for pair in outside if us and pair[0] < min(us)]
        upper = [pair for pair in outside if us and pair[0] > max(us)]
        below = max(lower, key=lambda pair: pair[0])[1] if lower else None
        above = min(upper, key=lambda pair: pair[0])[1] if upper else None
        rows.append(WindowRow(task, rank, best, inside, below, above, law_cell(records, rank)))
    return rows


def shared_u(rows: Sequence[WindowRow]) -> tuple[float, WindowRow, float, WindowRow] | None:
    """``(lo, row of lo, hi, row of hi)``: the highest lowest ``u`` and the lowest highest ``u``
    over the rows' windows (``lo ≤ hi``: the windows share ``[lo, hi]``); ``None`` without rows."""
    spans = [(min(us), max(us), row) for row in rows if (us := [c.u for c in row.window if c.u is not None])]
    if not spans:
        return None
    lo = max(spans, key=lambda s: s[0])
    hi = min(spans, key=lambda s: s[1])
    return lo[0], lo[2], hi[1], hi[2]


def _steps(cell: Cell | None) -> str:
    if cell is None:
        return "–"
    a = "–" if cell.a is None else f"{cell.a:.1e}"
    u = "–" if cell.u is None else f"{cell.u:.1e}"
    return f"{a} / {u}"


def _where(row: WindowRow) -> str:
    return f"{row.task.model} {row.task.steps} {row.task.schedule}, r = {row.rank}"


def _next(cell: Cell | None, oracle: Cell) -> str:
    if cell is None or cell.u is None:
        return "no cell of the grid"
    behind = cell.loss / oracle.loss - 1.0
    return f"α = {cell.alpha:g}, lr {cell.lr:g}, u {cell.u:.1e}, {behind:+.1%} behind the oracle cell"


def format_windows(rows: Sequence[WindowRow]) -> str:
    """The table and the shared-``u`` line, as Markdown."""
    head = [
        "task", "r", "selection seeds", "oracle cell", "its loss", "its a / u",
        f"cells within {WINDOW:.0%} of it (α, lr: u)", "u within", "a within", "the law's a / u (runs)",
    ]  # fmt: skip
    lines = [
        "## Where each task's good plain-LoRA runs step, beside the law",
        "",
        "a: A's relative step, u: the weight's relative update, per step, in the units of the law's "
        "targets (the mean over the run: the meter's peak-LR reading times the schedule's mean factor; "
        "geometric means over the runs with a reading). "
        f"A cell is in the window where its mean loss on the selection seeds is within {WINDOW:.0%} of the "
        f"oracle cell's. The law: lr {LAW_LR:g} from α = 2r, every seed it ran on. "
        "`python -m research.step_windows`.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in rows:
        inside = ", ".join(
            f"{c.alpha:g}, {c.lr:g}: " + ("–" if c.u is None else f"{c.u:.1e}") for c in row.window
        )
        us = [c.u for c in row.window if c.u is not None]
        as_ = [c.a for c in row.window if c.a is not None]
        span_u = f"{min(us):.1e}–{max(us):.1e}" if us else "–"
        span_a = f"{min(as_):.1e}–{max(as_):.1e}" if as_ else "–"
        law = "–" if row.law is None else f"{_steps(row.law)} ({row.law.n})"
        lines.append(
            f"| {row.task.name} | {row.rank} | {', '.join(map(str, row.task.selection_seeds))} | "
            f"α = {row.oracle.alpha:g}, lr {row.oracle.lr:g} | {row.oracle.loss:.4f} | "
            f"{_steps(row.oracle)} | {inside} | {span_u} | {span_a} | {law} |"
        )
    shared = shared_u(rows)
    lines.append("")
    if shared is None:
        lines.append("No window has a reading of u.")
    else:
        lo, lo_row, hi, hi_row = shared
        if lo <= hi:
            lines.append(f"Every row's window holds a sampled u in [{lo:.1e}, {hi:.1e}] (its ends: "
                         f"{_where(lo_row)}; {_where(hi_row)}).")  # fmt: skip
        else:
            lines.append(
                f"No sampled u lies in every row's window: those of {_where(lo_row)} step at u ≥ {lo:.1e} "
                f"(the next cell below: {_next(lo_row.below, lo_row.oracle)}), those of {_where(hi_row)} at "
                f"u ≤ {hi:.1e} (the next cell above: {_next(hi_row.above, hi_row.oracle)})."
            )
            low_edge = None if lo_row.below is None else lo_row.below.u
            high_edge = None if hi_row.above is None else hi_row.above.u
            if low_edge is not None and high_edge is not None and low_edge < high_edge:
                lines[-1] += (
                    f" The grid samples u coarsely: both windows' true edges could reach into "
                    f"[{low_edge:.1e}, {high_edge:.1e}], which the grid alone does not decide (the law's own "
                    "runs at other targets do: `python -m research.target_response`)."
                )
            else:
                lines[-1] += " Even the windows' widest possible edges (up to the next cells) do not meet."
    return "\n".join(lines) + "\n"


def collect(tasks: Sequence[Task] = TASKS) -> list[WindowRow]:
    """Every task's rows."""
    rows: list[WindowRow] = []
    for task in tasks:
        setting = setting_records(
            task.out, model=task.model, steps=task.steps, schedule=task.schedule,
            selection_seeds=task.selection_seeds,
        )  # fmt: skip
        if setting is None:
            continue
        rows += window_rows(task, setting.records, setting.oracle, task.selection_seeds)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Write :data:`OUT` from the benchmark's results files and print it."""
    parser = argparse.ArgumentParser(
        prog="python -m research.step_windows", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    rows = collect()
    if not rows:
        parser.exit(2, "research.step_windows: no results file holds a plain-LoRA grid on its selection "
                       "seeds; run the grids in benchmarks/FINDINGS.md first\n")  # fmt: skip
    text = format_windows(rows)
    args.out.write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
