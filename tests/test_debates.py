"""The second classification task (research.debates): its file, its split, and a few real steps."""

from __future__ import annotations

import csv
import gzip
import math
from pathlib import Path

import pytest

from alpha_tuner.demo.assets import missing_reason
from research.debates import HELD_OUT_FRACTION, LABELS, MIN_WORDS, load_statements, split_statements


def _write(path: Path, rows: list[tuple[str, str]]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["speaker", "statement", "debate", "party", "speaker and debate"])
        for side, text in rows:
            writer.writerow(["X", text, "1st", side, "X 1st"])
    return path


def test_short_statements_are_dropped_and_sides_become_class_ids(tmp_path: Path) -> None:
    long = "one two three four five"
    path = _write(
        tmp_path / "d.csv.gz", [("Moderator", long), ("Republican", "Wrong."), ("Democratic", long + "\n")]
    )
    assert MIN_WORDS == 5 and load_statements(path) == [(long, 2), (long, 0)]


def test_an_unknown_side_is_named(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.csv.gz", [("Green", "one two three four five")])
    with pytest.raises(ValueError, match="unknown side 'Green'"):
        load_statements(path)


def test_the_split_holds_out_a_quarter_of_each_side_once() -> None:
    examples = [(f"s{i}", i % 3) for i in range(300)] + [(f"t{i}", 1) for i in range(40)]
    train, held = split_statements(examples)
    assert sorted(train + held) == sorted(examples) and not set(train) & set(held)
    for label in range(len(LABELS)):
        n = sum(y == label for _, y in examples)
        assert sum(y == label for _, y in held) == round(HELD_OUT_FRACTION * n)
    assert split_statements(examples) == (train, held)  # drawn once: the same every time
    assert split_statements(examples, seed=1) != (train, held)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.skipif(missing_reason() is not None, reason="needs `bash scripts/setup_assets.sh`")
def test_the_debates_task_trains_a_three_way_head_through_the_trainer() -> None:
    from research.lm_bench import LMRun, execute
    from research.tasks import fresh_model, task_data

    train, held = task_data("debates", 32)
    assert len(train) > 600 and len(held) > 200
    assert {item["labels"] for item in held} == {0, 1, 2}
    assert fresh_model("debates", 0).classifier.out_features == len(LABELS)
    record = execute(LMRun("steps", 4, 1e-4, seed=0, steps=3, model="debates", batch_size=4, block=32))
    assert record["key"].startswith("debates|steps|r=4|")
    assert math.isfinite(record["eval_loss"]) and record["lora_b_norm"] > 0
