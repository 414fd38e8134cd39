"""The demo's figure (matplotlib, imported lazily, Agg backend)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plot_demo", "pyplot"]


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_demo(result: Mapping[str, Any], path: Path, *, labels: Mapping[str, str]) -> None:
    """Training loss, mean α and mean drift ratio ρ over the steps of every demo method."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    styles = ("-", "--", "-.", ":", (0, (5, 1, 1, 1)))  # methods with equal α stay visible
    for i, rec in enumerate(result["records"]):
        label = labels.get(rec["config"]["method"], rec["config"]["method"])
        curve = np.array(rec["train_curve"], dtype=float).reshape(-1, 2)
        (line,) = axes[0].plot(curve[:, 0], curve[:, 1], label=label, ls=styles[i % len(styles)])
        if rec["eval_loss"] is not None and math.isfinite(rec["eval_loss"]):
            axes[0].scatter([curve[-1, 0]], [rec["eval_loss"]], marker="*", s=120, color=line.get_color())
        tele = np.array(rec["telemetry"], dtype=float).reshape(-1, 3)
        if len(tele):
            axes[1].plot(tele[:, 0], tele[:, 1], label=label, color=line.get_color(), ls=line.get_linestyle())
            axes[2].plot(tele[:, 0], tele[:, 2], label=label, color=line.get_color(), ls=line.get_linestyle())
    s = result["settings"]
    axes[0].set(title="training loss, mean of 10 steps (★ held-out loss)", xlabel="step", ylabel="loss")
    axes[1].set(title="mean α over LoRA layers", xlabel="step", ylabel="α", yscale="log")
    axes[2].set(title="mean drift ratio ρ = ‖dB·dA‖/‖dB·A+B·dA‖", xlabel="step", ylabel="ρ", yscale="log")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{s['model']}, r={s['rank']}, lr={s['lr']:g}, batch {s['batch_size']}, seed {s['seed']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
