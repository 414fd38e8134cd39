"""Smoke runs of the examples, shortened, as a user would start them (subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: Each example with the flags of its smoke run (a few steps; ρ measured within them).
EXAMPLES = {
    "trainer_recipe": ["--steps", "4", "--measure-every", "1", "--control-every", "4"],
    "plain_loop": ["--steps", "4"],
    "accelerate_loop": ["--steps", "4"],
}
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[int, str, Path]]]:
    """Start every example at once (they are independent) and collect their results."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    started = {}
    for name, flags in EXAMPLES.items():
        out = tmp_path_factory.mktemp(name)
        cmd = [sys.executable, str(ROOT / "examples" / f"{name}.py"), *flags, "--out", str(out)]
        proc = subprocess.Popen(
            cmd, cwd=out, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        started[name] = (proc, out)
    results = {}
    try:
        for name, (proc, out) in started.items():
            output, _ = proc.communicate(timeout=TIMEOUT_S)
            results[name] = (proc.returncode, output, out)
    finally:
        for proc, _ in started.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    yield results


def test_trainer_recipe_writes_the_plot_and_the_tuned_adapter(runs: dict[str, tuple[int, str, Path]]) -> None:
    code, output, out = runs["trainer_recipe"]
    assert code == 0, output
    png = out / "alpha_rho.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["alpha_pattern"], "the tuned α is recorded per module"
    assert "'alpha/mean'" in output and "'rho/mean'" in output  # the callback's keys in the console
    assert "over 4 steps" in output


def test_plain_loop_resumes_alpha_and_outputs(runs: dict[str, tuple[int, str, Path]]) -> None:
    code, output, out = runs["plain_loop"]
    assert code == 0, output
    assert "step    4" in output
    assert "resumed: same alpha per layer, max output difference 0.0e+00" in output
    assert (out / "optimizer.pt").is_file()


def test_accelerate_loop_saves_and_restores_alpha(runs: dict[str, tuple[int, str, Path]]) -> None:
    code, output, out = runs["accelerate_loop"]
    assert code == 0, output
    assert "step    4" in output
    assert "alpha restored" in output and "4 optimizer steps" in output
    assert (out / "state").is_dir()
