"""Every benchmark method runs for a few steps through the real Trainer path (research.peers, lm_bench)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from alpha_tuner import AlphaRule
from alpha_tuner.demo.assets import missing_reason
from research.lm_bench import LMRun, execute, grid
from research.peers import LR_FREE, METHODS, build_peer
from research.provenance import CODE, cpu_model

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(missing_reason() is not None, reason="needs `bash scripts/setup_assets.sh`"),
]


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_through_the_trainer(method: str) -> None:
    lr = 1.0 if method in LR_FREE else 1e-3
    record = execute(LMRun(method, 4, lr, seed=0, steps=12, model="tiny", precision="fp32"))
    assert record["key"].startswith(f"tiny|{method}|r=4|")
    assert math.isfinite(record["eval_loss"]) and not record["diverged"]
    assert record["lora_b_norm"] > 0  # B left zero: the optimizer really stepped the adapter
    assert [step for step, _ in record["train_curve"]] == [10]  # the Trainer logs every 10 steps
    assert record["step_s"] > 0
    assert record["code"] == CODE and record["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert record["cpu"] == cpu_model()  # the machine too: bf16 rounds differently across CPUs
    if method.startswith("alphatuned"):
        assert record["alpha_start"] == pytest.approx(AlphaRule().alpha(4, lr))  # not the recipe's 2r
    elif method.startswith("steps"):
        assert record["alpha_start"] != pytest.approx(8.0)  # placed, not the recipe's 2r
        assert record["a_step_end"] > 0 and record["update_end"] > 0
    elif method == "lora-metered":
        assert record["alpha_start"] == 8.0 and record["balance_end"] == 1.0  # plain LoRA, measured
    else:
        assert record["alpha_start"] is None


def test_lora_learns_on_the_tiny_model() -> None:
    start = execute(LMRun("lora", 4, 1e-9, seed=0, steps=12, model="tiny", precision="fp32"))
    trained = execute(LMRun("lora", 4, 3e-3, seed=0, steps=12, model="tiny", precision="fp32", alpha=32.0))
    assert trained["eval_loss"] < start["eval_loss"] - 0.05


def test_schedules_follow_each_method() -> None:
    from conftest import tiny_llama

    model = tiny_llama()
    free = build_peer("schedulefree", model, lr=1e-3, schedule="linear", warmup_steps=3)
    assert free.scheduler == "constant"  # its own warm-up, no decay
    assert build_peer("prodigy", model, lr=1.0, schedule="linear", warmup_steps=3).scheduler == "linear"
    with pytest.raises(ValueError, match="Unknown method"):
        build_peer("sgd", model, lr=1e-3, schedule="linear", warmup_steps=3)


def test_the_grid_runs_each_lr_free_method_once_per_rank_and_seed() -> None:
    runs = grid([0, 1], [8, 32])
    keys = [r.key() for r in runs]
    assert len(keys) == len(set(keys))
    for method in LR_FREE:
        assert sum(r.method == method for r in runs) == 4
    assert {r.alpha for r in runs if r.method == "lora" and r.rank == 8} == {16.0, 64.0, 256.0}
    assert {r.lr for r in runs if r.method == "rslora"} == {1e-5, 1e-4, 1e-3}


def test_the_report_finds_the_oracle_and_the_best_method_per_cell() -> None:
    from research.bench_report import format_report, oracle_cells, table

    def rec(
        method: str, rank: int, lr: float, seed: int, loss: float, alpha: float | None = None, tag: str = ""
    ) -> dict:
        run = LMRun(method, rank, lr, seed, alpha=alpha, tag=tag)
        return {"key": run.key(), "config": vars(run) | {}, "eval_loss": loss, "step_s": 1.0}

    records = []
    for seed in (0, 1, 100, 101):
        for lr in (1e-5, 1e-4):
            for alpha in (8.0, 16.0, 32.0):
                # the grid's best cell is alpha 32 at lr 1e-4 on every seed
                records.append(rec("lora", 4, lr, seed, 3.0 - (lr == 1e-4) * 0.2 - alpha / 320, alpha))
            records.append(rec("loraplus", 4, lr, seed, 2.9 + (seed % 2) * 1e-3))
        records.append(rec("prodigy", 4, 1.0, seed, 2.95))
    assert oracle_cells(records, [0, 1]) == {4: (32.0, 1e-4)}
    result = table(records, seeds=[100, 101], selection_seeds=[0, 1])
    cell = result["rows"][(4, 1e-5)]
    assert cell["lora α=2r"][0] == pytest.approx(3.0 - 8 / 320)
    assert cell["oracle (α=32, lr=0.0001)"][0] == pytest.approx(2.7)
    assert cell["prodigy"] == (2.95, 0.0, 2)  # the LR-free run stands in every LR column
    assert cell["loraplus"][1] == pytest.approx(0.0005)  # SE of {2.900, 2.901}
    # lr 1e-5: LoRA+ is best (2.9005 < 2.95); lr 1e-4: plain LoRA at α=16 (2.75) beats it
    assert result["wins"] == {"loraplus": 1, "lora α=16": 1} and result["cells"] == 2
    # A probe with tagged options, a wrong start and the law from another recipe α are rows of
    # the table, never winners.
    probes = [rec("steps", 4, 1e-5, s, 1.0, tag="f=0") for s in (100, 101)]
    probes += [rec("steps-down16", 4, 1e-5, s, 1.0) for s in (100, 101)]
    probes += [rec("steps", 4, 1e-5, s, 1.0, alpha=16.0) for s in (100, 101)]  # another recipe α
    probed = table(records + probes, seeds=[100, 101], selection_seeds=[0, 1])
    assert {"steps [f=0]", "steps-down16", "steps α=16"} <= set(probed["rows"][(4, 1e-5)])
    assert probed["wins"] == result["wins"]
    # A cell where the law ran alone (no peer on every seed) is not a win.
    alone = [rec("steps", 8, 1e-3, s, 1.0) for s in (100, 101)]
    alone += [rec("loraplus", 8, 1e-3, 100, 3.0)]  # one seed of two: not complete
    lonely = table(records + alone, seeds=[100, 101], selection_seeds=[0, 1])
    assert lonely["rows"][(8, 1e-3)]["steps"][0] == 1.0
    assert lonely["wins"] == result["wins"] and lonely["cells"] == 2
    text = format_report(result, seeds=[100, 101], title="t")
    assert "| oracle (α=32, lr=0.0001) | 2.7000 ± 0.0000 | 2.7000 ± 0.0000 |" in text
    # A rank run on the selection seeds only says so instead of printing an empty table.
    early = [*records, rec("steps", 64, 1e-4, 0, 2.5)]
    text = format_report(table(early, seeds=[100, 101], selection_seeds=[0, 1]), seeds=[100, 101], title="t")
    assert "### r = 64\n\nNo runs on these seeds yet" in text


def test_a_grid_pruned_on_the_second_selection_seed_chooses_among_the_cells_run_on_both() -> None:
    from research.bench_report import oracle_cells, pruned_grid_note

    def rec(rank: int, alpha: float, lr: float, seed: int, loss: float) -> dict:
        run = LMRun("lora", rank, lr, seed, alpha=alpha)
        return {"key": run.key(), "config": vars(run) | {}, "eval_loss": loss}

    # seed 0 runs the whole grid; seed 1 only its two best cells, where the order flips
    records = [rec(8, 16.0, 1e-3, 0, 2.60), rec(8, 64.0, 1e-3, 0, 2.57), rec(8, 256.0, 1e-3, 0, 2.58)]
    records += [rec(8, 16.0, 1e-4, 0, 2.75), rec(8, 64.0, 1e-3, 1, 2.59), rec(8, 256.0, 1e-3, 1, 2.56)]
    assert oracle_cells(records, [0]) == {8: (64.0, 1e-3)}
    assert oracle_cells(records, [0, 1]) == {8: (256.0, 1e-3)}
    note = pruned_grid_note(records, [0, 1])
    assert "r = 8: α = 256, lr 0.001: 2.5700, α = 64, lr 0.001: 2.5800 (2 more on seed 0 only)" in note
    # a grid that ran every cell on every seed, or one selection seed, needs no note
    assert pruned_grid_note(records, [0]) == ""
    full = [*records, rec(8, 16.0, 1e-3, 1, 2.6), rec(8, 16.0, 1e-4, 1, 2.7)]
    assert pruned_grid_note(full, [0, 1]) == ""


def test_the_gap_report_pairs_seeds_and_shows_every_peer_that_ran() -> None:
    from research.bench_report import gap_report

    def rec(method: str, lr: float, seed: int, loss: float, alpha: float | None = None) -> dict:
        run = LMRun(method, 4, lr, seed, alpha=alpha)
        return {"key": run.key(), "config": vars(run) | {}, "eval_loss": loss, "step_s": 1.0}

    records = [rec("lora", 1e-4, s, 2.0, 16.0) for s in (0, 100, 101)]
    records += [rec("steps", 1e-4, s, 1.9 + 0.02 * (s == 101)) for s in (100, 101)]
    records += [rec("schedulefree", 1e-4, 100, 2.1)]  # one seed of two
    text = gap_report(records, method="steps", seeds=[100, 101], selection_seeds=[0])
    header = next(line for line in text.splitlines() if line.startswith("| r |"))
    assert "vs schedulefree" in header and "vs dadapt" not in header  # no D-Adaptation run
    row = next(line for line in text.splitlines() if line.startswith("| 4 |"))
    # vs the oracle (α=16, 2.0) and plain LoRA α=16, the same runs: −5 % and −4 %, mean −4.5 %,
    # SE 0.5 %; vs schedule-free on seed 100 only: (1.9 − 2.1) / 2.1
    assert row == "| 4 | 0.0001 | -4.5% ± 0.5% | -4.5% ± 0.5% | -9.5% (1) |"


def test_the_minilm_task_trains_the_adapter_and_the_fresh_head() -> None:
    from research.tasks import fresh_model

    record = execute(LMRun("alphatuned", 4, 1e-4, seed=0, steps=3, model="minilm", batch_size=4, block=32))
    assert math.isfinite(record["eval_loss"]) and record["lora_b_norm"] > 0
    heads = [fresh_model("minilm", seed).classifier.weight for seed in (0, 1)]
    assert not torch.equal(*heads)  # the head is drawn from the run's seed
    assert torch.equal(fresh_model("minilm", 0).classifier.weight, heads[0])


def test_a_steps_tag_sets_the_law_targets_and_the_head_lr() -> None:
    from alpha_tuner import StepLaw
    from research.lm_bench import _tuner_options

    assert _tuner_options(LMRun("steps", 4, 1e-4, seed=0)) is None
    assert _tuner_options(LMRun("lora", 4, 1e-4, seed=0, tag="h=1e-3")) is None  # not a steps run
    options = _tuner_options(LMRun("steps", 4, 1e-4, seed=0, tag="u=1e-3,h=1e-3"))
    assert options == {"steps": StepLaw(update=1e-3), "head_lr": 1e-3}
    options = _tuner_options(LMRun("steps", 4, 1e-4, seed=0, tag="a=2e-2,ref=initial"))
    assert options == {"steps": StepLaw(a_step=2e-2, a_reference="initial")}
    options = _tuner_options(LMRun("steps-static", 4, 1e-4, seed=0, tag="rms=0.23"))
    assert options == {"steps": StepLaw(step_rms=0.23)}
    options = _tuner_options(LMRun("steps", 4, 1e-4, seed=0, tag="af=0.23"))
    assert options == {"steps": StepLaw(adam_floor=0.23)}
    options = _tuner_options(LMRun("steps", 4, 1e-4, seed=0, tag="af=none"))
    assert options == {"steps": StepLaw(adam_floor=None)}
    options = _tuner_options(LMRun("steps", 4, 1e-4, seed=0, tag="af=none,ac=none"))
    assert options == {"steps": StepLaw(adam_floor=None, adam_collapse=None)}
    options = _tuner_options(LMRun("steps", 4, 1e-4, seed=0, tag="ac=0.1"))
    assert options == {"steps": StepLaw(adam_collapse=0.1)}
    options = _tuner_options(LMRun("steps", 4, 1e-4, seed=0, tag="m=16,p=1,c=10,e=10,f=1"))
    assert options == {
        "steps": StepLaw(max_change=16.0),
        "measure_phases": 1,
        "control_every": 10,
        "measure_every": 10,
        "fast_start": True,
    }
    options = _tuner_options(LMRun("steps", 4, 1e-4, seed=0, tag="pool=1,u=1e-3"))
    assert options == {"steps": StepLaw(update=1e-3, pool=True)}
    with pytest.raises(ValueError, match="pool must be 0 or 1"):
        _tuner_options(LMRun("steps", 4, 1e-4, seed=0, tag="pool=yes"))
    with pytest.raises(ValueError, match=r"f \(fast_start\) must be 0 or 1"):
        _tuner_options(LMRun("steps", 4, 1e-4, seed=0, tag="f=yes"))
    with pytest.raises(ValueError, match="a_reference must be one of"):
        _tuner_options(LMRun("steps", 4, 1e-4, seed=0, tag="ref=start"))
    with pytest.raises(ValueError, match="unknown field"):
        _tuner_options(LMRun("steps", 4, 1e-4, seed=0, tag="b=2"))


def test_a_tag_names_only_the_law_runs_of_a_grid() -> None:
    """``--methods steps,lora-metered --tag f=0``: the peer's key is the untagged one, so the
    command reuses its recorded runs instead of running them again under a new key."""
    runs = grid([0], [4], methods=["steps", "lora-metered", "prodigy"], lrs=[1e-4], tag="f=0")
    assert {r.method: r.tag for r in runs} == {"steps": "f=0", "lora-metered": "", "prodigy": ""}
    assert LMRun("lora-metered", 4, 1e-4, 0).key() in {r.key() for r in runs}


def test_the_report_keeps_to_one_schedule_and_horizon(tmp_path: Path) -> None:
    """Probes at a constant LR or another horizon in the same file do not enter the tables (they
    once chose the oracle from a constant-LR cell of a cosine task)."""
    import json

    from research.lm_bench import report

    def rec(lr: float, seed: int, loss: float, **fields: object) -> str:
        run = LMRun("lora", 4, lr, seed, alpha=16.0, model="minilm", steps=600, schedule="cosine")
        run = dataclasses.replace(run, **fields)
        record = {"key": run.key(), "config": vars(run), "eval_loss": loss, "step_s": 1.0}
        return json.dumps(record | {"train_curve": [[10, loss]]})

    lines = [rec(1e-3, s, 0.40) for s in (0, 1, 100)] + [rec(1e-4, s, 0.45) for s in (0, 1, 100)]
    # the same cells at a constant LR and at 150 steps, far better: they must not be the oracle
    lines += [rec(1e-4, s, 0.10, schedule="constant") for s in (0, 1, 100)]
    lines += [rec(1e-4, s, 0.10, steps=150) for s in (0, 1, 100)]
    out = tmp_path / "bench.jsonl"
    out.write_text("\n".join(lines) + "\n")
    assert report(out, seeds=[100], model="minilm", selection_seeds=[0, 1]) == 0
    text = out.with_suffix(".md").read_text()
    assert "oracle (α=16, lr=0.001) | 0.4000" in text and "0.1000" not in text
    assert report(out, seeds=[100], model="minilm", selection_seeds=[0, 1], schedule="constant") == 0
    assert "oracle (α=16, lr=0.0001) | 0.1000" in (tmp_path / "bench_600steps_constant.md").read_text()
    assert "0.1000" not in out.with_suffix(".md").read_text()  # the task's own report stands


def test_a_file_of_another_setting_keeps_its_report_apart_from_a_probe_in_it(tmp_path: Path) -> None:
    """A file that holds none of the task's own setting (the 150-step constant-LR sentiment task
    in the 600-step task's terms) and a probe at another schedule: the file's main setting (the
    most records) keeps the plain stem and the probe's report goes beside it."""
    import json

    from research.lm_bench import report

    def rec(lr: float, seed: int, loss: float, schedule: str) -> str:
        run = LMRun("lora", 4, lr, seed, alpha=16.0, model="minilm", steps=150, schedule=schedule)
        return json.dumps({"key": run.key(), "config": vars(run), "eval_loss": loss, "step_s": 1.0,
                           "train_curve": [[10, loss]]})  # fmt: skip

    lines = [rec(lr, s, 0.50, "constant") for lr in (1e-4, 1e-3) for s in (0, 1, 100)]
    lines += [rec(1e-3, s, 0.30, "linear") for s in (0, 1, 100)]
    out = tmp_path / "bench150.jsonl"
    out.write_text("\n".join(lines) + "\n")
    kw = {"seeds": [100], "model": "minilm", "selection_seeds": [0, 1], "steps": 150}
    assert report(out, schedule="constant", **kw) == 0 and report(out, schedule="linear", **kw) == 0
    main = out.with_suffix(".md").read_text()
    assert "0.5000" in main and "0.3000" not in main
    assert "oracle (α=16, lr=0.001) | 0.3000" in (tmp_path / "bench150_150steps_linear.md").read_text()


def test_a_longer_horizon_takes_the_oracle_cell_chosen_at_the_task_s_own(tmp_path: Path) -> None:
    """A horizon probe runs the oracle cell longer on the held-out seeds only: the report pairs it
    with the cell the selection seeds chose at the task's horizon, says so, and keeps the task's
    own report."""
    import json

    from research.lm_bench import report

    def rec(method: str, lr: float, seed: int, loss: float, steps: int, alpha: float | None = None) -> str:
        run = LMRun(method, 8, lr, seed, alpha=alpha, steps=steps)
        return json.dumps({"key": run.key(), "config": vars(run), "eval_loss": loss, "step_s": 1.0,
                           "train_curve": [[10, loss]]})  # fmt: skip

    lines = [rec("lora", 1e-3, s, 2.60, 300, 64.0) for s in (0, 100, 101)]
    lines += [rec("lora", 1e-4, s, 2.70, 300, 16.0) for s in (0, 100, 101)]
    lines += [rec("lora", 1e-3, s, 2.50, 600, 64.0) for s in (100, 101)]
    lines += [rec("steps", 1e-4, s, 2.45 + 0.01 * (s == 101), 600) for s in (100, 101)]
    out = tmp_path / "lm.jsonl"
    out.write_text("\n".join(lines) + "\n")
    assert report(out, seeds=[100, 101], selection_seeds=[0]) == 0
    assert report(out, seeds=[100, 101], selection_seeds=[0], steps=600) == 0
    long = (tmp_path / "lm_600steps.md").read_text()
    assert "600 steps" in long and "r = 8: α = 64, lr 0.001" in long
    assert "| oracle (α=64, lr=0.001) | 2.5000 ± 0.0000 |" in long
    assert "| r | lr | vs oracle |\n|---|---|---|\n" in long  # no peer ran: no empty column
    row = next(line for line in long.splitlines() if line.startswith("| 8 | 0.0001 |"))
    assert row.startswith("| 8 | 0.0001 | -1.8% ± 0.2% |")  # (2.45 − 2.5)/2.5, (2.46 − 2.5)/2.5
    assert "2.5000" not in out.with_suffix(".md").read_text()  # 300 steps: the task's own report


def test_a_training_subset_is_fixed_named_in_the_key_and_kept_out_of_the_reports(tmp_path: Path) -> None:
    from research.lm_bench import setting_records, training_subset

    data = list(range(50))
    first, again = training_subset(data, 20), training_subset(data, 20)
    assert list(first.indices) == list(again.indices) and len(set(first.indices)) == 20  # drawn once
    assert list(first.indices) != list(range(20))  # a draw over the whole set, not its head
    with pytest.raises(ValueError, match="between 1 and the training set's 50"):
        training_subset(data, 51)
    run = LMRun("steps", 4, 1e-4, seed=0, model="minilm", train_size=665)
    assert run.key().endswith("|train=665") and "train=" not in LMRun("steps", 4, 1e-4, seed=0).key()
    out = tmp_path / "bench.jsonl"
    lines = [
        {"key": r.key(), "config": dataclasses.asdict(r), "eval_loss": 0.5}
        for r in (run, LMRun("steps", 4, 1e-4, seed=1, model="minilm"))
    ]
    out.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    setting = setting_records(out, model="minilm", selection_seeds=(0, 1), steps=300, schedule="linear")
    assert setting is not None and [r["config"]["seed"] for r in setting.records] == [1]
