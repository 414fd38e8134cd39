"""``alpha-tuner sweep report``: the fit, the paper's claims and the bar, from the sweep's records.

Writes next to the JSON-lines file ``<stem>_report.md`` (tables), ``<stem>_report.json`` (the
numbers) and the figures ``<stem>_heatmaps.png``, ``<stem>_rho.png``, ``<stem>_best_alpha.png``.
Every number comes from the records; cells with missing seeds are left out and say so.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .fit import (
    PowerLawFit,
    bootstrap_power_law,
    cell_table,
    grid_oracle,
    grid_records,
    matched_step_pairs,
    paired_gap,
    rank_tables,
    record_loss,
    rho_slopes,
)
from .rule_fit import bootstrap_rule
from .runner import finite_json, read_records
from .sweep import PEERS, SweepSpec, tuner_tag

__all__ = ["analyse", "oracle_gaps", "write_report"]

_PEER_BASELINES = ("lora", "rslora", "loraplus")
#: Held-out accuracy from which a run counts as having learned: runs that collapse onto one
#: class sit at 54.7 % (the held-out majority class, "fresh") or 45.3 %.
LEARNED_ACCURACY = 0.6


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def _lr_rule(fits: Mapping[float, PowerLawFit]) -> dict[str, float] | None:
    """log c(η) = log C + q·log(η_ref/η) through the per-LR coefficients at p = 1/2."""
    from alpha_tuner.rule import REFERENCE_LR

    lrs = sorted(fits)
    if len(lrs) < 2:
        return None
    x = np.log(REFERENCE_LR / np.array(lrs))
    y = np.log([fits[lr].c_at_half for lr in lrs])
    q, log_c = np.polyfit(x, y, 1)
    return {"reference_lr": REFERENCE_LR, "c_ref": float(math.exp(log_c)), "lr_exponent": float(q)}


#: The rule's forms compared by the report: name → (fit p₁, fixed p₀ or None to fit it).
RULE_FORMS: dict[str, tuple[bool, float | None]] = {
    "lr_dependent_exponent": (True, None),
    "constant_exponent": (False, None),
    "rank_free": (False, 0.0),
    "sqrt_rank": (False, 0.5),
}


def _rule_fits(cells: Mapping[tuple[int, float, float], Sequence[float]]) -> dict[str, Any]:
    """The joint rule fits (:mod:`.rule`) of each form in :data:`RULE_FORMS`.

    ``"selected"`` names the form with the smallest leave-one-out error (the out-of-sample
    test of a form: more parameters always fit the seen points at least as well).
    """
    from alpha_tuner.rule import REFERENCE_LR

    tables = {lr: t for lr in sorted({c[1] for c in cells}) if len(t := rank_tables(cells, lr)) >= 2}
    out: dict[str, Any] = {}
    for name, (lr_dependent, p0) in RULE_FORMS.items():
        try:
            fit = bootstrap_rule(
                tables, reference_lr=REFERENCE_LR, lr_dependent_exponent=lr_dependent, rank_exponent=p0
            )
        except ValueError:  # too few (rank, LR) points for this form
            continue
        out[name] = {
            "params": fit.params, "intervals": fit.intervals, "level": fit.level,
            "reference_lr": fit.reference_lr, "max_factor": fit.max_factor, "loo_rms_log": fit.loo_rms_log,
            "points": [
                {"rank": r, "lr": lr, "alpha_star": a, "rule_alpha": a / q, "ratio": q, "censored": e,
                 "loo_ratio": loo}
                for (r, lr, a), q, e, loo in zip(
                    fit.points, fit.ratios, fit.censored, fit.loo_ratios, strict=True
                )
            ],
        }  # fmt: skip
    scored = {k: v["loo_rms_log"] for k, v in out.items() if math.isfinite(v["loo_rms_log"])}
    if scored:
        out = {"selected": min(scored, key=scored.__getitem__), **out}
    return out


def _held_out_runs(
    records: Sequence[Mapping[str, Any]], spec: SweepSpec, tag: str
) -> dict[tuple[str, int, float], dict[int, float]]:
    """Held-out loss per (method, rank, LR) and seed, for the cells run on every held-out seed.

    A diverged run counts as an infinite loss. AlphaTuned records count only with the rule
    ``tag`` of the library now.
    """
    runs: dict[tuple[str, int, float], dict[int, float]] = defaultdict(dict)
    for rec in records:
        cfg = rec["config"]
        held_out = cfg["seed"] in spec.heldout_seeds and cfg["alpha"] is None  # not the oracle
        if held_out and cfg["method"] in PEERS and cfg["tag"] in ("", tag):
            runs[(cfg["method"], cfg["rank"], cfg["lr"])][cfg["seed"]] = record_loss(rec)
    return {k: v for k, v in runs.items() if len(v) == len(spec.heldout_seeds)}


def _oracle_runs(
    records: Sequence[Mapping[str, Any]], spec: SweepSpec
) -> dict[int, tuple[float, dict[int, float]]]:
    """Per rank, the oracle's LR and its held-out loss per seed, for ranks run on every held-out seed.

    The oracle of a rank is the grid's best cell on the selection seeds now; oracle runs of a
    cell that an earlier, smaller grid had chosen are left out.
    """
    best = grid_oracle(
        grid_records(records, spec.seeds), spec.seeds, n_cells=len(spec.lrs) * len(spec.coefficients)
    )
    oracle: dict[int, dict[int, float]] = defaultdict(dict)
    for rec in records:
        cfg = rec["config"]
        if cfg["seed"] in spec.heldout_seeds and cfg["tag"] == "oracle" and cfg["rank"] in best:
            alpha, lr = best[cfg["rank"]]
            if math.isclose(cfg["alpha"], alpha) and math.isclose(cfg["lr"], lr):
                oracle[cfg["rank"]][cfg["seed"]] = record_loss(rec)
    return {
        rank: (best[rank][1], by_seed)
        for rank, by_seed in oracle.items()
        if len(by_seed) == len(spec.heldout_seeds)
    }


def _held_out_losses(
    records: Sequence[Mapping[str, Any]], spec: SweepSpec, tag: str
) -> tuple[dict[tuple[str, int, float], float], dict[int, tuple[float, float]]]:
    """Mean held-out loss per (method, rank, LR), and per rank the oracle's (mean loss, LR).

    Only cells with a record for every held-out seed count (see :func:`_held_out_runs` and
    :func:`_oracle_runs`).
    """
    complete = {k: _mean(list(v.values())) for k, v in _held_out_runs(records, spec, tag).items()}
    oracles = {
        rank: (_mean(list(by_seed.values())), lr)
        for rank, (lr, by_seed) in _oracle_runs(records, spec).items()
    }
    return complete, oracles


def oracle_gaps(
    records: Sequence[Mapping[str, Any]], spec: SweepSpec, lr: float | None = None
) -> dict[str, dict[int, dict[str, Any]]]:
    """Per AlphaTuned variant and rank: the gap at ``lr`` (default: the smallest LR) to the rank's oracle.

    Each entry is :func:`.fit.paired_gap` of the variant's held-out losses against the oracle's
    (the grid's best cell of the rank, run on the same held-out seeds), plus ``lr``, ``oracle``
    (its mean loss) and ``oracle_lr``. Only AlphaTuned runs under the library's rule now and
    ranks whose runs cover every held-out seed count.
    """
    at = min(spec.lrs) if lr is None else lr
    oracles = _oracle_runs(records, spec)
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for (method, rank, run_lr), by_seed in sorted(_held_out_runs(records, spec, tuner_tag()).items()):
        if method.startswith("alphatuned") and math.isclose(run_lr, at) and rank in oracles:
            oracle_lr, oracle = oracles[rank]
            out.setdefault(method, {})[rank] = {
                "lr": run_lr, "oracle": _mean(list(oracle.values())), "oracle_lr": oracle_lr,
                **paired_gap(by_seed, oracle),
            }  # fmt: skip
    return out


def _bar(records: Sequence[Mapping[str, Any]], spec: SweepSpec) -> dict[str, Any]:
    """Held-out comparison: AlphaTuned (static, adaptive) against the peers and the oracle.

    Returns a JSON-able dict: ``table`` (every method's mean loss per (rank, LR)), ``cells``
    (per variant and cell, whether its mean beats all three peers' means, and on how many
    held-out seeds it beats all three peers of the same seed), ``beats_peers`` (wins / cells
    per variant, and the paired count ``seed_wins`` / ``seed_cells`` over cells × seeds),
    ``within_1pct`` (per variant and rank: the gap at the smallest LR to the oracle,
    the grid's best cell of that rank, run on the held-out seeds) and ``gap_to_oracle`` (the
    same gap at every LR).
    """
    tag = tuner_tag()
    complete, oracles = _held_out_losses(records, spec, tag)
    per_seed = _held_out_runs(records, spec, tag)
    out: dict[str, Any] = {
        "tuner": tag, "table": [], "cells": [], "within_1pct": {}, "gap_to_oracle": {}, "beats_peers": {},
    }  # fmt: skip
    for rank, lr in sorted({(r, lr) for _, r, lr in complete}):
        row: dict[str, Any] = {"rank": rank, "lr": lr}
        row.update({m: complete.get((m, rank, lr)) for m in PEERS})
        row["oracle"] = oracles.get(rank, (None, None))[0]
        out["table"].append(row)
    out["within_1pct"] = oracle_gaps(records, spec)
    for variant in ("alphatuned-static", "alphatuned"):
        wins = total = seed_wins = seed_cells = 0
        for (method, rank, lr), loss in sorted(complete.items()):
            if method != variant:
                continue
            if rank in oracles:
                gap = loss / oracles[rank][0] - 1.0
                out["gap_to_oracle"].setdefault(variant, {}).setdefault(rank, {})[lr] = gap
            peers = [complete.get((p, rank, lr)) for p in _PEER_BASELINES]
            if any(p is None for p in peers):
                continue
            beat = all(loss < p for p in peers if p is not None)
            wins, total = wins + beat, total + 1
            mine = per_seed[(variant, rank, lr)]
            paired = sum(all(mine[s] < per_seed[(p, rank, lr)][s] for p in _PEER_BASELINES) for s in mine)
            seed_wins, seed_cells = seed_wins + paired, seed_cells + len(mine)
            out["cells"].append(
                {"variant": variant, "rank": rank, "lr": lr, "loss": loss, "beats_all": beat,
                 "seed_wins": paired, "seeds": len(mine),
                 **{p: complete[(p, rank, lr)] for p in _PEER_BASELINES}}
            )  # fmt: skip
        out["beats_peers"][variant] = {
            "wins": wins, "cells": total, "seed_wins": seed_wins, "seed_cells": seed_cells,
        }  # fmt: skip
    return out


def _best_cells(cells: Mapping[tuple[int, float, float], Sequence[float]]) -> list[dict[str, Any]]:
    """The grid's best α at every (rank, LR), with its loss and the runner-up's distance."""
    groups: dict[tuple[int, float], list[tuple[float, float]]] = defaultdict(list)
    for (rank, lr, alpha), losses in cells.items():
        groups[(rank, lr)].append((_mean(list(losses)), alpha))
    out = []
    for (rank, lr), row in sorted(groups.items()):
        row.sort()
        (loss, alpha), edge = row[0], {min(a for _, a in row), max(a for _, a in row)}
        out.append({
            "rank": rank, "lr": lr, "alpha": alpha, "c": alpha / math.sqrt(rank), "loss": loss,
            "effective_step": alpha / rank * lr, "at_edge": alpha in edge, "n_alphas": len(row),
        })  # fmt: skip
    return out


def analyse(records: Sequence[Mapping[str, Any]], spec: SweepSpec) -> dict[str, Any]:
    """All the numbers of the report (JSON-able) from the records of one sweep."""
    grid = grid_records(records, spec.seeds)
    cells = cell_table(grid, spec.seeds)
    fits: dict[float, PowerLawFit] = {}
    for lr in sorted({c[1] for c in cells}):
        tables = rank_tables(cells, lr)
        if len(tables) >= 2:
            fits[lr] = bootstrap_power_law(tables)
    pairs = matched_step_pairs(cells)
    slopes = rho_slopes(grid)
    learned = rho_slopes(grid, min_accuracy=LEARNED_ACCURACY)
    seeds_per_cell = sorted({len(v) for v in cells.values()})
    return {
        "n_records": len(records),
        "n_grid_records": len(grid),
        "seeds_per_cell": seeds_per_cell,
        "fits": {
            f"{lr:g}": {
                **fit.__dict__,
                "alpha_star": {str(k): v for k, v in fit.alpha_star.items()},
                "censored": {str(k): v for k, v in fit.censored.items()},
            }
            for lr, fit in fits.items()
        },
        "lr_rule": _lr_rule(fits),
        "rule": _rule_fits(cells),
        "claim1_pairs": pairs,
        "claim1_raise_alpha_wins": sum(p["loss_raise_alpha"] < p["loss_raise_lr"] for p in pairs),
        "claim2_rho_slope_alpha": slopes["alpha"],
        "claim2_rho_slope_lr": slopes["lr"],
        "claim2_learned_accuracy": LEARNED_ACCURACY,
        "claim2_rho_slope_alpha_learned": learned["alpha"],
        "claim2_rho_slope_lr_learned": learned["lr"],
        "best_cells": _best_cells(cells),
        "bar": _bar(records, spec),
        "_cells": cells,
        "_fits": fits,
    }


def _markdown(result: Mapping[str, Any]) -> str:
    def interval(lo: float, hi: float) -> str:
        return "(no interval: one seed)" if math.isnan(lo) else f"[{lo:.2f}, {hi:.2f}]"

    lines = [
        f"records: {result['n_records']} ({result['n_grid_records']} grid runs; "
        f"seeds per cell: {result['seeds_per_cell']})",
        "",
        "### Best α per rank: α* = c·r^p",
        "",
        "| LR | α* per rank (▲ at the grid's edge) | p (90% interval) | c | c at p = ½ |",
        "|---|---|---|---|---|",
    ]
    for lr, fit in result["fits"].items():
        stars = ", ".join(
            f"r={r}: {a:.3g}{' ▲' if fit['censored'][r] else ''}" for r, a in fit["alpha_star"].items()
        )
        lo, hi = fit["p_interval"]
        lines.append(
            f"| {lr} | {stars} | {fit['p']:.2f} {interval(lo, hi)} | {fit['c']:.3g} "
            f"| {fit['c_at_half']:.3g} |"
        )
    lines += [
        "",
        "### Best grid cell per rank and LR (▲ at the grid's edge)",
        "",
        "| r | LR | best α | c = α/√r | s·η | loss | cells |",
        "|---|---|---|---|---|---|---|",
    ]
    for b in result["best_cells"]:
        edge = " ▲" if b["at_edge"] else ""
        lines.append(f"| {b['rank']} | {b['lr']:g} | {b['alpha']:.4g}{edge} | {b['c']:.4g} | "
                     f"{b['effective_step']:.2g} | {b['loss']:.4f} | {b['n_alphas']} |")  # fmt: skip
    rule = result["lr_rule"]
    if rule:
        lines += [
            "",
            f"LR rule through the per-LR c at p = ½: c(η) = {rule['c_ref']:.3g}·"
            f"({rule['reference_lr']:g}/η)^{rule['lr_exponent']:.2f}",
        ]
    lines += _rule_markdown(result["rule"])
    pairs = result["claim1_pairs"]
    lines += [
        "",
        "### Claim 1: at matched α·η, raising α beats raising the LR",
        "",
        f"raise-α wins in {result['claim1_raise_alpha_wins']} of {len(pairs)} matched pairs",
        "",
        "| r | from α | from LR | ×k | loss, α×k | loss, LR×k |",
        "|---|---|---|---|---|---|",
    ]
    for p in sorted(pairs, key=lambda p: (p["rank"], p["lr"], p["alpha"])):
        lines.append(
            f"| {p['rank']} | {p['alpha']:.3g} | {p['lr']:g} | {p['k']:g} | "
            f"{p['loss_raise_alpha']:.4f} | {p['loss_raise_lr']:.4f} |"
        )
    for suffix, which in (("", "all runs"), ("_learned", "runs that learned")):
        for name in ("alpha", "lr"):
            s = result[f"claim2_rho_slope_{name}{suffix}"]
            if s:
                extra = f", held-out accuracy ≥ {result['claim2_learned_accuracy']:g}" if suffix else ""
                lines.append(
                    f"\nClaim 2 ({which}{extra}): slope of log ρ against log {name}: median "
                    f"{np.median(s):.2f} (range {min(s):.2f} … {max(s):.2f}, {len(s)} groups)"
                )
    lines += _bar_markdown(result["bar"])
    return "\n".join(lines) + "\n"


def _rule_markdown(rules: Mapping[str, Any]) -> list[str]:
    from alpha_tuner.rule import AlphaRule

    lib = AlphaRule()

    def interval(pair: Sequence[float], digits: int) -> str:
        lo, hi = pair
        return "" if math.isnan(lo) else f" [{lo:.{digits}f}, {hi:.{digits}f}]"

    forms = {k: v for k, v in rules.items() if k != "selected"}
    lines: list[str] = []
    if forms:
        lines += [
            "",
            "### The α rule over every (rank, LR): its forms compared",
            "",
            "α*(r, η) = c·(η_ref/η)^q · r^(p₀ + p₁·ln(η/η_ref)); a form fixes some parameters. "
            "Out of sample: the factor by which the form, fitted without one (rank, LR), misses it "
            "(root mean square of the log ratio over the left-out points).",
            "",
            "| form | c | q | p₀ | p₁ | largest factor, in sample | factor, out of sample |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, fit in forms.items():
            pr = fit["params"]
            mark = " (selected)" if name == rules.get("selected") else ""
            lines.append(
                f"| {name.replace('_', ' ')}{mark} | {pr['c']:.4g} | {pr['lr_exponent']:.3f} "
                f"| {pr['rank_exponent']:.3f} | {pr['rank_exponent_slope']:.3f} | {fit['max_factor']:.2f} "
                f"| {math.exp(fit['loo_rms_log']):.2f} |"
            )
    for name, fit in forms.items():
        pr, iv = fit["params"], fit["intervals"]
        level = f"{100 * fit['level']:.0f} %"
        lines += [
            "",
            f"### The α rule over every (rank, LR): {name.replace('_', ' ')}",
            "",
            f"α*(r, η) = c·(η_ref/η)^q · r^(p₀ + p₁·ln(η/η_ref)), η_ref = {fit['reference_lr']:g}; "
            f"least squares in log α through the best α of each (rank, LR), {level} bootstrap intervals:",
            "",
            f"- c = {pr['c']:.4g}{interval(iv['c'], 0)}",
            f"- q = {pr['lr_exponent']:.3f}{interval(iv['lr_exponent'], 3)}",
            f"- p₀ = {pr['rank_exponent']:.3f}{interval(iv['rank_exponent'], 3)}",
            f"- p₁ = {pr['rank_exponent_slope']:.3f}{interval(iv['rank_exponent_slope'], 3)}",
            f"- largest factor between a measured α* and the rule: {fit['max_factor']:.2f}",
            f"- leaving each (rank, LR) out of the fit in turn, the rule fitted to the others misses its "
            f"α* by a factor {math.exp(fit['loo_rms_log']):.2f} (root mean square of the log ratio)",
            "",
            "| r | LR | measured α* | rule α | measured / rule | measured / rule fitted without it |",
            "|---|---|---|---|---|---|",
        ]
        for pt in fit["points"]:
            edge = " ▲" if pt["censored"] else ""
            lines.append(
                f"| {pt['rank']} | {pt['lr']:g} | {pt['alpha_star']:.4g}{edge} | {pt['rule_alpha']:.4g} "
                f"| {pt['ratio']:.2f} | {pt['loo_ratio']:.2f} |"
            )
    if rules:
        lines += [
            "",
            f"The library now: c = {lib.c:g}, q = {lib.lr_exponent:g}, p₀ = {lib.rank_exponent:g}, "
            f"p₁ = {lib.rank_exponent_slope:g} (alpha_tuner.AlphaRule).",
        ]
    return lines


def _bar_markdown(bar: Mapping[str, Any]) -> list[str]:
    def cell(v: float | None) -> str:
        return "–" if v is None else ("diverged" if math.isinf(v) else f"{v:.4f}")

    lines = [
        "",
        f"### The bar (held-out seeds; AlphaTuned rule {bar['tuner']})",
        "",
        "Mean held-out eval loss per (rank, LR); the oracle is the grid's best cell of the rank "
        "(chosen on the selection seeds), run on the held-out seeds.",
        "",
        "| r | LR | vanilla (α=2r) | rsLoRA | LoRA+ | AlphaTuned static | AlphaTuned adaptive | oracle |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in bar["table"]:
        values = " | ".join(cell(row[m]) for m in (*PEERS, "oracle"))
        lines.append(f"| {row['rank']} | {row['lr']:g} | {values} |")
    lines.append("")
    for variant, score in bar["beats_peers"].items():
        lines.append(
            f"- {variant}: beats vanilla LoRA, rsLoRA and LoRA+ in {score['wins']} of {score['cells']} "
            f"(rank, LR) cells (mean loss); seed by seed, in {score['seed_wins']} of "
            f"{score['seed_cells']} (cell, held-out seed) pairs"
        )
    for variant, gaps in bar["within_1pct"].items():
        for rank, g in sorted(gaps.items()):
            paired = ", ".join(f"{100 * x:+.1f}" for x in g["paired"])
            lines.append(
                f"- {variant}, r={rank}, lr={g['lr']:g}: {100 * g['gap']:+.2f}% against the oracle "
                f"cell ({g['oracle']:.4f} at lr={g['oracle_lr']:g}); per held-out seed {paired} % "
                f"(standard error {100 * g['se']:.2f} %)"
            )
    return lines


def write_report(path: Path, spec: SweepSpec) -> dict[str, Any]:
    """Analyse ``path`` and write the report files and figures beside it; returns the numbers."""
    from .plots import plot_best_alpha, plot_heatmaps, plot_rho

    records = read_records(path)
    result = analyse(records, spec)
    cells, fits = result.pop("_cells"), result.pop("_fits")
    stem = path.with_suffix("")
    if cells:
        plot_heatmaps(cells, Path(f"{stem}_heatmaps.png"))
        plot_rho(grid_records(records, spec.seeds), Path(f"{stem}_rho.png"))  # the claim-2 runs only
    if fits:
        selected = result["rule"].get("selected")
        rule = result["rule"][selected]["params"] if selected else None
        plot_best_alpha(fits, Path(f"{stem}_best_alpha.png"), rule=rule)
    Path(f"{stem}_report.json").write_text(
        json.dumps(finite_json(result), indent=1, default=str) + "\n", encoding="utf-8"
    )
    text = _markdown(result)
    Path(f"{stem}_report.md").write_text(text, encoding="utf-8")
    print(text)
    return result
