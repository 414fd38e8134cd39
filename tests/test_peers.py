"""Every benchmark method runs for a few steps through the real Trainer path (research.peers, lm_bench)."""

from __future__ import annotations

import math

import pytest

from alpha_tuner import AlphaRule
from alpha_tuner.demo.assets import missing_reason
from research.lm_bench import LMRun, execute, grid
from research.peers import LR_FREE, METHODS, build_peer

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
    if method.startswith("alphatuned"):
        assert record["alpha_start"] == pytest.approx(AlphaRule().alpha(4, lr))  # not the recipe's 2r
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
