"""The paper's claims on one Trainer benchmark's plain-LoRA grid (:mod:`research.lm_bench` records).

The sweep's analysis (:mod:`research.fit`) applied to a benchmark task, on the selection seeds:

1. **Raising α beats raising the LR at a matched α·η**: :func:`research.fit.matched_step_pairs`.
   These grids step α by 2–4× and the LR by 10×, so a raised α counts as matched when it is
   within ``tolerance`` of k·α.
2. **ρ is flat in α and grows with the LR**: :func:`research.fit.rho_slopes` over the runs whose
   records hold the drift ratio (``rho_end``; runs recorded before it was kept have none).
3. **The best α grows as √r**: the grid's best α per rank and LR, and the exponent of α* ∝ r^p
   fitted over the ranks at each LR (:func:`research.fit.fit_power_law`; needs two ranks).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from .fit import cell_table, fit_power_law, matched_step_pairs, rho_slopes

__all__ = ["as_grid_records", "best_alphas", "format_claims"]

Record = Mapping[str, Any]


def as_grid_records(records: Sequence[Record], seeds: Sequence[int]) -> list[dict[str, Any]]:
    """Plain-LoRA runs (``lora``, ``lora-metered``) on ``seeds``, in the sweep's record form:
    α written out (2r where the recipe's), ``rho_mean`` from ``rho_end``."""
    out = []
    for r in records:
        c = r["config"]
        if c["method"] not in ("lora", "lora-metered") or c["seed"] not in seeds:
            continue
        alpha = 2.0 * c["rank"] if c.get("alpha") is None else float(c["alpha"])
        loss = r.get("eval_loss")
        out.append({
            "config": {**c, "method": "lora", "alpha": alpha, "tag": ""},
            "eval_loss": loss,
            "diverged": bool(r.get("diverged")) or loss is None or not math.isfinite(loss),
            "rho_mean": r.get("rho_end"),
        })  # fmt: skip
    return out


def best_alphas(cells: Mapping[tuple[int, float, float], Sequence[float]]) -> dict[float, dict[int, float]]:
    """Per LR and rank, the grid's α of lowest mean loss, where the grid has run at least two α
    there (one cell is no choice of α, and would enter the fit of α* ∝ r^p as if it were)."""
    tried: dict[tuple[float, int], list[tuple[float, float]]] = defaultdict(list)
    for (rank, lr, alpha), losses in cells.items():
        tried[lr, rank].append((statistics.fmean(losses), alpha))
    best: dict[float, dict[int, float]] = {}
    for (lr, rank), cell in sorted(tried.items()):
        if len(cell) >= 2:
            best.setdefault(lr, {})[rank] = min(cell, key=lambda mean_alpha: mean_alpha[0])[1]
    return best


def format_claims(records: Sequence[Record], seeds: Sequence[int], *, tolerance: float = 2.5) -> str:
    """The three claims on these records, as Markdown (cells complete on ``seeds``)."""
    grid = as_grid_records(records, seeds)
    cells = {k: v for k, v in cell_table(grid, seeds).items() if len(v) == len(seeds)}
    seed_text = ", ".join(str(s) for s in seeds)
    lines = [f"## The paper's claims on this task (plain-LoRA grid, selection seeds {seed_text})", ""]
    if not cells:
        return "\n".join([*lines, "No complete plain-LoRA grid cells on these seeds yet.", ""])
    pairs = matched_step_pairs(cells, tolerance=tolerance)
    wins = sum(p["loss_raise_alpha"] < p["loss_raise_lr"] for p in pairs)
    lines.append(
        f"1. **Raising α beats raising the LR at a matched α·η** (raised α within {tolerance:g}× of k·α): "
        f"raising α wins in {wins} of {len(pairs)} pairs"
        + ("." if pairs else " (no such pairs in this grid).")
    )
    for p in sorted(pairs, key=lambda p: (p["rank"], p["lr"], p["alpha"])):
        lines.append(
            f"   - r = {p['rank']}, from α {p['alpha']:g} at lr {p['lr']:g}: α → {p['alpha_raised']:g} "
            f"{p['loss_raise_alpha']:.4f}, lr × {p['k']:g} {p['loss_raise_lr']:.4f}"
        )
    slopes = rho_slopes(grid)
    if slopes["alpha"] or slopes["lr"]:
        lines.append(
            "2. **ρ flat in α, growing with the LR**: slope of log ρ against log α "
            + _median_text(slopes["alpha"], "(rank, LR)")
            + "; against log LR "
            + _median_text(slopes["lr"], "(rank, α/√r)")
            + "."
        )
    else:
        lines.append(
            "2. **ρ flat in α, growing with the LR**: not measured (these records hold no drift ratio)."
        )
    best = best_alphas(cells)
    per_lr = "; ".join(
        f"lr {lr:g}: " + ", ".join(f"r = {r}: α {a:g}" for r, a in by_rank.items())
        for lr, by_rank in best.items()
    )
    fits = {lr: fit_power_law(list(by), list(by.values()))[1] for lr, by in best.items() if len(by) >= 2}
    fit = (
        "; fitted p (α* ∝ r^p; ½ under the claim): "
        + ", ".join(f"{p:+.2f} at lr {lr:g}" for lr, p in fits.items())
        if fits
        else "; one rank only, so no exponent"
    )
    lines.append(f"3. **α* ≈ c·√r**: the grid's best α: {per_lr}{fit}.")
    return "\n".join([*lines, ""])


def _median_text(values: Sequence[float], groups: str) -> str:
    if not values:
        return "–"
    return f"median {statistics.median(values):+.2f} over {len(values)} {groups} groups"
