"""AlphaTunedOptimizer in a plain PyTorch loop, with the usual pieces around it.

    python examples/plain_loop.py [--steps 100] [--lr 1e-3] [--bf16] [--out runs/plain_loop]

A small Llama built from a transformers config (no download) with LoRA adapters, trained on a
synthetic next-token task with a cosine schedule and warmup, gradient clipping and, with
``--bf16``, bf16 autocast. Every ``--log-every`` steps the loop prints α and ρ, read with
:func:`alpha_tuner.integrations.collect_metrics` (one device transfer). At the end it saves the
adapter and the optimizer state, resumes both into a fresh model and optimizer, and checks
that α and the model's outputs came back.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, get_cosine_schedule_with_warmup

from alpha_tuner import AlphaTunedOptimizer
from alpha_tuner.integrations import collect_metrics

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


def batches(steps: int, seed: int, batch: int = 8, length: int = 32) -> list[torch.Tensor]:
    """A learnable synthetic language: each token is a fixed function of the previous one."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randperm(VOCAB, generator=g)
    out = []
    for _ in range(steps):
        x = torch.empty(batch, length, dtype=torch.long)
        x[:, 0] = torch.randint(0, VOCAB, (batch,), generator=g)
        for t in range(1, length):
            x[:, t] = table[x[:, t - 1]]
        out.append(x)
    return out


def wrap(model: torch.nn.Module, lr: float) -> AlphaTunedOptimizer:
    return AlphaTunedOptimizer(torch.optim.AdamW(model.parameters(), lr=lr), model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for forward and loss")
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/plain_loop"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # a model this small runs fastest on one thread

    model = build_model(args.rank, args.seed)
    opt = wrap(model, args.lr)  # the one-line change
    schedule = get_cosine_schedule_with_warmup(opt, max(1, args.steps // 10), args.steps)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()

    model.train()
    for step, ids in enumerate(batches(args.steps, args.seed + 1), start=1):
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        opt.zero_grad()
        if step % args.log_every == 0 or step == args.steps:
            m = collect_metrics(opt)
            rho = f"rho {m['rho/mean']:.2e}" if "rho/mean" in m else "rho -"
            print(f"step {step:4d}  loss {loss.item():.3f}  alpha {m['alpha/mean']:.2f}  {rho}")

    # Checkpoint: the adapter (its config carries the tuned α) and the optimizer state.
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out / "adapter")
    torch.save(opt.state_dict(), args.out / "optimizer.pt")

    # Resume as the Trainer does: wrap the fresh model (its B is still zero, so the principled
    # rescale at wrap time changes nothing), load the adapter weights, then the optimizer
    # state, which writes the saved α into the model without touching B.
    fresh = build_model(args.rank, args.seed)
    fresh_opt = wrap(fresh, args.lr)
    fresh.load_adapter(str(args.out / "adapter"), adapter_name="default", is_trainable=True)
    fresh_opt.load_state_dict(torch.load(args.out / "optimizer.pt", weights_only=True))
    assert fresh_opt.alphas() == opt.alphas()
    model.eval()
    fresh.eval()
    probe = batches(1, args.seed + 2)[0]
    with torch.no_grad():
        gap = (model(input_ids=probe).logits - fresh(input_ids=probe).logits).abs().max().item()
    print(f"resumed: same alpha per layer, max output difference {gap:.1e}")


if __name__ == "__main__":
    main()
