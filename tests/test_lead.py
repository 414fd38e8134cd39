"""The lead table (research.lead) reads the benchmark's records as the per-task reports do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from research.lead import (
    END,
    MIN_PAIRED,
    START,
    Task,
    coverage,
    format_coverage,
    format_lead,
    lead_rows,
    main,
    online_rows,
    splice,
)

SEEDS = (100, 101, 102, 103)


def _rec(method: str, rank: int, lr: float, seed: int, loss: float, *, alpha: float | None = None) -> dict:
    config = {"method": method, "rank": rank, "lr": lr, "seed": seed, "alpha": alpha, "tag": "",
              "model": "minilm", "steps": 150, "schedule": "constant"}  # fmt: skip
    return {"key": json.dumps(config, sort_keys=True), "config": config, "eval_loss": loss}


def _records() -> list[dict]:
    """r = 4: plain LoRA's grid (best cell α = 16, lr 1e-3 on the selection seeds), the law at three
    LRs, rsLoRA ahead of the law at lr 1e-3 only, Prodigy (LR-free), and the static placement."""
    out = []
    for seed in (0, 1, *SEEDS):
        jitter = 0.001 * (seed % 7)
        for lr, loss in ((1e-5, 0.69), (1e-4, 0.60), (1e-3, 0.50)):
            out.append(_rec("lora", 4, lr, seed, loss + jitter, alpha=16.0))
            out.append(_rec("lora", 4, lr, seed, loss + 0.05 + jitter))  # α = 2r
        if seed < 100:
            continue
        for lr, loss in ((1e-5, 0.52), (1e-4, 0.51), (1e-3, 0.52)):
            out.append(_rec("steps", 4, lr, seed, loss + jitter))
            out.append(_rec("rslora", 4, lr, seed, (0.51 if lr == 1e-3 else 0.60) + jitter))
        out.append(_rec("prodigy", 4, 1.0, seed, 0.55 + jitter))
        out.append(_rec("steps-static", 4, 1e-4, seed, (0.51 + jitter) * 1.1))
    return out


def test_the_law_against_the_oracle_and_the_peers() -> None:
    records = _records()
    (row,) = lead_rows(records, {4: (16.0, 1e-3)}, SEEDS)
    assert row["rank"] == 4 and row["lrs"] == [1e-5, 1e-4, 1e-3]
    assert row["law"][1e-4] == (pytest.approx(0.51 + 0.0035), 4)  # seeds 100–103: jitter 2–5 thousandths
    gap, se, n = row["oracle"][1e-4]
    assert n == 4 and gap == pytest.approx(0.01 / 0.5035, rel=1e-6) and se == pytest.approx(0, abs=1e-12)
    assert row["spread"]["law"] == pytest.approx(0.01 / (0.51 + 0.0035), rel=1e-6)
    assert row["spread"]["plain"] == pytest.approx(0.19 / 0.5535, rel=1e-6)  # α = 2r: 0.74 … 0.55
    # lora α=2r, lora α=16, rsLoRA and Prodigy at three LRs each; rsLoRA wins at 1e-3 only, and
    # plain LoRA α = 16 at 1e-3 is the oracle cell itself, 0.02 ahead
    assert row["cells"] == 12 and row["beaten"] == 10
    assert [(peer, lr) for peer, lr, _ in row["behind"]] == [("lora α=16", 1e-3), ("rslora", 1e-3)]


def test_a_peer_with_too_few_seeds_in_common_is_not_counted() -> None:
    records = [
        r for r in _records() if not (r["config"]["method"] == "rslora" and r["config"]["seed"] == 103)
    ]
    (row,) = lead_rows(records, {4: (16.0, 1e-3)}, SEEDS)
    assert MIN_PAIRED == 4 and row["cells"] == 9 and all(peer != "rslora" for peer, _, _ in row["behind"])
    # where the law itself ran on fewer seeds, all of its seeds are enough
    records = [r for r in records if not (r["config"]["method"] == "steps" and r["config"]["seed"] >= 102)]
    (row,) = lead_rows(records, {4: (16.0, 1e-3)}, SEEDS)
    assert row["cells"] == 12 and row["law"][1e-4][1] == 2


def test_the_online_table_gives_each_variant_as_a_paired_gap_to_the_law() -> None:
    ((rank, lr, shown),) = online_rows(_records(), SEEDS)
    assert (rank, lr) == (4, 1e-4)
    assert shown[0].endswith("(4)") and shown[1].startswith("+10.00%") and shown[2:] == ["–", "–"]


def test_format_lead_reads_a_results_file(tmp_path: Path) -> None:
    out = tmp_path / "bench.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in _records()), encoding="utf-8")
    task = Task("toy", out, "minilm", 150, "constant", SEEDS, (0, 1))
    text = format_lead([task])
    assert "r = 4: oracle α = 16, lr 0.001" in text  # chosen on the selection seeds 0 and 1
    assert "| toy | 4 | 2r | 0.5235 (4) / 0.5135 (4) / 0.5235 (4) |" in text
    assert "10 of 12" in text and "| toy | 4 | 0.0001 | 0.5135 (4) | +10.00%" in text
    assert (
        format_lead([Task("none", tmp_path / "missing.jsonl", "minilm", 150, "constant", SEEDS, (0,))]).count(
            "| none |"
        )
        == 0
    )


def test_the_peer_cells_beaten_are_summed_over_the_rows_and_per_task(tmp_path: Path) -> None:
    out = tmp_path / "bench.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in _records()), encoding="utf-8")
    task = Task("toy", out, "minilm", 150, "constant", SEEDS, (0, 1))
    assert "Peer cells beaten, summed over the rows: 10 of 12 (83.3%) (toy: 10 of 12)." in format_lead([task])
    twice = format_lead([task, Task("again", out, "minilm", 150, "constant", SEEDS, (0, 1))])
    assert "summed over the rows: 20 of 24 (83.3%) (toy: 10 of 12; again: 10 of 12)." in twice
    assert "the tuning-free bar names (vanilla LoRA, rsLoRA, LoRA+, Prodigy): 20 of 24 (83.3%)." in twice


def test_the_bar_s_own_peers_are_counted_apart_from_every_peer(tmp_path: Path) -> None:
    """Schedule-free AdamW (a peer of the benchmark, not of the tuning-free bar) beats the law at
    every LR: it counts in the table's total, not in the bar's."""
    records = _records() + [_rec("schedulefree", 4, lr, s, 0.40) for lr in (1e-5, 1e-4, 1e-3) for s in SEEDS]
    (row,) = lead_rows(records, {4: (16.0, 1e-3)}, SEEDS)
    assert (row["beaten"], row["cells"]) == (10, 15) and row["bar"] == (10, 12)
    out = tmp_path / "bench.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    text = format_lead([Task("toy", out, "minilm", 150, "constant", SEEDS, (0, 1))])
    assert (
        "summed over the rows: 10 of 15 (66.7%) (toy: 10 of 15). Against the peers the tuning-free bar"
        in text
    )
    assert "(vanilla LoRA, rsLoRA, LoRA+, Prodigy): 10 of 12 (83.3%)." in text


def test_coverage_lists_the_cells_short_of_held_out_seeds(tmp_path: Path) -> None:
    records = [
        r for r in _records()
        if not (r["config"]["method"] == "steps" and r["config"]["lr"] == 1e-5 and r["config"]["seed"] == 103)
    ]  # fmt: skip
    ((rank, short),) = coverage(records, SEEDS)
    # the law at 1e-5 on three seeds; LoRA+ and schedule-free never ran, nor D-Adaptation (LR-free:
    # one cell); plain LoRA (α = 2r and 16), rsLoRA and Prodigy ran on every seed
    assert rank == 4 and short == [
        "steps at 1e-05 (3)",
        "loraplus at 1e-05 (0)", "loraplus at 0.0001 (0)", "loraplus at 0.001 (0)",
        "dadapt (0)",
        "schedulefree at 1e-05 (0)", "schedulefree at 0.0001 (0)", "schedulefree at 0.001 (0)",
    ]  # fmt: skip
    # at r = 8 plain LoRA's α = 16 is its α = 2r: not listed as missing
    at_r8 = [{**r, "config": {**r["config"], "rank": 8}} for r in records]
    ((_, short8),) = coverage(at_r8, SEEDS)
    assert not any("α=16" in cell for cell in short8) and "steps at 1e-05 (3)" in short8
    # two seeds asked for: two are enough
    ((_, two),) = coverage(records, SEEDS[:2])
    assert "steps at 1e-05 (3)" not in two and "dadapt (0)" in two
    out = tmp_path / "bench.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    text = format_coverage([Task("toy", out, "minilm", 150, "constant", SEEDS, (0, 1))])
    assert "- toy, r = 4: steps at 1e-05 (3); loraplus at 1e-05 (0);" in text
    probe = Task("toy", out, "minilm", 150, "constant", SEEDS, (0, 1), probe=True)
    assert "toy" not in format_coverage([probe]) and "| toy | 4 |" in format_lead([probe])


def test_an_oracle_cell_borrowed_from_the_tasks_own_horizon_is_named_so(tmp_path: Path) -> None:
    records = _records()
    for r in records:  # the grid on the selection seeds ran only at the task's own setting
        if r["config"]["seed"] < 100 and r["config"]["method"] == "lora":
            r["config"] |= {"steps": 600, "schedule": "cosine"}
    out = tmp_path / "bench.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    text = format_lead([Task("toy", out, "minilm", 150, "constant", SEEDS, (0, 1))])
    assert "r = 4: oracle α = 16, lr 0.001 (chosen at the task's own horizon: no grid at this one)" in text
    assert "| toy | 4 | 2r | 0.5235 (4) / 0.5135 (4) / 0.5235 (4) | +3.97% ± 0.00% (4) / +1.99%" in text
    # with the grid at this horizon too, the cell is this horizon's own
    out.write_text("".join(json.dumps(r) + "\n" for r in _records()), encoding="utf-8")
    assert "own horizon" not in format_lead([Task("toy", out, "minilm", 150, "constant", SEEDS, (0, 1))])


def test_an_lr_the_law_did_not_run_at_shows_a_dash(tmp_path: Path) -> None:
    records = [r for r in _records() if not (r["config"]["method"] == "steps" and r["config"]["lr"] == 1e-5)]
    out = tmp_path / "bench.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    text = format_lead([Task("toy", out, "minilm", 150, "constant", SEEDS, (0, 1))])
    assert "| toy | 4 | 2r | – / 0.5135 (4) / 0.5235 (4) | – / +1.99% ± 0.00% (4) / +3.97%" in text


def test_splice_replaces_only_the_marked_block() -> None:
    document = f"# Title\n\nbefore\n{START}\n\nold table\n\n{END}\nafter\n"
    once = splice(document, "new table\n")
    assert once == f"# Title\n\nbefore\n{START}\n\nnew table\n\n{END}\nafter\n"
    assert splice(once, "new table") == once  # idempotent
    with pytest.raises(ValueError, match="add both lines"):
        splice("# no markers\n", "table")
    with pytest.raises(ValueError, match="add both lines"):
        splice(f"{END}\n{START}\n", "table")


def test_the_cli_refuses_a_document_without_markers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("# nothing to replace\n", encoding="utf-8")
    with pytest.raises(SystemExit) as exit_:
        main(["--out", str(tmp_path / "lead.md"), "--into", str(doc)])
    assert exit_.value.code == 2 and "add both lines" in capsys.readouterr().err
    assert not (tmp_path / "lead.md").exists() and doc.read_text(encoding="utf-8") == "# nothing to replace\n"
