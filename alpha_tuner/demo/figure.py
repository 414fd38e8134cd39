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


#: One look per method, in the order the demo runs them: colour, line style and marker all differ,
#: so two methods with equal values stay apart (vanilla LoRA and LoRA+ share α = 2r).
_LOOKS = (
    ("tab:blue", "-", "o"),
    ("tab:orange", "--", "s"),
    ("tab:green", "-.", "^"),
    ("tab:red", ":", "D"),
    ("tab:purple", (0, (5, 1, 1, 1)), "v"),
)


def plot_demo(result: Mapping[str, Any], path: Path, *, labels: Mapping[str, str]) -> None:
    """Training loss, held-out loss, mean α and mean drift ratio ρ of every demo method.

    Four panels and one legend for all of them; the held-out losses are bars with their values
    written out, so equal results cannot hide each other.
    """
    plt = pyplot()
    with plt.rc_context({"font.size": 12, "axes.titlesize": 13, "legend.fontsize": 11}):
        fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
        (loss_ax, held_ax), (alpha_ax, rho_ax) = axes
        names, held, colors = [], [], []
        every = max(3, len(result["records"]))
        lrs = [float(x) for x in result["settings"].get("lrs", [result["settings"]["lr"]])]
        methods = list(dict.fromkeys(rec["config"]["method"] for rec in result["records"]))
        for i, rec in enumerate(result["records"]):
            # One look per method; with several base LRs, one line style per LR (solid first).
            method = rec["config"]["method"]
            color, ls, marker = _LOOKS[methods.index(method) % len(_LOOKS)]
            label = labels.get(method, method)
            if len(lrs) > 1:
                ls = _LOOKS[lrs.index(float(rec["config"]["lr"])) % len(_LOOKS)][1]
                label = f"{label}, lr {rec['config']['lr']:g}"
            # Markers at staggered steps: a line hidden under another still shows its own markers.
            style: dict[str, Any] = {"color": color, "ls": ls, "marker": marker, "ms": 7, "lw": 1.8}
            style["markevery"] = (i % every, every)
            curve = np.array(rec["train_curve"], dtype=float).reshape(-1, 2)
            loss_ax.plot(curve[:, 0], curve[:, 1], label=label, **style)
            tele = np.array(rec["telemetry"], dtype=float).reshape(-1, 3)
            if len(tele):
                alpha_ax.plot(tele[:, 0], tele[:, 1], **style)
                rho_ax.plot(tele[:, 0], tele[:, 2], **style)
            loss = rec["eval_loss"]
            names.append(label)
            colors.append(color)
            held.append(loss if loss is not None and math.isfinite(loss) else math.nan)
        y = np.arange(len(names))
        held_ax.barh(y, np.nan_to_num(held, nan=0.0), color=colors)
        for yi, value in zip(y, held, strict=True):
            text = "diverged" if math.isnan(value) else f"{value:.3f}"
            held_ax.text(0.01, yi, f" {text}", va="center", color="white", fontweight="bold",
                         transform=held_ax.get_yaxis_transform())  # fmt: skip
        held_ax.set_yticks(y, names)
        held_ax.invert_yaxis()
        held_ax.set(title="held-out loss after training (lower is better)", xlabel="loss")
        loss_ax.set(title="training loss (mean of 10 steps)", xlabel="step", ylabel="loss")
        alpha_ax.set(title="mean α over the LoRA layers", xlabel="step", ylabel="α", yscale="log")
        rho_ax.set(title="mean drift ratio ρ = ‖dB·dA‖ / ‖dB·A + B·dA‖", xlabel="step", ylabel="ρ")
        rho_ax.set_yscale("log")
        s = result["settings"]
        lr_text = ", ".join(f"{x:g}" for x in lrs)
        fig.suptitle(f"{s['model']}, r = {s['rank']}, lr = {lr_text}, batch {s['batch_size']}, "
                     f"seed {s['seed']}")  # fmt: skip
        handles, legend_labels = loss_ax.get_legend_handles_labels()
        fig.legend(handles, legend_labels, loc="lower center", ncol=min(len(names), 2), frameon=False)
        fig.tight_layout(rect=(0, 0.08, 1, 0.97))
        fig.savefig(path, dpi=100)
        plt.close(fig)
