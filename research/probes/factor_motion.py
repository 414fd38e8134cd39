"""How far each LoRA factor moves in a sweep run: why α at a small LR does not replace a larger LR.

Under Adam, raising α by k is raising B's learning rate by k (``README.md``), but A's step stays
~η whatever α is. This script trains a few configurations of the sweep (same seed, same data) and
reports, as layer means at the end of training, how far A moved from its initialisation
(‖A − A₀‖ / ‖A₀‖), the size of the adapter's update relative to the frozen weight
(‖s·B·A‖ / ‖W‖), and the held-out loss.

Usage::

    python -m research.probes.factor_motion                 # r = 16, seed 0 -> a markdown table
    python -m research.probes.factor_motion --rank 4 --seed 1
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import torch

from alpha_tuner.demo.data import batches
from alpha_tuner.demo.models import attach_lora, build_optimizer, load_base
from alpha_tuner.demo.train import evaluate, make_task
from research.sweep import SweepSpec

#: (label, method, lr, alpha): AlphaTuned's defaults at the small and the large LR, and plain
#: LoRA at the large LR with the grid's best α of r = 16 (α = 32) and with AlphaTuned's α there.
CONFIGS = (
    ("AlphaTuned, lr 2e-5", "alphatuned-static", 2e-5, None),
    ("AlphaTuned, lr 3.2e-4", "alphatuned-static", 3.2e-4, None),
    ("LoRA α = 32, lr 3.2e-4", "lora", 3.2e-4, 32.0),
    ("LoRA α = 1024, lr 2e-5", "lora", 2e-5, 1024.0),
)


def lora_layers(model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]]:
    """(A, B, W, s) of every LoRA ``Linear`` of the default adapter."""
    out = []
    for module in model.modules():
        layer: Any = module  # a PEFT LoRA layer: lora_A / lora_B are ModuleDicts keyed by adapter
        if hasattr(layer, "lora_A") and "default" in layer.lora_A:
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            out.append((a, b, layer.base_layer.weight, float(layer.scaling["default"])))
    return out


def motion(
    model_name: str, method: str, lr: float, alpha: float | None, rank: int, seed: int
) -> dict[str, float]:
    """Train one configuration like the sweep does and measure its factors at the end."""
    spec = SweepSpec(model=model_name)
    base = load_base(model_name)
    task = make_task(base, spec.eval_size)
    torch.manual_seed(seed)
    model = attach_lora(base, method, rank, alpha=alpha, seed=seed)
    model.train()
    rule = {"steps": None}  # the study of the α rule's factors
    optimizer, _ = build_optimizer(model, method, lr, measure_every=10, tuner_options=rule)
    start = [a.detach().clone() for a, _, _, _ in lora_layers(model)]  # after the wrapper's rescale
    for batch in batches(task.train, spec.batch_size, spec.steps, seed=seed):
        model(**task.encode(batch)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        layers = lora_layers(model)
        a_moved = [float((a - a0).norm() / a0.norm()) for (a, _, _, _), a0 in zip(layers, start, strict=True)]
        update = [float((s * b @ a).norm() / w.norm()) for a, b, w, s in layers]
        scales = [s for _, _, _, s in layers]
    loss, accuracy = evaluate(model, task)
    return {
        "a_moved": statistics.fmean(a_moved),
        "update": statistics.fmean(update),
        "s": statistics.fmean(scales),
        "loss": loss,
        "accuracy": accuracy,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="minilm", help="minilm, or tiny for a smoke test")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{args.model}, r = {args.rank}, seed {args.seed}, {SweepSpec.steps} steps; layer means at the end")
    print("")
    print("| run | s | ‖A − A₀‖ / ‖A₀‖ | ‖s·B·A‖ / ‖W‖ | held-out loss | accuracy |")
    print("|---|---|---|---|---|---|")
    for label, method, lr, alpha in CONFIGS:
        m = motion(args.model, method, lr, alpha, args.rank, args.seed)
        print(
            f"| {label} | {m['s']:.4g} | {m['a_moved']:.4f} | {m['update']:.4f} | {m['loss']:.4f} |"
            f" {m['accuracy']:.3f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
