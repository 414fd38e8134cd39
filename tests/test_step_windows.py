"""The step windows (research.step_windows): each task's good plain-LoRA steps, in the law's units."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from research.lead import Task
from research.lm_bench import LMRun
from research.step_windows import collect, format_windows, grid, law_cell, shared_u, window_rows


def _rec(
    method: str, alpha: float | None, lr: float, seed: int, loss: float, u: float | None, *,
    schedule: str = "linear", mean: float | None = 0.5, a: float = 1e-2, tag: str = "",
    model: str = "debates",
) -> dict:  # fmt: skip
    warmup = 0.0 if schedule == "constant" else 0.1
    run = LMRun(
        method, 8, lr, seed, alpha=alpha, model=model, steps=150, schedule=schedule, warmup=warmup, tag=tag
    )
    rec = {
        "key": run.key(),
        "config": vars(run),
        "eval_loss": loss,
        "step_s": 1.0,
        "train_curve": [[10, loss]],
    }
    if u is not None:
        rec |= {"update_end": u, "a_step_end": a}
    if mean is not None:
        rec["schedule_mean"] = mean
    return rec


def _grid(seeds: tuple[int, ...] = (0, 1), **kw: object) -> list[dict]:
    """r = 8 under linear decay (f̄ = ½): α = 64 at 1e-3 best (0.70, peak u 2e-3), α = 16 at 1e-3
    within 2 % (0.71, u 6e-4), α = 256 at 1e-3 far behind (1.0, u 8e-3), α = 16 at 1e-4 behind
    (0.80, u 1e-4)."""
    cells = [
        (64.0, 1e-3, 0.70, 2e-3),
        (16.0, 1e-3, 0.71, 6e-4),
        (256.0, 1e-3, 1.0, 8e-3),
        (16.0, 1e-4, 0.80, 1e-4),
    ]
    return [_rec("lora-metered", a, lr, s, loss, u, **kw) for a, lr, loss, u in cells for s in seeds]  # type: ignore[arg-type]


def test_the_window_holds_the_cells_within_two_percent_in_the_law_s_units() -> None:
    records = _grid()
    records.append(_rec("lora-metered", 64.0, 1e-4, 0, 0.9, 1e-3))  # one seed only: not a cell
    cells = {(c.alpha, c.lr): c for c in grid(records, (0, 1))[8]}
    assert set(cells) == {(64.0, 1e-3), (16.0, 1e-3), (256.0, 1e-3), (16.0, 1e-4)}
    # the peak reading times f̄ = ½
    assert cells[(64.0, 1e-3)].u == pytest.approx(1e-3) and cells[(64.0, 1e-3)].a == pytest.approx(5e-3)
    task = Task("debates", Path("x"), "debates", 150, "linear", (100,), (0, 1))
    (row,) = window_rows(task, records, {8: (64.0, 1e-3)}, (0, 1))
    assert [(c.alpha, c.lr) for c in row.window] == [(16.0, 1e-3), (64.0, 1e-3)]  # by u
    assert row.below is not None and (row.below.alpha, row.below.lr) == (16.0, 1e-4)
    assert row.above is not None and (row.above.alpha, row.above.lr) == (256.0, 1e-3)
    # an oracle cell that did not run here (borrowed from another setting): no row
    assert window_rows(task, records, {8: (4.0, 1e-3)}, (0, 1)) == []


def test_a_reading_needs_the_schedule_s_mean_except_at_a_constant_lr() -> None:
    linear = grid(_grid(mean=None), (0, 1))[8]
    assert all(c.u is None and c.a is None and c.read == 0 for c in linear)
    constant = grid(_grid(schedule="constant", mean=None), (0, 1))[8]
    assert sorted(c.u for c in constant) == pytest.approx([1e-4, 6e-4, 2e-3, 8e-3])  # f̄ = 1
    # a cell with a reading on one seed of two averages that one
    mixed = _grid()
    mixed[0] = _rec("lora-metered", 64.0, 1e-3, 0, 0.70, None)
    (best,) = [c for c in grid(mixed, (0, 1))[8] if c.alpha == 64.0 and c.lr == 1e-3]
    assert (best.n, best.read, best.u) == (2, 1, pytest.approx(1e-3))


def test_the_law_s_cell_is_its_defaults_at_lr_1e_4_from_alpha_2r() -> None:
    records = [
        _rec("steps", None, 1e-4, 100, 0.72, 6e-4, a=2e-2),
        _rec("steps", None, 1e-4, 101, 0.74, 6e-4, a=2e-2),
        _rec("steps", None, 1e-3, 100, 0.50, 1.0),  # another LR
        _rec("steps", 16.0, 1e-4, 100, 0.50, 1.0),  # another recipe α
        _rec("steps", None, 1e-4, 102, 0.50, 1.0, tag="u=1e-3"),  # a probe
    ]
    cell = law_cell(records, 8)
    assert cell is not None and (cell.n, cell.loss) == (2, pytest.approx(0.73))
    assert (cell.a, cell.u) == (pytest.approx(1e-2), pytest.approx(3e-4))
    assert law_cell(records, 32) is None


def test_the_summary_says_whether_one_u_lies_in_every_window(tmp_path: Path) -> None:
    debates = Task("debates task", tmp_path / "d.jsonl", "debates", 150, "linear", (100,), (0, 1))
    party = Task("party task", tmp_path / "p.jsonl", "party", 150, "linear", (100,), (0, 1))
    debates.out.write_text("".join(json.dumps(r) + "\n" for r in _grid()))
    # party's good runs step smaller: its best cell α = 16 at 1e-4 (u 5e-5), nothing else within 2 %
    cells = [(16.0, 1e-4, 0.60, 1e-4), (64.0, 1e-3, 0.90, 2e-3), (16.0, 1e-3, 0.65, 6e-4)]
    party.out.write_text(
        "".join(json.dumps(_rec("lora-metered", a, lr, s, loss, u, model="party")) + "\n"
                for a, lr, loss, u in cells for s in (0, 1))
    )  # fmt: skip
    rows = collect([debates, party])
    assert [(r.task.name, r.rank) for r in rows] == [("debates task", 8), ("party task", 8)]
    lo, lo_row, hi, hi_row = shared_u(rows)  # type: ignore[misc]
    assert (lo, hi) == (pytest.approx(3e-4), pytest.approx(5e-5))
    assert (lo_row.task.name, hi_row.task.name) == ("debates task", "party task")
    text = format_windows(rows)
    assert (
        "No sampled u lies in every row's window: those of debates 150 linear, r = 8 step at u ≥ 3.0e-04"
        in text
    )
    assert "those of party 150 linear, r = 8 at u ≤ 5.0e-05" in text
    # the next cells out, 5e-5 (debates, below) and 3e-4 (party, above), leave a gap the grid cannot close
    assert "could reach into [5.0e-05, 3.0e-04]" in text
    # one task alone: its window is shared with itself
    assert "Every row's window holds a sampled u in [3.0e-04, 1.0e-03]" in format_windows(rows[:1])
    assert "| debates task | 8 | 0, 1 | α = 64, lr 0.001 | 0.7000 | 5.0e-03 / 1.0e-03 |" in text
