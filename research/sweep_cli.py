"""The phases of ``alpha-tuner sweep``: grid, bar and report over one results file.

Kept apart from :mod:`research.sweep` (what to run) and :mod:`research.report` (what the
records say), which it joins, so that neither of them imports the other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alpha_tuner.demo.train import RunConfig

from .runner import pending_runs, read_records
from .sweep import bar_configs, grid_configs, run_configs, select_configs, spec_from_args

__all__ = ["main"]


def main(args: Any) -> int:
    """Run the phases of ``alpha-tuner sweep`` named by ``args.phase``."""
    from .fit import grid_oracle
    from .report import write_report

    spec = spec_from_args(args)
    path: Path = args.out
    phases = ("grid", "bar", "report") if args.phase == "all" else (args.phase,)
    for phase in phases:
        if phase == "report":
            write_report(path, spec)
            continue
        if phase == "grid":
            configs = grid_configs(spec)
        else:
            grid = [
                r for r in read_records(path) if r["config"]["method"] == "lora" and not r["config"]["tag"]
            ]
            oracle = grid_oracle(grid, spec.seeds, n_cells=len(spec.lrs) * len(spec.coefficients))
            missing = [r for r in spec.ranks if r not in oracle]
            if missing:
                print(f"sweep: no complete grid for ranks {missing} yet; their oracle cell is left out.")
            configs = bar_configs(spec, oracle)
        configs = select_configs(configs, methods=getattr(args, "methods", None))
        pending = pending_runs(configs, path, key=RunConfig.key, shard=getattr(args, "shard", None))
        if args.dry_run:
            todo = [c.key() for c in pending]
            print(f"{phase}: {len(todo)} of {len(configs)} runs to do")
            print("\n".join(todo[: args.limit or len(todo)]))
            continue
        for _ in run_configs(
            pending, path, limit=args.limit, progress=not args.no_progress, device=args.device
        ):
            pass
    return 0
