"""The decay probe (research.decay_probe) pairs each run under linear decay with its constant-LR twin."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from research.decay_probe import SEEDS, main, probe_rows
from research.lm_bench import LMRun


def _rec(
    method: str, lr: float, seed: int, loss: float, schedule: str = "constant", alpha: float | None = None
) -> dict:
    run = LMRun(method, 4, lr, seed, alpha=alpha, model="minilm", steps=150, schedule=schedule, warmup=0.0)
    return {
        "key": run.key(),
        "config": vars(run),
        "eval_loss": loss,
        "step_s": 1.0,
        "train_curve": [[10, loss]],
    }


def _records(*, linear: bool = True) -> list[dict]:
    """r = 4: a plain-LoRA grid on the selection seeds (best cell α = 8, lr 1e-3); on the held-out
    seeds the law and that cell at a constant LR and (``linear``) under linear decay, and
    schedule-free AdamW at lr 1e-3. Losses grow by 0.01 per held-out seed."""
    out = []
    for seed in (0, 1):
        out += [_rec("lora", 1e-3, seed, 0.50, alpha=8.0), _rec("lora", 1e-4, seed, 0.60, alpha=8.0)]
    for i, seed in enumerate(SEEDS):
        d = 0.01 * i
        out += [_rec("steps", 1e-4, seed, 0.55 + d), _rec("lora", 1e-3, seed, 0.52 + d, alpha=8.0)]
        out.append(_rec("schedulefree", 1e-3, seed, 0.50 + d))
        out.append(_rec("steps", 1e-4, seed, 0.60, alpha=16.0))  # another recipe α: not the law's row
        if linear:
            out += [
                _rec("steps", 1e-4, seed, 0.50 + d, "linear"),
                _rec("lora", 1e-3, seed, 0.55 + d, "linear", 8.0),
            ]
    return out


def test_each_gap_pairs_the_named_runs_seed_by_seed() -> None:
    ((rank, cell, law_c, law_l, law_gap, cell_c, cell_l, cell_gap, law_vs_cell, free, vs_c, vs_l),) = (
        probe_rows(_records(), {4: (8.0, 1e-3)})
    )
    assert (rank, cell) == ("4", "α = 8, lr 0.001")
    assert (law_c, law_l, cell_c, cell_l, free) == (
        "0.5650 (4)",
        "0.5150 (4)",
        "0.5350 (4)",
        "0.5650 (4)",
        "0.5150 (4)",
    )
    # paired relative gaps: a constant difference gives SE 0
    assert law_gap == f"{-0.05 / 0.565:+.1%} ± 0.0% (4)"
    assert cell_gap == f"{0.03 / 0.535:+.1%} ± 0.0% (4)"
    assert law_vs_cell == f"{-0.05 / 0.565:+.1%} ± 0.0% (4)"
    assert vs_c == f"{0.05 / 0.515:+.1%} ± 0.0% (4)" and vs_l == "+0.0% ± 0.0% (4)"
    # no law run under linear decay: no row
    assert probe_rows(_records(linear=False), {4: (8.0, 1e-3)}) == []


def test_the_cli_writes_the_table_and_refuses_a_file_without_the_linear_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results, out = tmp_path / "bench.jsonl", tmp_path / "probe.md"
    results.write_text("".join(json.dumps(r) + "\n" for r in _records()), encoding="utf-8")
    assert main(["--results", str(results), "--out", str(out)]) == 0
    assert "| 4 | α = 8, lr 0.001 | 0.5650 (4) | 0.5150 (4) |" in out.read_text(encoding="utf-8")
    results.write_text("".join(json.dumps(r) + "\n" for r in _records(linear=False)), encoding="utf-8")
    with pytest.raises(SystemExit) as exit_:
        main(["--results", str(results), "--out", str(tmp_path / "none.md")])
    assert exit_.value.code == 2 and "under linear decay" in capsys.readouterr().err
    assert not (tmp_path / "none.md").exists()
