"""The targets table (research.target_response) pairs the law's tagged runs by seed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from research.lead import Task
from research.target_response import DEFAULT_A, DEFAULT_U, format_response, mean_train_loss, targets_of


def _rec(
    method: str, seed: int, loss: float, *, tag: str = "", alpha: float | None = None, lr: float = 1e-4
) -> dict:
    config = {"method": method, "rank": 8, "lr": lr, "seed": seed, "alpha": alpha, "tag": tag,
              "model": "debates", "steps": 150, "schedule": "linear"}  # fmt: skip
    return {"key": json.dumps(config, sort_keys=True), "config": config, "eval_loss": loss}


def test_targets_of_reads_only_the_target_tags() -> None:
    assert targets_of("steps") == (DEFAULT_A, DEFAULT_U) == (1e-2, 3e-4)
    assert targets_of("steps [u=1e-3]") == pytest.approx((1e-2, 1e-3))
    assert targets_of("steps [a=5e-3]") == pytest.approx((5e-3, 3e-4))
    assert targets_of("steps [a=2e-2,u=1e-3]") == pytest.approx((2e-2, 1e-3))
    assert targets_of("steps [u=1e-3,h=1e-3]") is None  # an ablation of another constant too
    assert targets_of("steps [u=1e-3,u=6e-4]") is None and targets_of("steps [u=]") is None
    assert targets_of("steps [u=1e-3] α=16") is None and targets_of("lora α=2r") is None


def test_rows_pair_each_target_with_the_default_and_the_oracle(tmp_path: Path) -> None:
    records = []
    for seed, jitter in ((0, 0.0), (1, 0.02), (100, 0.01)):
        records += [
            _rec("steps", seed, 0.74 + jitter),
            _rec("steps", seed, 0.70 + jitter, tag="u=1e-3"),
            _rec("steps", seed, 0.60, tag="h=1e-3,u=1e-3"),  # left out: the head's LR too
            _rec("lora", seed, 0.69 + jitter, alpha=64.0, lr=1e-3),  # the oracle cell
            _rec("lora", seed, 0.90 + jitter, alpha=16.0, lr=1e-3),
        ]
    path = tmp_path / "debates.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    task = Task("debates", path, "debates", 150, "linear", (100,), (0, 1))
    table = format_response((task,), subsets=tmp_path / "no_subsets.jsonl")
    lines = [line for line in table.splitlines() if line.startswith("| debates")]
    assert len(lines) == 4
    held = [line.split(" | ") for line in lines if "| held-out |" in line]
    assert [row[5] for row in held] == ["0.7500 (1)", "0.7100 (1)"]  # seed 100 against the same cell
    assert held[0][8] == f"{0.05 / 0.70:+.1%}" and held[1][9] == "α = 64, lr 0.001 |"
    assert held[1][7] == "–"  # no training curves in these records
    lines = [line for line in lines if "| selection |" in line]
    default, raised = (line.split(" | ") for line in lines)
    assert default[2] == raised[2] == "selection"
    assert default[3:5] == ["1e-2 (default)", "3e-4 (default)"]
    assert default[5] == "0.7500 (2)" and default[6] == "–"
    assert raised[3:5] == ["1e-2", "1e-3"] and raised[5] == "0.7100 (2)"
    assert raised[6] == f"{-0.04 / 0.75:+.1%} ± 0.0%"  # paired: the same −0.04 on both seeds
    assert default[8] == f"{0.05 / 0.70:+.1%} ± 0.0%" and raised[9] == "α = 64, lr 0.001 |"


def test_subset_runs_are_paired_with_the_default_on_the_same_subset() -> None:
    from research.target_response import subset_rows

    def sub(seed: int, loss: float, tag: str = "", size: int = 665) -> dict:
        rec = _rec("steps", seed, loss, tag=tag)
        rec["config"] |= {"model": "minilm", "train_size": size, "batch_size": 8}
        return rec

    records = [
        sub(0, 0.66),
        sub(1, 0.64),
        sub(0, 0.59, "u=1e-3"),
        sub(1, 0.57, "u=1e-3"),
        sub(0, 0.48, size=2000),
    ]
    records.append(_rec("steps", 0, 0.40))  # the whole training set: not a subset row
    records += [sub(100, 0.55), sub(100, 0.56, "u=1e-3")]  # a held-out seed: its own rows
    rows = subset_rows(records)
    assert len(rows) == 5 and all("| minilm | 150 |" in row for row in rows)
    small = [row.split(" | ") for row in rows if "| 665 |" in row and "| selection |" in row]
    assert small[0][3] == "1.8" and small[0][7] == "3e-4 (default)" and small[0][8] == "0.6500 (2)"
    assert small[1][7] == "1e-3" and small[1][9] == f"{-0.07 / 0.65:+.1%} ± 0.0% |"
    held = [row for row in rows if "| held-out |" in row]
    assert len(held) == 2 and held[1].endswith(f"| 0.5600 (1) | {0.01 / 0.55:+.1%} |")
    (large,) = [row for row in rows if "| 2000 |" in row]
    assert "| 0.6 |" in large and large.endswith("| – |")


def test_selection_rows_take_every_seed_below_the_held_out_ones(tmp_path: Path) -> None:
    records = [_rec("lora", s, 0.69, alpha=64.0, lr=1e-3) for s in (0, 1)]  # the grid: seeds 0, 1
    for seed in (0, 1, 2, 3):
        records += [_rec("steps", seed, 0.74), _rec("steps", seed, 0.70, tag="u=1e-3")]
    path = tmp_path / "debates.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    task = Task("debates", path, "debates", 150, "linear", (100,), (0, 1))
    table = format_response((task,), subsets=tmp_path / "none.jsonl")
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| debates")]
    assert [row[5] for row in rows] == ["0.7400 (4)", "0.7000 (4)"]  # seeds 0–3
    assert rows[1][8] == f"{0.01 / 0.69:+.1%} ± 0.0% (2)"  # against the oracle on the grid's seeds only


def test_mean_train_loss_is_the_mean_of_the_logged_curve() -> None:
    assert mean_train_loss({"train_curve": [[10, 1.0], [20, 0.5], [30, 0.6]]}) == pytest.approx(0.7)
    assert mean_train_loss({"train_curve": []}) is None and mean_train_loss({}) is None
    assert mean_train_loss({"train_curve": [[10, 1.0], [20, float("nan")]]}) is None


def test_training_loss_gap_is_paired_by_seed(tmp_path: Path) -> None:
    records = [_rec("lora", s, 0.69, alpha=64.0, lr=1e-3) for s in (0, 1)]
    for seed, level in ((0, 1.0), (1, 0.8)):
        default, raised = _rec("steps", seed, 0.74), _rec("steps", seed, 0.70, tag="u=1e-3")
        default["train_curve"] = [[10, level], [20, level - 0.2]]  # mean level − 0.1
        raised["train_curve"] = [[10, level - 0.1], [20, level - 0.3]]  # 0.1 lower on both seeds
        records += [default, raised]
    records.append(_rec("steps", 2, 0.70, tag="u=1e-3"))  # seed 2: no curve, and no default to pair
    path = tmp_path / "debates.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    task = Task("debates", path, "debates", 150, "linear", (100,), (0, 1))
    table = format_response((task,), subsets=tmp_path / "none.jsonl")
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| debates")]
    assert rows[0][7] == "–"  # the default's own row
    assert rows[1][7] == f"{-0.1 / 0.8:+.1%} ± 0.0% (2)"  # mean of the defaults' 0.9 and 0.7: 0.8


def test_agreement_counts_same_signs_and_clear_opposites() -> None:
    from research.target_response import agreement

    pairs = [
        ((0.05, 0.01, 6), (0.02, 0.005, 6)),  # same sign
        ((-0.03, 0.01, 6), (0.02, 0.005, 6)),  # opposite, both clear
        ((-0.03, 0.02, 6), (0.01, 0.008, 6)),  # opposite, neither clear
        ((0.01, 0.01, 6), (float("nan"), float("nan"), 0)),  # no training curve: left out
    ]
    line = agreement(pairs)
    assert "moves in 1 of 3;" in line and "in 1 both move" in line


def test_worst_case_compares_each_target_with_the_defaults_on_the_same_rows() -> None:
    from research.target_response import TargetRow, worst_case

    d, raised = (DEFAULT_A, DEFAULT_U), (DEFAULT_A, 1e-3)
    rows = [
        TargetRow("MiniLM debates (a task), 150 steps, x", 8, d, (0.0, 0.0, 6), (0.06, 0.02, 2)),
        TargetRow("MiniLM debates (a task), 150 steps, x", 8, raised, (-0.03, 0.01, 6), (0.02, 0.01, 2)),
        TargetRow("MiniLM sentiment, 150 steps, x", 64, d, (0.0, 0.0, 6), (-0.05, 0.01, 2)),
        TargetRow("MiniLM sentiment, 150 steps, x", 64, raised, (0.30, 0.10, 6), (0.08, 0.03, 2)),
        TargetRow("causal LM (SmolLM2-135M), 300 steps, x", 8, d, (0.0, 0.0, 1), (0.002, float("nan"), 1)),
        # a target where the defaults did not run is not compared; nor a row with no oracle cell
        TargetRow("MiniLM party (a task), 150 steps, x", 8, raised, (0.01, 0.01, 2), (0.0, 0.0, 2)),
        TargetRow("MiniLM debates (a task), 150 steps, x", 8, (5e-3, 3e-4), (0.01, 0.01, 6), None),
    ]
    default_row, raised_row = (line.split(" | ") for line in worst_case(rows))
    assert default_row[2] == "3 (3)"
    assert default_row[3] == default_row[4] == "+6.0% ± 2.0% (debates 150, r = 8; 2 seeds)"
    assert default_row[6] == "– |"
    assert raised_row[:3] == ["| 1e-2", "1e-3", "2 (2)"]
    assert raised_row[3] == "+8.0% ± 3.0% (sentiment 150, r = 64; 2 seeds)"
    assert raised_row[4] == "+6.0% ± 2.0% (debates 150, r = 8; 2 seeds)"  # the defaults on those two rows
    assert raised_row[5] == "+5.0% / +0.5%"
    assert raised_row[6] == "+30.0% ± 10.0% (sentiment 150, r = 64; 6 seeds) |"


def test_a_task_is_named_short_in_a_cell_and_a_probe_keeps_its_schedule() -> None:
    from research.target_response import _short

    assert (
        _short("MiniLM debates (a task the constants never saw), 150 steps, warm-up + linear")
        == "debates 150"
    )
    assert _short("causal LM (SmolLM2-135M), 300 steps, warm-up + linear") == "causal LM 300"
    probe = "MiniLM sentiment, 150 steps, warm-up + linear (a probe: the law and the oracle cell)"
    assert _short(probe, "linear") == "sentiment 150 linear" and _short(
        "MiniLM sentiment, 150 steps, constant LR"
    ) == ("sentiment 150")
