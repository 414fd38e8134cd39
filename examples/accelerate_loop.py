"""AlphaTunedOptimizer in a Hugging Face Accelerate loop.

    python examples/accelerate_loop.py [--steps 100] [--lr 1e-3] [--bf16] [--out runs/accelerate_loop]
    accelerate launch examples/accelerate_loop.py ...     # the same script, on any set-up

``accelerator.prepare(model, opt, dataloader, scheduler)`` wraps the tuner like any optimizer
(Accelerate's save -> move -> load of its state at prepare time leaves α untouched). The loop
uses gradient accumulation, clipping and, with ``--bf16``, bf16 mixed precision; α and ρ go to
``accelerator.log`` (any tracker) and the console via
:func:`alpha_tuner.integrations.collect_metrics`. At the end ``accelerator.save_state`` writes a
checkpoint, and ``load_state`` brings α back after it was changed on purpose.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM, get_cosine_schedule_with_warmup

from alpha_tuner import AlphaTunedOptimizer
from alpha_tuner.integrations import collect_metrics, find_alpha_tuned_optimizer

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
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--accumulate", type=int, default=2, help="micro-batches per optimizer step")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/accelerate_loop"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # a model this small runs fastest on one thread

    accelerator = Accelerator(
        gradient_accumulation_steps=args.accumulate, mixed_precision="bf16" if args.bf16 else "no"
    )
    model = build_model(args.rank, args.seed)
    opt = AlphaTunedOptimizer(torch.optim.AdamW(model.parameters(), lr=args.lr), model)
    loader = DataLoader(synthetic_text(8 * args.accumulate * args.steps), batch_size=8, shuffle=True)
    schedule = get_cosine_schedule_with_warmup(opt, max(1, args.steps // 10), args.steps)
    model, opt, loader, schedule = accelerator.prepare(model, opt, loader, schedule)

    step = 0
    model.train()
    for batch in loader:
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()  # steps the tuner only when the accumulated gradient is complete
            schedule.step()
            opt.zero_grad()
        if not accelerator.sync_gradients:
            continue
        step += 1
        if step % args.log_every == 0 or step == args.steps:
            metrics = collect_metrics(opt)  # works through Accelerate's AcceleratedOptimizer
            accelerator.log({"loss": loss.item(), **metrics}, step=step)
            rho = f"rho {metrics['rho/mean']:.2e}" if "rho/mean" in metrics else "rho -"
            accelerator.print(
                f"step {step:4d}  loss {loss.item():.3f}  alpha {metrics['alpha/mean']:.2f}  {rho}"
            )

    tuner = find_alpha_tuned_optimizer(opt)  # inside Accelerate's AcceleratedOptimizer
    assert tuner is not None
    accelerator.save_state(str(args.out / "state"))
    saved = tuner.alphas()
    tuner.rescale_(1.0)  # change α on purpose (the model's function is kept)
    accelerator.load_state(str(args.out / "state"))
    assert tuner.alphas() == saved
    accelerator.print(f"save_state/load_state: alpha restored ({len(saved)} layers), {step} optimizer steps")


if __name__ == "__main__":
    main()
