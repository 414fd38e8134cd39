"""The tasks the Trainer benchmarks run: a base model, its data and its LoRA set-up, per name.

* ``smollm2``: SmolLM2-135M, causal LM on the 2012 convention speeches (:mod:`research.corpus`),
  LoRA on every linear layer of the blocks; 128-token blocks; 96 fixed held-out blocks.
* ``minilm``: all-MiniLM-L6-v2, review sentiment (the sweep's task, :mod:`alpha_tuner.demo.data`),
  LoRA on every linear layer of the encoder, the fresh classifier and the pooler trained in full
  (``modules_to_save``, re-initialised from the run's seed); 512 fixed held-out reviews.
* ``debates``: the same MiniLM set-up with a three-way head, the side of the speaker of a 2016
  presidential-debate statement (:mod:`research.debates`), a task the constants were never
  chosen on; a quarter of the statements held out.
* ``party``: the same MiniLM set-up with a two-way head, the party of the convention at which a
  48-word passage of a 2012 speech was given (:mod:`research.party`), another task the constants
  were never chosen on; whole speeches held out, 256 passages per party.
* ``tiny``: a 2-layer random Llama with a byte tokenizer on the speeches (the smoke test).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from functools import cache
from typing import Any

import torch
from torch import nn

from .corpus import BlockDataset, lm_blocks, load_speeches, split
from .debates import LABELS, load_statements, split_statements
from .party import load_passages

__all__ = ["ENCODER_TASKS", "TASKS", "Task", "collator", "fresh_model", "task_data"]

EVAL_BLOCKS = 96
EVAL_REVIEWS = 512
LM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Task:
    """How a model name is fine-tuned: PEFT's task type, LoRA targets and heads trained in full."""

    task_type: str
    target_modules: str | tuple[str, ...]
    modules_to_save: tuple[str, ...] = ()


def _bert_targets() -> str:
    from alpha_tuner.demo.models import SPECS

    targets = SPECS["minilm"].target_modules
    assert isinstance(targets, str)  # a regex over the encoder's linear layers
    return targets


TASKS = {
    "smollm2": Task("CAUSAL_LM", LM_TARGETS),
    "tiny": Task("CAUSAL_LM", LM_TARGETS),
}
TASKS["minilm"] = Task("SEQ_CLS", _bert_targets(), ("classifier", "pooler"))
TASKS["debates"] = TASKS["minilm"]
TASKS["party"] = TASKS["minilm"]
#: The classification tasks (a MiniLM encoder with a fresh head).
ENCODER_TASKS = ("minilm", "debates", "party")


class _ByteTokenizer:
    """Bytes as token ids 3…258 and EOS = 2: the tiny smoke-test model's tokenizer."""

    eos_token_id = 2

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        del add_special_tokens
        return {"input_ids": [b + 3 for b in text.encode("utf-8")]}


@cache
def _base(model: str) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if model == "tiny":
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
        )  # fmt: skip
        return LlamaForCausalLM(config), _ByteTokenizer()
    if model in ENCODER_TASKS:
        base = _encoder(model)
        return base.model, base.tokenizer
    if model != "smollm2":
        raise ValueError(f"Unknown model {model!r}; choose one of {sorted(TASKS)}.")
    from alpha_tuner.demo import assets

    path = assets.smollm2_path()
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


class _Reviews(torch.utils.data.Dataset):
    """Tokenised reviews, unpadded (the Trainer's collator pads each batch)."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


def _reviews(tokenizer: Any, examples: list[tuple[str, int]], max_length: int) -> _Reviews:
    enc = tokenizer([t for t, _ in examples], truncation=True, max_length=max_length)
    keys = [k for k in enc if k != "token_type_ids"]
    return _Reviews([{**{k: enc[k][i] for k in keys}, "labels": y} for i, (_, y) in enumerate(examples)])


@cache
def task_data(model: str, block: int) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset]:
    """``(train, held_out)`` of a task; ``block`` is the sequence length (LM) or the truncation (reviews)."""
    _, tokenizer = _base(model)
    if model == "minilm":
        from alpha_tuner.demo import assets
        from alpha_tuner.demo.data import load_reviews, split_examples

        reviews = split_examples(load_reviews(assets.reviews_path()), EVAL_REVIEWS)
        return _reviews(tokenizer, reviews.train, block), _reviews(tokenizer, reviews.held_out, block)
    if model == "debates":
        train_st, held_st = split_statements(load_statements())
        return _reviews(tokenizer, train_st, block), _reviews(tokenizer, held_st, block)
    if model == "party":
        train_p, held_p = load_passages()
        return _reviews(tokenizer, train_p, block), _reviews(tokenizer, held_p, block)
    train, held_out = split(load_speeches())
    train_blocks = lm_blocks(tokenizer, [s.text for s in train], block)
    held = lm_blocks(tokenizer, [s.text for s in held_out], block)
    pick = torch.linspace(0, held.shape[0] - 1, min(EVAL_BLOCKS, held.shape[0])).round().long()
    return BlockDataset(train_blocks), BlockDataset(held[pick])


def fresh_model(model: str, seed: int) -> nn.Module:
    """A copy of the base model; a classification head re-initialised from ``seed``."""
    if model in ENCODER_TASKS:
        return _encoder(model).fresh(seed)
    return copy.deepcopy(_base(model)[0])


@cache
def _encoder(model: str) -> Any:
    """The demo's MiniLM base (:class:`alpha_tuner.demo.models.BaseModel`), loaded once, with a
    head of the task's classes."""
    from alpha_tuner.demo.models import load_base

    base = load_base("minilm")
    if model == "debates":
        from transformers import AutoModelForSequenceClassification

        three_way = AutoModelForSequenceClassification.from_pretrained(base.source, num_labels=len(LABELS))
        base = replace(base, model=three_way)
    return base


def collator(model: str) -> Any:
    """The Trainer's data collator of a task (``None``: its default, for equal-length blocks)."""
    if model not in ENCODER_TASKS:
        return None
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(_base(model)[1])
