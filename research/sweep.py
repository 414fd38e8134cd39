"""``alpha-tuner sweep``: the α × learning rate × rank grid and the runs of the bar.

Two phases write to one JSON-lines file, one record per finished run (see
:func:`alpha_tuner.demo.train.run`), keyed by :meth:`RunConfig.key`; a rerun skips
every key already in the file, so an interrupted sweep resumes where it stopped.

* ``grid``: vanilla LoRA with α = c·√r for every coefficient c, learning rate and rank, on the
  *selection* seeds. The fit of the best α per rank (:mod:`.fit`) uses only these.
* ``bar``: on *held-out* seeds, for every (rank, learning rate): vanilla LoRA (α = 2r), rsLoRA
  (α = 16), LoRA+ (ratio 16), AlphaTuned static and adaptive with the library's current
  defaults, and per rank the grid's best cell (chosen on the selection seeds) as the oracle.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from alpha_tuner.demo.train import RunConfig

from .runner import append_line, end_with_newline, finite_json, pending_runs, read_records

__all__ = [
    "SweepSpec",
    "bar_configs",
    "finite_json",
    "grid_coefficients",
    "grid_configs",
    "read_records",
    "rule_tag",
    "run_configs",
    "select_configs",
    "tuner_tag",
]

PEERS = ("lora", "rslora", "loraplus", "alphatuned-static", "alphatuned")

T = TypeVar("T")


@dataclass(frozen=True)
class SweepSpec:
    """The axes of the sweep and the settings shared by all its runs.

    The grid of c = α/√r at learning rate η is ``coefficients × (lrs[0]/η) ** coefficient_lr_shift``:
    under Adam the size of a step in function space goes with s·η, so the best c falls as η
    grows and a grid that moves with η brackets each optimum with fewer runs (with learning
    rates 4× apart and a shift of ½, each LR's grid is the previous one halved).
    """

    model: str = "minilm"
    ranks: tuple[int, ...] = (4, 16, 64, 256)
    lrs: tuple[float, ...] = (2e-5, 8e-5, 3.2e-4)
    coefficients: tuple[float, ...] = (8, 16, 32, 64, 128, 256, 512, 1024)
    coefficient_lr_shift: float = 0.5
    seeds: tuple[int, ...] = (0, 1)
    heldout_seeds: tuple[int, ...] = (100, 101, 102, 103)
    steps: int = 150
    batch_size: int = 8
    eval_size: int = 512

    def base(self, **fields: Any) -> RunConfig:
        """A run of this sweep with the given fields set."""
        common = RunConfig(
            model=self.model, method="lora", rank=1, lr=1.0, seed=0, steps=self.steps,
            batch_size=self.batch_size, eval_size=self.eval_size,
        )  # fmt: skip
        return replace(common, **fields)


def grid_alpha(c: float, rank: int) -> float:
    """α = c·√r in PEFT's default ``α/r`` convention (multiplier s = c/√r)."""
    return c * math.sqrt(rank)


def grid_coefficients(spec: SweepSpec, lr: float) -> list[float]:
    """The values of c = α/√r that the grid tries at learning rate ``lr``."""
    factor = (spec.lrs[0] / lr) ** spec.coefficient_lr_shift
    return [float(f"{c * factor:.6g}") for c in spec.coefficients]


def grid_configs(spec: SweepSpec) -> list[RunConfig]:
    """The grid runs, seed-major so that a partial sweep covers every cell once first."""
    return [
        spec.base(rank=r, lr=lr, seed=seed, alpha=grid_alpha(c, r))
        for seed in spec.seeds
        for r in spec.ranks
        for lr in spec.lrs
        for c in grid_coefficients(spec, lr)
    ]


def rule_tag() -> str:
    """The library's principled rule now, as a tag (:attr:`alpha_tuner.AlphaRule.tag`)."""
    from alpha_tuner.rule import AlphaRule

    return AlphaRule().tag


def tuner_tag() -> str:
    """The defaults the AlphaTuned runs use now (part of their resume key).

    The step law's targets (the default law), the principled rule (its fallback) and the
    head's learning rate; runs made under other defaults keep their own tag, so they are
    neither resumed as nor reported with these.
    """
    from alpha_tuner import StepLaw
    from alpha_tuner.heads import HEAD_LR

    law = StepLaw()
    return f"steps:a={law.a_step:g},u={law.update:g},{rule_tag()},head={HEAD_LR:g}"


def bar_configs(spec: SweepSpec, oracle: dict[int, tuple[float, float]]) -> list[RunConfig]:
    """The held-out runs: every peer at every (rank, LR), and the oracle cell of each rank.

    Args:
        spec: The sweep.
        oracle: Rank → (α, LR) of the grid's best cell on the selection seeds.
    """
    out = []
    for seed in spec.heldout_seeds:
        for r in spec.ranks:
            if r in oracle:
                alpha, lr = oracle[r]
                out.append(spec.base(rank=r, lr=lr, seed=seed, alpha=alpha, tag="oracle"))
            for lr in spec.lrs:
                for method in PEERS:
                    tag = tuner_tag() if method.startswith("alphatuned") else ""
                    out.append(spec.base(method=method, rank=r, lr=lr, seed=seed, tag=tag))
    return out


def _environment(device: str) -> dict[str, Any]:
    from .provenance import environment

    return {
        **environment(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "device": device,
    }


def run_configs(
    configs: Iterable[RunConfig],
    path: Path,
    *,
    limit: int | None = None,
    progress: bool = True,
    device: str = "cpu",
    tuner_options: Mapping[str, Mapping[str, Any]] | None = None,
) -> Iterator[dict[str, Any]]:
    """Run every configuration whose key is not yet in ``path``, appending one line per run.

    Yields each new record once written (and flushed to disk). Base models are loaded once
    per model name.

    Args:
        configs: The runs, in order.
        path: The JSON-lines file (created with its folder if missing).
        limit: Stop after this many new runs (``None``: all).
        progress: Show a progress bar (tqdm) over the runs still to do.
        device: Where to train (``"cpu"``, ``"cuda"``); not part of the resume key.
        tuner_options: Extra AlphaTuned options per run key (see :func:`.train.run`); a run's
            ``tag`` should name them.
    """
    from alpha_tuner.demo.models import load_base
    from alpha_tuner.demo.train import make_task, run

    todo = pending_runs(configs, path, key=RunConfig.key)
    if limit is not None:
        todo = todo[:limit]
    path.parent.mkdir(parents=True, exist_ok=True)
    end_with_newline(path)
    bases: dict[tuple[str, int], Any] = {}
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=f"sweep → {path.name}", unit="run")
    for config in todo:
        cache_key = (config.model, config.eval_size)
        if cache_key not in bases:
            base = load_base(config.model)
            bases[cache_key] = (base, make_task(base, config.eval_size))
        base, task = bases[cache_key]
        options = (tuner_options or {}).get(config.key())
        record = run(config, base, task, device=device, tuner_options=dict(options) if options else None)
        record["environment"] = _environment(device)
        record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        append_line(path, json.dumps(finite_json(record), sort_keys=True))
        if bar is not None:
            bar.set_postfix(loss=f"{record['eval_loss']:.4f}", r=config.rank, lr=f"{config.lr:g}")
            bar.update()
        yield record
    if bar is not None:
        bar.close()


def select_configs(configs: Iterable[RunConfig], *, methods: Iterable[str] | None = None) -> list[RunConfig]:
    """The runs of ``configs`` whose method is in ``methods`` (all of them for ``None``).

    The oracle cells of the bar (plain LoRA tagged ``"oracle"``) count as method ``"oracle"``.
    """
    if methods is None:
        return list(configs)
    wanted = set(methods)
    unknown = wanted - {*PEERS, "oracle"}
    if unknown:
        raise ValueError(f"unknown sweep method(s) {sorted(unknown)}; choose from {[*PEERS, 'oracle']}")
    return [c for c in configs if (c.tag if c.tag == "oracle" else c.method) in wanted]


def spec_from_args(args: Any) -> SweepSpec:
    """A :class:`SweepSpec` with the command line's overrides (``None`` keeps the default)."""
    names = [
        *("model", "ranks", "lrs", "coefficients", "coefficient_lr_shift"),
        *("seeds", "heldout_seeds", "steps", "batch_size", "eval_size"),
    ]
    overrides = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    return replace(SweepSpec(), **overrides)
