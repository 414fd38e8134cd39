"""Multi-process LoRA training with the Hugging Face Trainer (DDP) and AlphaTunedOptimizer.

Launch one process per device with torchrun; on a machine without GPUs the ranks run on the
CPU with the gloo backend::

    torchrun --nproc_per_node 2 examples/ddp_trainer.py [--steps 40] [--lr 2e-5]

Every rank builds the same tiny Llama (from a transformers config, no download) with LoRA
adapters; the Trainer wraps it in DistributedDataParallel and builds the optimizer through
:func:`alpha_tuner.create_alpha_tuned_optimizer`. The tuner measures the drift ratio on each
rank and, at each control step, every rank applies rank 0's α (one broadcast). At the end each
rank's α is gathered to check that they agree, and rank 0 saves the adapter, tuned α included.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from torch.utils.data import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from alpha_tuner import AlphaTunedOptimizer, ControlConfig, create_alpha_tuned_optimizer


class NextTokenTask(Dataset):
    """A learnable synthetic language: each token is a fixed function of the previous one."""

    def __init__(self, size: int, length: int = 32, vocab: int = 128, seed: int = 1) -> None:
        g = torch.Generator().manual_seed(seed)
        table = torch.randperm(vocab, generator=g)
        ids = torch.empty(size, length, dtype=torch.long)
        ids[:, 0] = torch.randint(0, vocab, (size,), generator=g)
        for t in range(1, length):
            ids[:, t] = table[ids[:, t - 1]]
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def build(rank: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)  # the same initial weights on every rank
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    return get_peft_model(LlamaForCausalLM(config), lora)


def tuner_of(optimizer: torch.optim.Optimizer) -> AlphaTunedOptimizer:
    """The AlphaTunedOptimizer inside Accelerate's optimizer wrapper."""
    while not isinstance(optimizer, AlphaTunedOptimizer):
        optimizer = optimizer.optimizer  # type: ignore[attr-defined]
    return optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8, help="per-device batch size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=None, help="where rank 0 saves the adapter")
    args = parser.parse_args()
    use_cpu = not torch.cuda.is_available()
    if use_cpu:
        torch.set_num_threads(1)

    model = build(args.rank, args.seed)
    # One path for all ranks; only rank 0 writes to it.
    output_dir = args.output_dir or os.path.join(tempfile.gettempdir(), "alpha_tuner_ddp_trainer")
    training_args = TrainingArguments(
        output_dir=output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        logging_steps=max(1, args.steps // 4),
        save_strategy="no",
        report_to=[],
        use_cpu=use_cpu,
        ddp_backend="gloo" if use_cpu else None,
        dataloader_num_workers=0,
        seed=args.seed,
    )
    tuner_options = {
        "optimizer_cls": torch.optim.AdamW,
        "lr": args.lr,
        # Short cadences and tolerance=1 (any rise of ρ above its long-run level backs α off)
        # so that α visibly moves in a short demo; the defaults are 10, 40 and 2. control_every
        # is a multiple of measure_every × measure_phases (2 × 2 here; 10 × 4 by default).
        "measure_every": 2,
        "measure_phases": 2,
        "control_every": 12,
        "control": ControlConfig(tolerance=1.0),
    }
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=NextTokenTask(size=args.steps * args.batch * 8),
        optimizer_cls_and_kwargs=(create_alpha_tuned_optimizer, tuner_options),  # type: ignore[arg-type]
    )
    trainer.train()

    opt = tuner_of(trainer.optimizer)  # type: ignore[arg-type]
    alphas = opt.alphas()
    everyone: list[dict[str, float] | None] = [None] * trainer.args.world_size
    if dist.is_initialized():
        dist.all_gather_object(everyone, alphas)
    else:
        everyone = [alphas]
    trainer.save_model(output_dir)  # the adapter, with the tuned α in its alpha_pattern
    if trainer.is_world_process_zero():
        backend = dist.get_backend() if dist.is_initialized() else "none"
        print(f"\nworld size {trainer.args.world_size}, {args.steps} steps, backend {backend}")
        print("alpha identical on every rank:", all(a == alphas for a in everyone))
        print("diagnostics:", {k: round(v, 4) for k, v in opt.diagnostics().items()})
        for layer, alpha in alphas.items():
            print(f"  {layer.removeprefix('base_model.model.'):<44} alpha = {alpha:8.3f}")
        print("adapter saved to", output_dir)


if __name__ == "__main__":
    main()
