"""The review corpus, its fixed held-out split, and batches of encoded examples.

The task of the demo and the sweep is binary sentiment on Rotten Tomatoes snippets
(``fresh`` → 1, ``rotten`` → 0; the corpus's ``plot`` rows are dropped). The held-out split
is drawn once with :data:`SPLIT_SEED`, independent of the training seed, so every method and
every seed is evaluated on the same examples. For causal language models the same snippets
are the text (next-token loss).
"""

from __future__ import annotations

import bz2
import csv
import io
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "SPLIT_SEED",
    "Example",
    "Split",
    "WordHashTokenizer",
    "batches",
    "encode_causal_lm",
    "encode_classification",
    "load_reviews",
    "split_examples",
    "synthetic_sentiment",
]

#: Seed of the one shuffle that splits train from held-out examples (never the training seed).
SPLIT_SEED = 20_240_601
_LABELS = {"fresh": 1, "rotten": 0}

Example = tuple[str, int]
Encoder = Callable[[Sequence[Example]], dict[str, Tensor]]


@dataclass(frozen=True)
class Split:
    """Training and held-out examples."""

    train: list[Example]
    held_out: list[Example]


def load_reviews(path: Path) -> list[Example]:
    """Read ``(text, label)`` pairs from the bz2 CSV (columns ``category``, ``text``)."""
    with bz2.open(path, "rb") as raw:
        rows = csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8"))
        return [(r["text"].strip(), _LABELS[r["category"]]) for r in rows if r["category"] in _LABELS]


def split_examples(examples: Sequence[Example], held_out: int, *, seed: int = SPLIT_SEED) -> Split:
    """Shuffle once with ``seed`` and hold out the first ``held_out`` examples.

    Raises:
        ValueError: If ``held_out`` leaves no training examples or is negative.
    """
    if not 0 <= held_out < len(examples):
        raise ValueError(f"held_out must be in [0, {len(examples)}), got {held_out}.")
    order = list(examples)
    random.Random(seed).shuffle(order)
    return Split(train=order[held_out:], held_out=order[:held_out])


def batches(
    examples: Sequence[Example], batch_size: int, steps: int, *, seed: int
) -> Iterator[list[Example]]:
    """``steps`` batches drawn epoch by epoch in an order set by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(len(examples), generator=gen).tolist()
        chunk, order = order[:batch_size], order[batch_size:]
        yield [examples[i] for i in chunk]


def encode_classification(tokenizer: Any, max_length: int) -> Encoder:
    """An encoder to ``input_ids``/``attention_mask``/``labels`` for sequence classification."""

    def encode(batch: Sequence[Example]) -> dict[str, Tensor]:
        enc = tokenizer(
            [t for t, _ in batch], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        enc["labels"] = torch.tensor([y for _, y in batch], dtype=torch.long)
        return dict(enc)

    return encode


def encode_causal_lm(tokenizer: Any, max_length: int) -> Encoder:
    """An encoder for next-token loss; padding positions get label -100 (ignored)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    def encode(batch: Sequence[Example]) -> dict[str, Tensor]:
        enc = tokenizer(
            [t for t, _ in batch], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        labels = enc["input_ids"].clone()
        labels[enc["attention_mask"] == 0] = -100
        enc["labels"] = labels
        return dict(enc)

    return encode


_POSITIVE = ("good", "great", "fine", "superb", "moving", "fresh", "witty", "bright")
_NEGATIVE = ("bad", "dull", "awful", "stale", "flat", "tired", "weak", "bland")
_FILLER = ("the", "film", "plot", "cast", "story", "was", "quite", "a", "and", "very", "score")


def synthetic_sentiment(n: int, *, seed: int = 0) -> list[Example]:
    """Short generated snippets whose label is set by their sentiment words (for fast tests)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.randrange(2)
        words = [rng.choice(_FILLER) for _ in range(rng.randint(3, 8))]
        for _ in range(rng.randint(1, 2)):
            words.insert(rng.randrange(len(words) + 1), rng.choice(_POSITIVE if label else _NEGATIVE))
        out.append((" ".join(words), label))
    return out


class WordHashTokenizer:
    """A dependency-free tokenizer for tiny test models: words hashed into a fixed vocabulary.

    Callable like a Hugging Face tokenizer for the arguments the encoders above use.
    """

    pad_token: str | None = "[PAD]"
    eos_token = "[PAD]"

    def __init__(self, vocab_size: int = 128) -> None:
        self.vocab_size = vocab_size

    def _ids(self, text: str) -> list[int]:
        # 0 is padding, 1 a [CLS]-like start token; words map to 2..vocab_size-1 deterministically.
        return [1] + [2 + sum(map(ord, w)) * 7919 % (self.vocab_size - 2) for w in text.lower().split()]

    def __call__(
        self, texts: list[str], *, padding: bool, truncation: bool, max_length: int, return_tensors: str
    ) -> dict[str, Tensor]:
        del padding, return_tensors
        ids = [self._ids(t)[: max_length if truncation else None] for t in texts]
        width = max(len(i) for i in ids)
        input_ids = torch.tensor([i + [0] * (width - len(i)) for i in ids])
        return {"input_ids": input_ids, "attention_mask": (input_ids != 0).long()}
