"""A typical PEFT + Hugging Face Trainer recipe, upgraded to tuned LoRA α by one line.

    python examples/trainer_recipe.py [--steps 120] [--lr 1e-3] [--out runs/trainer_recipe]

The recipe: a small Llama built from a transformers config (no download), LoRA r=8 on the
attention and MLP projections, a synthetic next-token task, and the Trainer with a cosine
schedule, warmup, gradient accumulation and clipping. The one changed line hands the Trainer
``AlphaTunedOptimizer(torch.optim.AdamW(model.parameters(), lr=...), model)``;
``AlphaTunerCallback`` logs α and ρ next to the loss. At the end the script writes
``alpha_rho.png`` (loss, α per layer and ρ over the run) and the tuned adapter to ``--out``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from alpha_tuner import AlphaTunedOptimizer
from alpha_tuner.integrations import AlphaTunerCallback

VOCAB = 128


def build_model(rank: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    lora = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,  # the recipe's α; the wrapper replaces it with the tuned one
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    return get_peft_model(LlamaForCausalLM(config), lora)


def synthetic_text(size: int, length: int = 32, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """A learnable synthetic language (each token a fixed function of the previous one)."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randperm(VOCAB, generator=g)
    rows = []
    for _ in range(size):
        ids = torch.empty(length, dtype=torch.long)
        ids[0] = torch.randint(0, VOCAB, (1,), generator=g)
        for t in range(1, length):
            ids[t] = table[ids[t - 1]]
        rows.append({"input_ids": ids, "labels": ids.clone()})
    return rows


def plot(history: list[dict[str, float]], path: Path, *, recipe_alpha: float) -> None:
    """Loss, α per layer and ρ (mean with min–max band, and the learning rate) per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [e["step"] for e in history]
    fig, (ax_loss, ax_alpha, ax_rho) = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
    ax_loss.plot(steps, [e.get("loss", math.nan) for e in history], color="black")
    ax_loss.set_ylabel("training loss")
    ax_loss.set_title("AlphaTunedOptimizer in the Trainer")

    layers = sorted({k for e in history for k in e if k.startswith("alpha/") and "layers." in k})
    for key in layers:
        ax_alpha.plot(steps, [e.get(key, math.nan) for e in history], lw=0.8, alpha=0.6)
    ax_alpha.plot(steps, [e["alpha/mean"] for e in history], color="black", lw=2, label="tuned, mean")
    ax_alpha.axhline(recipe_alpha, color="tab:red", ls="--", label=f"recipe's α = {recipe_alpha:g}")
    ax_alpha.set_ylim(0, 1.2 * max(recipe_alpha, max(e["alpha/max"] for e in history)))
    ax_alpha.set_ylabel("α (PEFT lora_alpha)")
    ax_alpha.legend(loc="best", fontsize="small")

    if any("rho/mean" in e for e in history):
        rho = [(e["step"], e["rho/min"], e["rho/mean"], e["rho/max"]) for e in history if "rho/mean" in e]
        x, lo, mid, hi = zip(*rho, strict=True)
        ax_rho.fill_between(x, lo, hi, color="tab:blue", alpha=0.25, label="min–max over layers")
        ax_rho.plot(x, mid, color="tab:blue", label="mean")
        ax_rho.set_yscale("log")
        ax_rho.legend(loc="lower left", fontsize="small")
    if all("learning_rate" in e for e in history):
        ax_lr = ax_rho.twinx()
        ax_lr.plot(steps, [e["learning_rate"] for e in history], color="gray", ls=":")
        ax_lr.set_ylabel("learning rate (dotted)", color="gray")
    ax_rho.set_ylabel("drift ratio ρ")
    ax_rho.set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps")
    parser.add_argument("--lr", type=float, default=1e-3, help="the recipe's learning rate")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--measure-every", type=int, default=5)
    parser.add_argument("--control-every", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/trainer_recipe"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # a model this small runs fastest on one thread
    args.out.mkdir(parents=True, exist_ok=True)

    model = build_model(args.rank, args.seed)
    train_args = TrainingArguments(
        output_dir=str(args.out / "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.steps // 10),
        max_grad_norm=1.0,
        logging_steps=max(1, min(4, args.steps // 20)),
        save_strategy="no",
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=args.seed,
    )
    # The one-line change: the recipe's AdamW, wrapped.
    opt = AlphaTunedOptimizer(
        torch.optim.AdamW(model.parameters(), lr=args.lr),
        model,
        measure_every=args.measure_every,
        control_every=args.control_every,
    )
    telemetry = AlphaTunerCallback()  # α and ρ in every log; history (per layer too) for the plot
    trainer = Trainer(
        model=model,
        args=train_args,
        train_dataset=synthetic_text(16 * args.steps),
        optimizers=(opt, None),
        callbacks=[telemetry],
    )
    trainer.train()

    trainer.save_model(str(args.out / "adapter"))  # adapter_config.json carries the tuned α
    figure = args.out / "alpha_rho.png"
    plot(telemetry.history, figure, recipe_alpha=2 * args.rank)
    first, last = telemetry.history[0], telemetry.history[-1]
    print(f"loss {first['loss']:.3f} -> {last['loss']:.3f} over {int(last['step'])} steps")
    print(
        f"alpha: recipe {2 * args.rank}, tuned {last['alpha/min']:.1f}..{last['alpha/max']:.1f} "
        f"({int(last['alpha/backoffs'])} back-offs)"
    )
    if "rho/mean" in last:
        print(f"rho: mean {last['rho/mean']:.3g} (min {last['rho/min']:.3g}, max {last['rho/max']:.3g})")
    print(f"wrote {figure} and {args.out / 'adapter'}")


if __name__ == "__main__":
    main()
