"""Tests of the ``alpha-tuner`` command line: inspect, demo and sweep on tiny models; the real demo."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

from alpha_tuner import C_REF, AlphaRule, AlphaTunedOptimizer, principled_alpha
from alpha_tuner.cli import main
from alpha_tuner.demo import assets
from alpha_tuner.demo.models import attach_lora, load_base
from alpha_tuner.principled import principled_rank_exponent
from research.sweep import read_records


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory) -> tuple[Path, dict[str, float]]:
    """A tiny BERT adapter saved after AlphaTuned set its α, one layer changed by hand."""
    base = load_base("tiny")
    model = attach_lora(base, "lora", 4, alpha=None, seed=0)
    opt = AlphaTunedOptimizer(
        torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4), model
    )
    first = next(iter(opt.alphas()))
    opt.rescale_({first: 3.0})
    folder = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(folder)
    prefix = "base_model.model."
    return folder, {name.removeprefix(prefix): alpha for name, alpha in opt.alphas().items()}


def test_inspect_json_lists_every_layer_with_its_alpha(saved_adapter, capsys) -> None:
    folder, alphas = saved_adapter
    assert main(["inspect", str(folder), "--json", "--lr", "1e-4"]) == 0
    report = json.loads(capsys.readouterr().out)
    (adapter,) = report["adapters"]
    layers = {x["name"]: x for x in adapter["layers"]}
    assert set(layers) == set(alphas)
    for name, alpha in alphas.items():
        x = layers[name]
        assert x["rank"] == 4
        assert x["alpha"] == pytest.approx(alpha)
        assert x["multiplier"] == pytest.approx(alpha / 4)
        # One meaning of c: the rule's coefficient this α amounts to at the LR (α at r = 1, lr 2e-5).
        assert x["coefficient"] == pytest.approx(AlphaRule().implied_c(alpha, 4, 1e-4))
        assert x["coefficient"] == pytest.approx(C_REF * alpha / principled_alpha(4, 1e-4))
        assert x["recommended_alpha"] == pytest.approx(principled_alpha(4, 1e-4))
    assert sorted(x["alpha"] for x in layers.values())[0] == pytest.approx(3.0)
    assert report["recommended_rank_exponent"] == pytest.approx(principled_rank_exponent(1e-4))


def test_inspect_text_is_a_table(saved_adapter, capsys) -> None:
    folder, alphas = saved_adapter
    assert main(["inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    assert f"{len(alphas)} LoRA layers" in out
    row = next(
        line for line in out.splitlines() if line.startswith("bert.encoder.layer.0.attention.self.query")
    )
    assert row.split()[1:3] == ["4", "3"]  # rank, alpha
    assert "recommended: α = c·r^p" in out


def test_inspect_reports_what_is_missing(tmp_path, capsys) -> None:
    assert main(["inspect", str(tmp_path)]) == 1
    assert "No adapter_config.json" in capsys.readouterr().out
    # A path that does not exist is a bad argument: exit 2, one line, no hub advice.
    for missing in ("no-such-org/no-such-model", str(tmp_path / "nowhere")):
        assert main(["inspect", missing]) == 2
        err = capsys.readouterr().err
        assert "local Hugging Face cache" in err and "argument path" in err
        assert len(err.strip().splitlines()) == 1 and "repo_type" not in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["demo", "--steps", "-5"], ("--steps", ">= 1")),
        (["demo", "--rank", "-4"], ("--rank", ">= 1")),
        (["demo", "--lr", "fast"], ("--lr", "> 0")),
        (["demo", "--lr", "0"], ("--lr", "> 0")),
        (["demo", "--model", "gpt5"], ("--model", "minilm")),
        (["demo", "--methods", "lora,dora"], ("--methods", "alphatuned")),
        (["demo", "--threads", "0"], ("--threads", ">= 1")),
        (["demo", "--lrs", "1e-4,0"], ("--lrs", "> 0")),
        (["demo", "--lr", "1e-4", "--lrs", "1e-3"], ("--lrs", "not allowed with")),
        (["demo", "--device", "gpu7"], ("--device", "cuda:0")),
        (["inspect", ".", "--lr", "-1"], ("--lr", "> 0")),
        (["sweep", "--steps", "x"], ("--steps", ">= 1")),
    ],
)
def test_bad_arguments_get_one_line_and_exit_2(
    argv: list[str], names: tuple[str, ...], tmp_path, capsys
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, *(["--out", str(tmp_path / "o")] if argv[0] == "demo" else [])])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # argparse: usage line, then the error
    assert all(name in err for name in names), err
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_demo_refuses_an_output_folder_it_cannot_write(tmp_path, capsys) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--model", "tiny", "--out", str(blocker / "out"), "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "argument --out" in err and "cannot write" in err


def test_an_interrupted_demo_leaves_no_output_files(tmp_path, capsys, monkeypatch) -> None:
    import alpha_tuner.demo.figure as figure

    def interrupted(*args: object, **kwargs: object) -> None:  # Ctrl-C while the figure is drawn
        raise KeyboardInterrupt

    monkeypatch.setattr(figure, "plot_demo", interrupted)
    assert _tiny_demo(tmp_path, steps=2, eval_size=8) == 130
    assert "interrupted" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # not demo.json alone, not a temporary file


def test_inspect_reads_the_lr_of_a_trainer_checkpoint(saved_adapter, tmp_path, capsys) -> None:
    folder, _ = saved_adapter
    assert main(["inspect", str(folder)]) == 0
    assert "ASSUMED" in capsys.readouterr().out.splitlines()[0]  # no LR anywhere: said so in the title
    checkpoint = tmp_path / "checkpoint-30"
    shutil.copytree(folder, checkpoint)
    log = [{"learning_rate": 5e-4, "step": 10}, {"learning_rate": 1e-3, "step": 20},
           {"loss": 1.0, "step": 20}, {"learning_rate": 4e-4, "step": 30}]  # fmt: skip
    (checkpoint / "trainer_state.json").write_text(json.dumps({"log_history": log}))
    assert main(["inspect", str(checkpoint), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["lr"], report["lr_source"]) == (1e-3, "trainer_state.json")
    assert report["adapters"][0]["layers"][0]["recommended_alpha"] == pytest.approx(principled_alpha(4, 1e-3))
    assert main(["inspect", str(checkpoint), "--lr", "2e-4", "--json"]) == 0  # --lr wins
    assert json.loads(capsys.readouterr().out)["lr"] == 2e-4


def _tiny_demo(out: Path, *, steps: int, eval_size: int) -> int:
    """``alpha-tuner demo`` on the tiny model, one thread (restored after)."""
    threads = torch.get_num_threads()
    try:
        return main(["demo", "--model", "tiny", "--steps", str(steps), "--eval-size", str(eval_size),
                     "--out", str(out), "--no-progress", "--threads", "1"])  # fmt: skip
    finally:
        torch.set_num_threads(threads)


def test_demo_on_the_tiny_model_writes_table_and_figure(tmp_path, capsys) -> None:
    assert _tiny_demo(tmp_path, steps=3, eval_size=16) == 0
    out = capsys.readouterr().out
    for label in ("vanilla LoRA (α=2r)", "rsLoRA (α=16)", "LoRA+", "AlphaTuned (defaults)"):
        assert label in out
    result = json.loads((tmp_path / "demo.json").read_text())
    assert [r["config"]["method"] for r in result["records"]] == ["lora", "rslora", "loraplus", "alphatuned"]
    assert {r["config"]["seed"] for r in result["records"]} == {0}
    assert all(math.isfinite(r["eval_loss"]) for r in result["records"])
    assert (tmp_path / "demo.png").read_bytes()[:4] == b"\x89PNG"


def test_demo_at_several_learning_rates_gives_the_benchmark_table(tmp_path, capsys) -> None:
    """``--lrs``: every method at each base LR, one row per method, one column per LR, the best
    method per LR and each method's spread over the LRs, computed from the records."""
    threads = torch.get_num_threads()
    try:
        args = ["--steps", "3", "--eval-size", "16", "--lrs", "1e-4,1e-2", "--methods", "lora,alphatuned"]
        args += ["--out", str(tmp_path), "--no-progress", "--threads", "1"]
        code = main(["demo", "--model", "tiny", *args])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    result = json.loads((tmp_path / "demo.json").read_text())
    runs = [(r["config"]["lr"], r["config"]["method"]) for r in result["records"]]
    assert runs == [(1e-4, "lora"), (1e-4, "alphatuned"), (1e-2, "lora"), (1e-2, "alphatuned")]
    table = (tmp_path / "demo.md").read_text()
    assert "| method | lr 0.0001 | lr 0.01 | spread over LRs | s/step |" in table
    loss = {(lr, m): r["eval_loss"] for (lr, m), r in zip(runs, result["records"], strict=True)}
    row = next(line for line in table.splitlines() if line.startswith("| vanilla LoRA"))
    low, high = sorted((loss[(1e-4, "lora")], loss[(1e-2, "lora")]))
    assert f"| {loss[(1e-4, 'lora')]:.4f} | {loss[(1e-2, 'lora')]:.4f} | {high / low - 1:.1%} |" in row
    best = next(line for line in table.splitlines() if line.startswith("| best"))
    winners = [min(("lora", "alphatuned"), key=lambda m, lr=lr: loss[(lr, m)]) for lr in (1e-4, 1e-2)]
    labels = {"lora": "vanilla LoRA (α=2r)", "alphatuned": "AlphaTuned (defaults)"}
    assert best.startswith(f"| best | {labels[winners[0]]} | {labels[winners[1]]} |")
    assert (tmp_path / "demo.png").read_bytes()[:4] == b"\x89PNG"


def test_sweep_dry_run_then_report(tmp_path, capsys) -> None:
    out = tmp_path / "s.jsonl"
    args = ["sweep", "--model", "tiny", "--out", str(out), "--ranks", "2,4", "--lrs", "1e-3",
            "--coefficients", "1,4,16", "--seeds", "0", "--steps", "2", "--eval-size", "16"]  # fmt: skip
    args.append("--no-progress")
    assert main([*args[:1], "grid", *args[1:], "--dry-run"]) == 0
    assert "grid: 6 of 6 runs to do" in capsys.readouterr().out
    assert main([*args[:1], "grid", *args[1:]]) == 0
    assert len(out.read_text().splitlines()) == 6
    assert main([*args[:1], "report", *args[1:]]) == 0
    report = json.loads((tmp_path / "s_report.json").read_text())
    assert report["n_grid_records"] == 6
    assert set(report["fits"]["0.001"]["alpha_star"]) == {"2", "4"}
    assert (tmp_path / "s_heatmaps.png").exists() and (tmp_path / "s_best_alpha.png").exists()
    assert (tmp_path / "s_rho.png").exists()


def test_sweep_shards_split_the_pending_runs(tmp_path, capsys) -> None:
    out = tmp_path / "s.jsonl"
    args = ["sweep", "grid", "--model", "tiny", "--out", str(out), "--ranks", "2,4", "--lrs", "1e-3",
            "--coefficients", "1,4,16", "--seeds", "0", "--steps", "2", "--eval-size", "16",
            "--no-progress"]  # fmt: skip
    keys = []
    for k in range(2):
        assert main([*args, "--shard", f"{k}/2", "--dry-run"]) == 0
        keys.append(capsys.readouterr().out.splitlines()[1:])
    assert len(keys[0]) == len(keys[1]) == 3 and not set(keys[0]) & set(keys[1])
    assert main([*args, "--shard", "1/2"]) == 0
    assert sorted(r["key"] for r in read_records(out)) == sorted(keys[1])
    assert main([*args, "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == keys[0]
    with pytest.raises(SystemExit):
        main([*args, "--shard", "2/2"])
    assert "0 <= K < N" in capsys.readouterr().err


def test_console_script_is_declared() -> None:
    if sys.version_info < (3, 11):
        pytest.skip("tomllib needs Python 3.11")
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["alpha-tuner"] == "alpha_tuner.cli:main"


@pytest.mark.skipif(assets.missing_reason() is not None, reason=f"assets missing: {assets.missing_reason()}")
def test_real_demo_in_short_mode(tmp_path, capsys) -> None:
    threads = torch.get_num_threads()
    try:
        code = main(["demo", "--steps", "3", "--eval-size", "16", "--out", str(tmp_path), "--no-progress",
                     "--threads", "1"])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    result = json.loads((tmp_path / "demo.json").read_text())
    assert result["settings"]["model"] == "minilm" and len(result["records"]) == 4
    alphatuned = result["records"][-1]
    # the defaults: the step law's placement, neither the rule's α nor the recipe's 2r
    assert alphatuned["alpha_start"] != pytest.approx(principled_alpha(16, 2e-5))
    assert alphatuned["alpha_start"] != pytest.approx(32.0)
