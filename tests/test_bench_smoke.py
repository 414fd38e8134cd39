"""Smoke test of benchmarks/bench_step.py: ``--quick`` runs and reports every quantity.

Only the format is checked, never the timings (the machine running the tests may be shared).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from alpha_tuner.principled import principled_alpha
from research.sweep import rule_tag

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_step.py"
NUMBER = r"[0-9]+(?:\.[0-9]+)?"


def _script(name: str, *args: str, runs: int = 1) -> subprocess.CompletedProcess[str]:
    """Run the probe ``research/probes/<name>`` ``runs`` times offline (a rerun only reports)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", f"research.probes.{name.removesuffix('.py')}", *args]
    for _ in range(runs):
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_quick_mode_reports_every_quantity(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--json", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
        check=False,
    )
    # No timing assertion: speed is the benchmark's job, not a unit test's (CI machines vary).
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout

    assert re.search(r"^machine: .+, \d+ cores, 1 torch threads", text, re.M)
    assert re.search(r"^torch \S+, Python \S+; load average", text, re.M)
    assert re.search(r"^shapes: 2 blocks × \(q,k,v,o: A 8×64, B 64×8;", text, re.M)
    assert "| quantity | inner AdamW | value | target | met |" in text
    rows = {
        "step time ratio, default cadence": rf"{NUMBER}× \(range {NUMBER}–{NUMBER} over 1\) \| ≤ 1\.05×",
        "step time ratio, every step": rf"{NUMBER}× \(range {NUMBER}–{NUMBER} over 6\) \| ≤ 1\.5×",
        "extra memory of a measurement step \\(4 phases\\) / LoRA bytes": rf"{NUMBER}× \(snapshot {NUMBER}×",
        "Gram vs dense, one block's 7 layers \\(ms\\)": rf"{NUMBER} vs {NUMBER}",
        "one measurement, all 14 layers \\(ms\\)": rf"DriftMeter {NUMBER} \+ snapshot {NUMBER}",
    }
    for name, value in rows.items():
        assert re.search(rf"^\| {name} \| \S+ \| {value}", text, re.M), name
    for line in text.splitlines():
        if "| ≤ " in line:
            assert line.rstrip().endswith(("| yes |", "| no |")), line

    results = json.loads(out.read_text(encoding="utf-8"))
    assert results["quick"] is True
    assert set(results["timing"]) == set(results["memory"]) == {"fused"}
    timing = results["timing"]["fused"]
    assert set(timing) == {"default cadence", "every step"}
    for t in timing.values():
        assert t["ratio_min"] <= t["ratio"] <= t["ratio_max"]
        assert t["bare_ms"] > 0 and t["wrapped_ms"] > 0
    memory = results["memory"]["fused"]
    # A full copy of the factors of the largest phase: the floor of an exact measurement.
    assert memory["phases"] == 4 and memory["snapshot"] >= 0.999 / memory["phases"]
    assert memory["own"] >= memory["snapshot"]
    gram = results["gram"]
    assert gram["layers"] == 14 and gram["groups"] == 3 and gram["gram_max_rel_err"] < 1e-4


def test_head_ablation_runs_both_variants_resumes_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "ablation.jsonl"
    args = ["--model", "tiny", "--ranks", "4", "--seeds", "0", "--steps", "4", "--out", str(out)]
    args += ["--sweep", str(tmp_path / "no_grid.jsonl")]
    proc = _script("head_ablation.py", *args, runs=2)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    rule = rule_tag()
    tags = [f"ablation:{rule}:head=0.00032", f"ablation:{rule}:head=base"]
    assert sorted(r["config"]["tag"] for r in records) == tags
    assert records[0]["eval_loss"] != records[1]["eval_loss"]
    row = re.search(rf"^\| 4 \| ({NUMBER}) \| ({NUMBER}) \| – \|", proc.stdout, re.M)
    assert row is not None, proc.stdout
    losses = {r["config"]["tag"]: r["eval_loss"] for r in records}
    assert float(row.group(1)) == round(losses[tags[0]], 4)
    # Records of the first ablation name no rule; they are reported under LEGACY_RULE only.
    legacy = [
        {
            **r,
            "key": r["key"] + "-legacy",
            "config": {**r["config"], "tag": r["config"]["tag"].replace(f"{rule}:", "")},
        }
        for r in records
    ]
    out.write_text("".join(json.dumps(r) + "\n" for r in legacy))
    proc = _script("head_ablation.py", *args, "--report", "--rule", "c=280@2e-05,q=1.34")
    assert re.search(rf"^\| 4 \| {round(losses[tags[0]], 4):.4f} \| ", proc.stdout, re.M), proc.stdout
    proc = _script("head_ablation.py", *args, "--report")
    assert re.search(r"^\| 4 \| – \| – \| ", proc.stdout, re.M), proc.stdout


def test_lifted_head_calibration_passes_each_c_resumes_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "lifted.jsonl"
    args = ["--model", "tiny", "--ranks", "4", "--seeds", "0", "--steps", "4", "--coefficients", "64,1024"]
    proc = _script(
        "lifted_head_c.py", *args, "--out", str(out), "--sweep", str(tmp_path / "none.jsonl"), runs=2
    )
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2
    # At the reference LR with rank exponent 0 the wrapper's α is c itself, at any rank.
    assert sorted(r["alpha_start"] for r in records) == pytest.approx([64.0, 1024.0])
    assert all(r["config"]["method"] == "alphatuned-static" for r in records)
    losses = {round(r["alpha_start"]): r["eval_loss"] for r in records}
    row = re.search(rf"^\| 4 \| ({NUMBER}) \| ({NUMBER}) \| (64|1024) \| – \|", proc.stdout, re.M)
    assert row is not None, proc.stdout
    assert (float(row.group(1)), float(row.group(2))) == (round(losses[64], 4), round(losses[1024], 4))
    assert row.group(3) == ("64" if losses[64] < losses[1024] else "1024")


def test_factor_motion_reports_each_run_with_its_multiplier() -> None:
    proc = _script("factor_motion.py", "--model", "tiny", "--rank", "4")
    rows = re.findall(
        rf"^\| (.+?) \| ({NUMBER}) \| ({NUMBER}) \| ({NUMBER}) \| ({NUMBER}) \|", proc.stdout, re.M
    )
    assert [r[0] for r in rows] == [
        "AlphaTuned, lr 2e-5", "AlphaTuned, lr 3.2e-4", "LoRA α = 32, lr 3.2e-4", "LoRA α = 1024, lr 2e-5",
    ]  # fmt: skip
    multipliers = [float(r[1]) for r in rows]
    expected = [principled_alpha(4, lr) / 4 for lr in (2e-5, 3.2e-4)] + [32 / 4, 1024 / 4]
    assert multipliers == pytest.approx(expected, rel=1e-3)
    moved = [float(r[2]) for r in rows]
    assert all(m > 0 for m in moved)
    assert moved[1] > moved[0]  # A moves further at 16x the LR, whatever alpha is


def test_a_lr_probe_sets_alpha_resumes_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "probe.jsonl"
    args = ["--model", "tiny", "--ranks", "4", "--seeds", "0", "--steps", "4", "--alphas", "64,512"]
    proc = _script("a_lr_probe.py", *args, "--out", str(out), runs=2)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(tuple(r["alphas"]) for r in records) == [(64.0,), (512.0,)]  # alpha = c, every layer
    losses = {r["config"]["alpha"]: r["eval_loss"] for r in records}
    row = re.search(rf"^\| 4 \| ({NUMBER}) \| ({NUMBER}) \|$", proc.stdout, re.M)
    assert row is not None, proc.stdout
    assert (float(row.group(1)), float(row.group(2))) == (round(losses[64.0], 4), round(losses[512.0], 4))


def test_oracle_gap_scores_alphatuned_against_the_oracle_seed_by_seed(tmp_path: Path) -> None:
    from dataclasses import replace

    from research.sweep import SweepSpec, grid_configs, tuner_tag

    spec = replace(SweepSpec(), ranks=(4,))
    records = []
    for cfg in grid_configs(spec):  # a complete r = 4 grid whose best cell is alpha 16 at 3.2e-4
        best = cfg.lr == 3.2e-4 and round(cfg.alpha or 0) == 16
        records.append({"key": cfg.key(), "config": cfg.to_dict(), "eval_loss": 0.5 if best else 0.6})
    for seed, oracle, mine in ((104, 0.50, 0.55), (105, 0.52, 0.52)):
        runs = [
            spec.base(rank=4, lr=3.2e-4, seed=seed, alpha=16.0, tag="oracle"),
            spec.base(method="alphatuned-static", rank=4, lr=2e-5, seed=seed, tag=tuner_tag()),
        ]
        for cfg, loss in zip(runs, (oracle, mine), strict=True):
            records.append({"key": cfg.key(), "config": cfg.to_dict(), "eval_loss": loss})
    out = tmp_path / "sweep.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    proc = _script("oracle_gap.py", "--out", str(out), "--seeds", "104,105")
    row = re.search(
        r"^\| 4 \| static \| ([-+0-9.]+) % \| ([-+0-9., ]+) \| ([0-9.]+) % \| 0.5100 \(0.00032\) \|$",
        proc.stdout,
        re.M,
    )
    assert row is not None, proc.stdout
    assert float(row.group(1)) == pytest.approx(100 * (0.535 / 0.51 - 1), abs=0.006)
    assert row.group(2) == "+10.0, +0.0" and float(row.group(3)) == pytest.approx(5.0)
    assert "adaptive" not in proc.stdout  # no adaptive runs in the file
    proc = _script("oracle_gap.py", "--out", str(out), "--seeds", "104,105,106")  # seed 106 never ran
    assert "no rank has AlphaTuned and oracle runs" in proc.stdout


def _grid_lines(ranks: list[int], law: dict[float, tuple[float, float]]) -> str:
    """Grid records whose loss is a parabola in log α around α* = K·r^p (per LR), two seeds."""
    from alpha_tuner.demo.train import RunConfig
    from research.sweep import SweepSpec

    spec = SweepSpec()
    lines = []
    for rank in ranks:
        for lr in spec.lrs:
            k, p = law[lr]
            best = k * rank**p
            for factor in (0.25, 0.5, 1.0, 2.0, 4.0):
                for seed in spec.seeds:
                    cfg = RunConfig("minilm", "lora", rank, lr, seed, spec.steps, alpha=best * factor)
                    loss = 0.5 + 0.01 * seed + (math.log(factor) + 0.1) ** 2  # minimum at α*·e^-0.1
                    lines.append(json.dumps({"key": cfg.key(), "config": cfg.to_dict(), "eval_loss": loss}))
    return "\n".join(lines) + "\n"


def test_held_out_rank_compares_the_measured_best_alpha_with_the_other_ranks_fits(tmp_path: Path) -> None:
    # c falls 8x and p rises by 0.2 per 4x in LR: the joint rule's form holds exactly
    law = {2e-5: (800.0, 0.1), 8e-5: (100.0, 0.3), 3.2e-4: (12.5, 0.5)}
    (tmp_path / "grid.jsonl").write_text(_grid_lines([4, 16, 64, 256], law))
    out = tmp_path / "held_out_rank.md"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [
        *(sys.executable, "-m", "research.probes.held_out_rank"),
        *("--results", str(tmp_path / "grid.jsonl"), "--out", str(out)),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if re.match(r"^\| [0-9]", line)]
    assert len(rows) == 3
    for (lr, (k, p)), row in zip(law.items(), rows, strict=True):
        measured, fit3, half, joint, rule, p3, p4 = (cell.strip() for cell in row[1:])
        expected = k * 256**p * math.exp(-0.1)
        assert float(measured) == pytest.approx(expected, rel=1e-3)
        assert float(fit3) == pytest.approx(expected, rel=1e-3)  # the law holds exactly
        assert float(joint) == pytest.approx(expected, rel=1e-3)
        # At p = 1/2: the geometric mean of α*/√r over r = 4, 16, 64 (mean log r = log 16), times 16.
        assert float(half) == pytest.approx(k * math.exp(-0.1) * 16 ** (p - 0.5) * 16, rel=1e-3)
        assert float(p3) == pytest.approx(p, abs=0.01)
        assert float(p4.split()[0]) == pytest.approx(p, abs=0.01)
        assert float(rule) == pytest.approx(principled_alpha(256, lr), rel=1e-3)
    # Without a grid at the held-out rank the script says what to run.
    cmd[cmd.index("--results") + 1] = str(tmp_path / "empty.jsonl")
    (tmp_path / "empty.jsonl").write_text(_grid_lines([4, 16], law))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert proc.returncode != 0 and "run the grid first" in proc.stderr


def test_adam_rms_is_one_after_adam_s_first_step() -> None:
    """Adam's first bias-corrected step is the gradient's sign: RMS(m̂/√v̂) = 1 (ε small)."""
    import torch

    from research.probes.adam_caution import adam_rms

    params = [torch.nn.Parameter(torch.randn(5, 7)) for _ in range(3)]
    optimizer = torch.optim.AdamW(params, lr=1e-3, eps=1e-12)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    assert adam_rms(optimizer, params) == pytest.approx(1.0, rel=1e-5)
    for p in params:  # a second gradient of the other sign: m̂ shrinks, √v̂ does not
        p.grad = -p.grad
    optimizer.step()
    assert adam_rms(optimizer, params) < 0.5


def test_adam_caution_traces_the_law_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "caution.jsonl"
    args = ("--model", "tiny", "--rank", "4", "--seeds", "0", "--steps", "20", "--out", str(out))
    _script("adam_caution", *args, runs=2)  # the rerun finds the run done and trains nothing
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(records) == 1 and math.isfinite(records[0]["eval_loss"])
    assert records[0]["code"] and records[0]["cpu_capability"]  # the record names what made it
    trace = records[0]["trace"]
    assert [row["step"] for row in trace] == [10, 20]
    assert all(0 < row["adam_rms_a"] < 3 and 0 < row["adam_rms_b"] < 3 for row in trace)  # ~1 early
    lo, mid, hi = trace[-1]["log_alpha_moved"]
    assert lo <= mid <= hi and hi > lo  # the fast start moved the layers, each its own way
    counts = [row["collapsed"] for row in trace]
    assert counts == sorted(counts) and counts[0] >= 0  # a running count of the back-off's lifts
    moved = [row["displacement"] for row in trace]
    assert 0 < moved[0] < moved[1]  # B starts at zero: the layers move away from W₀ as they train
    assert all(0 < row["u_bar"] < 1 for row in trace)
    _script("adam_caution", "--out", str(out), "--report")
    table = out.with_suffix(".md").read_text(encoding="utf-8")
    assert "| step | Adam RMS(m̂/√v̂), A |" in table and "back-offs so far |" in table
    assert f" {moved[-1]:.2e} | " in table and "straightness" in table
    assert "\n| 20 | " in table and table.count(f" | {counts[-1]} | ") >= 1


def test_hypergrad_cosine_is_scale_free_and_signed() -> None:
    import torch

    from research.probes.hypergrad import _cos

    a, b = [torch.randn(3, 4), torch.randn(5)], [torch.randn(3, 4), torch.randn(5)]
    assert _cos(a, a) == pytest.approx(1.0) and _cos(a, [-x for x in a]) == pytest.approx(-1.0)
    assert _cos([7 * x for x in a], b) == pytest.approx(_cos(a, b))  # clipping cannot move it
    assert math.isnan(_cos([torch.zeros(3)], [torch.ones(3)]))


def test_hypergrad_samples_the_next_gradient_against_the_last_step(tmp_path: Path) -> None:
    out = tmp_path / "hypergrad.jsonl"
    args = ("--model", "tiny", "--rank", "4", "--steps", "40", "--out", str(out))
    _script("hypergrad", *args, runs=2)  # the rerun finds the run done and trains nothing
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(records) == 1 and records[0]["code"]
    trace = records[0]["trace"]
    assert [row["step"] for row in trace] == [6, 16, 26, 36]  # every 10 steps, off the control steps
    assert all(-1 <= row["c0"] <= 1 and -1 <= row["c1"] <= 1 for row in trace)
    assert all(row["c1"] > 0 for row in trace)  # small early steps: the loss still falls along them
    _script("hypergrad", "--out", str(out), "--report")
    table = out.with_suffix(".md").read_text(encoding="utf-8")
    assert "| tiny · steps · r=4 · " in table and table.rstrip().endswith("| 4 |") and "every=10" in table


def test_sensitivity_is_invariant_to_alpha_and_estimates_the_weight_gradient() -> None:
    """Ŝ read through LoRA's B matches ‖∇_W L‖·‖W₀‖/L while A is random, at any α and balance."""
    import torch
    from peft import LoraConfig, get_peft_model

    from research.probes.sensitivity import sensitivity

    def read(alpha: float, balance: float) -> tuple[float, float]:
        torch.manual_seed(0)
        base = torch.nn.Sequential(torch.nn.Linear(256, 192))
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=alpha, target_modules=["0"]))
        layer = model.base_model.model[0]
        with torch.no_grad():
            layer.lora_B["default"].weight.normal_(std=1e-3)
            layer.lora_B["default"].weight.mul_(16.0 / alpha * balance)  # s·B·A the same at every α
            layer.lora_A["default"].weight.div_(balance)
        x = torch.randn(64, 256)
        loss = model(x).square().mean()
        loss.backward()
        w0 = layer.base_layer.weight
        a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
        w = (w0 + s * b @ a).detach().requires_grad_()  # ∇_W L at the adapted weight W = W₀ + s·B·A
        torch.nn.functional.linear(x, w, layer.base_layer.bias).square().mean().backward()
        assert w.grad is not None
        grad_w = w.grad
        exact = float(grad_w.norm() * w0.norm() / loss.detach())
        est = sensitivity(
            layer.lora_B["default"].weight.grad,
            layer.lora_A["default"].weight,
            layer.scaling["default"],
            float(w0.norm()),
            float(loss.detach()),
        )
        return est, exact

    est, exact = read(16.0, 1.0)
    assert 0.7 < est / exact < 1.4  # a random projection of the weight gradient onto r directions
    for alpha, balance in ((4.0, 1.0), (256.0, 1.0), (16.0, 10.0), (64.0, 0.1)):
        other, same_exact = read(alpha, balance)
        assert same_exact == pytest.approx(exact, rel=1e-4)
        assert other == pytest.approx(est, rel=1e-4)  # the probe cannot tell α or the balance apart
    assert math.isnan(sensitivity(torch.ones(2, 2), torch.zeros(2, 2), 1.0, 1.0, 1.0))


def test_sensitivity_probe_traces_the_loss_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "sensitivity.jsonl"
    _script("sensitivity", "--model", "tiny", "--rank", "4", "--steps", "20", "--out", str(out), runs=2)
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(records) == 1 and records[0]["code"]  # the rerun found the run done
    trace = records[0]["trace"]
    assert [row["step"] for row in trace] == [1, 6, 11, 16]  # every 5 steps, from the first
    assert all(row["loss"] > 0 and 0 < row["s_median"] < math.inf for row in trace)
    _script("sensitivity", "--out", str(out), "--report")
    table = out.with_suffix(".md").read_text(encoding="utf-8")
    assert "| tiny · steps · r=4 · " in table and "every=5" in table


def test_coherence_fit_recovers_the_path_model() -> None:
    from research.probes.coherence import fit_coherence

    c2, tau = 0.07, 11.0
    rows = [{"step": t, "k_all": math.sqrt(c2 + (1 - c2) * tau / t)} for t in range(10, 151, 10)]
    got_c2, got_tau = fit_coherence(rows)
    assert got_c2 == pytest.approx(c2, abs=1e-9) and got_tau == pytest.approx(tau, rel=1e-9)
    assert got_c2 == pytest.approx(fit_coherence(rows, first=100)[0], abs=1e-9)  # any window of the line
    assert all(math.isnan(x) for x in fit_coherence(rows[:3]))  # one sample from step 30 on: no fit


def test_coherence_traces_a_path_no_longer_than_its_steps(tmp_path: Path) -> None:
    out = tmp_path / "coherence.jsonl"
    _script("coherence", "--model", "tiny", "--rank", "4", "--steps", "40", "--out", str(out))
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(records) == 1
    trace = records[0]["trace"]
    assert [row["step"] for row in trace] == [10, 20, 30, 40]
    # the distance moved is at most the path taken (triangle inequality), and more than nothing
    assert all(0 < row[k] <= 1 + 1e-6 for row in trace for k in ("k10", "k_all") if k in row)
    assert "k10" not in trace[0] and "k10" in trace[1] and "k40" not in trace[-1]  # no snapshot at 0
    dist = [row["dist"] for row in trace]
    assert 0 < dist[0] < dist[-1]  # B starts at zero: the layers move away from W₀
    _script("coherence", "--out", str(out), "--report")
    table = out.with_suffix(".md").read_text(encoding="utf-8")
    assert "| tiny · steps · r=4 · " in table and f"| {trace[-1]['k_all']:.3f} |" in table


def test_linefit_parabola_finds_the_minimum_of_a_quadratic() -> None:
    from research.probes.linefit import mean_parabola_minimum, parabola_minimum

    def f(k: float) -> float:
        return 3.0 * (k - 1.7) ** 2 + 0.5  # minimum at k = 1.7, f'(0) = -10.2, f'' = 6

    k, slope, curvature = parabola_minimum(f(0), f(1), f(2))
    assert k == pytest.approx(1.7) and slope == pytest.approx(-10.2) and curvature == pytest.approx(6.0)
    assert parabola_minimum(1.0, 0.9, 0.7)[0] == math.inf  # concave and falling: never turns
    assert parabola_minimum(1.0, 1.2, 1.3)[0] == -math.inf  # concave and rising: uphill
    assert parabola_minimum(1.0, 1.1, 1.3)[0] == pytest.approx(-0.5)  # convex, its minimum behind
    # the mean of two samples' parabolas: minimum at -mean f'(0) / mean f''
    rows = [{"same": [f(0), f(1), f(2)]}, {"same": [1.0, 0.9, 0.7]}]  # slopes -10.2, -0.05; f'' 6, -0.1
    assert mean_parabola_minimum(rows, "same") == pytest.approx((10.2 + 0.05) / (6.0 - 0.1))


def test_linefit_reads_the_loss_along_steps_without_changing_the_run(tmp_path: Path) -> None:
    out = tmp_path / "linefit.jsonl"
    args = ("--model", "tiny", "--rank", "4", "--steps", "40", "--out", str(out))
    _script("linefit", *args, runs=2)  # the rerun finds the run done and trains nothing
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(records) == 1
    trace = records[0]["trace"]
    assert [row["step"] for row in trace] == [6, 16, 26, 36]  # every 10 steps, off the control steps
    for row in trace:
        for batch in ("same", "next"):
            f0, f1 = row[batch][:2]
            assert f1 < f0  # an early step at lr 1e-4 lowers the loss on either batch
    # the probe puts the factors back: the run ends where the benchmark's run of it ends
    from research.lm_bench import LMRun, execute

    plain = execute(LMRun("steps", 4, 1e-4, 0, steps=40, batch_size=4, block=128, model="tiny"))
    assert records[0]["eval_loss"] == plain["eval_loss"]
    _script("linefit", "--out", str(out), "--report")
    table = out.with_suffix(".md").read_text(encoding="utf-8")
    assert "| tiny · steps · r=4 · " in table and table.rstrip().endswith("| 4 |")


def test_profile_records_every_measurement_without_changing_the_run(tmp_path: Path) -> None:
    out = tmp_path / "profile.jsonl"
    args = ("--model", "tiny", "--rank", "4", "--steps", "40", "--method", "lora-metered", "--lr", "1e-3")
    _script("profile", *args, "--out", str(out), runs=2)  # the rerun finds the run done
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(records) == 1
    trace = records[0]["trace"]
    assert [row["step"] for row in trace] == [10, 20, 30, 40]  # the meter's cadence
    for row in trace:
        measured = [v for v in row["log_u"] if v is not None]
        assert 0 < len(measured) < len(row["log_u"])  # one phase of the layers per measurement
        assert len([v for v in row["log_a"] if v is not None]) == len(measured)
        assert 0 < row["scale"] <= 1  # the linear decay's factor
    # the trace is read beside the law, not through it: the run ends as the benchmark's does
    from research.lm_bench import LMRun, execute

    plain = execute(LMRun("lora-metered", 4, 1e-3, 0, steps=40, batch_size=4, block=128, model="tiny"))
    assert records[0]["eval_loss"] == plain["eval_loss"]
    _script("profile", "--out", str(out), "--report")
    table = out.with_suffix(".md").read_text(encoding="utf-8")
    row = next(line for line in table.splitlines() if line.startswith("| tiny · lora-metered · r=4 · "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == 7 and all(len(c.split(" / ")) == 3 for c in cells[2:5])
    assert all(math.isfinite(float(x)) and float(x) > 0 for c in cells[2:5] for x in c.split(" / "))


def test_profile_summarises_a_third_of_the_run() -> None:
    from research.probes.profile import _third_summary

    rows = [
        {"scale": 0.5, "log_a": [math.log(1e-2), math.log(4e-2)], "log_u": [math.log(1e-4), None]},
        {"scale": 1.0, "log_a": [math.log(1e-2), math.log(1e-2)], "log_u": [math.log(4e-4), math.log(1e-3)]},
    ]
    s = _third_summary(rows)
    # a at the peak: 2e-2, 8e-2, 1e-2, 1e-2 → geometric mean 2e-2; u at the peak: 2e-4, 4e-4, 1e-3
    assert s["a"] == pytest.approx(2e-2) and s["u"] == pytest.approx((2e-4 * 4e-4 * 1e-3) ** (1 / 3))
    assert s["u_taken"] == pytest.approx((1e-4 * 4e-4 * 1e-3) ** (1 / 3))
    # per-layer mean log u: layer 0 log(√(2e-4·4e-4)), layer 1 log(1e-3); SD of two values = |diff|/√2
    expected = abs(math.log(1e-3) - 0.5 * math.log(2e-4 * 4e-4)) / math.sqrt(2)
    assert s["sd_u"] == pytest.approx(expected)
