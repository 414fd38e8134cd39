"""The third classification task (research.party): passages, the split by speech, and real steps."""

from __future__ import annotations

import math

import pytest

from alpha_tuner.demo.assets import missing_reason
from research.corpus import Speech
from research.party import (
    EVAL_PER_CLASS,
    HELD_OUT_FRACTION,
    LABELS,
    MIN_WORDS,
    PASSAGE_WORDS,
    load_passages,
    passages,
    split_speeches,
)


def _words(n: int, start: int = 0) -> str:
    return " ".join(f"w{i}" for i in range(start, start + n))


def test_passages_cut_every_whole_chunk_and_keep_a_long_enough_rest() -> None:
    text = _words(2 * PASSAGE_WORDS + MIN_WORDS)
    got = passages(text)
    assert [len(p.split()) for p in got] == [PASSAGE_WORDS, PASSAGE_WORDS, MIN_WORDS]
    assert " ".join(got) == text  # consecutive, nothing reordered or lost
    assert passages(_words(PASSAGE_WORDS + MIN_WORDS - 1)) == [_words(PASSAGE_WORDS)]
    assert passages("a  b\n\nc") == [] and passages(_words(MIN_WORDS)) == [_words(MIN_WORDS)]


def test_the_split_holds_out_a_fifth_of_each_party_by_whole_speeches() -> None:
    speeches = [Speech(LABELS[i % 3 == 0], f"speech {i}") for i in range(60)]
    train, held = split_speeches(speeches)
    assert sorted(train + held, key=speeches.index) == speeches and not set(train) & set(held)
    for party in LABELS:
        n = sum(s.party == party for s in speeches)
        assert sum(s.party == party for s in held) == round(HELD_OUT_FRACTION * n)
    assert split_speeches(speeches) == (train, held)  # drawn once: the same every time
    assert split_speeches(speeches, seed=1) != (train, held)


def test_an_unknown_party_is_named() -> None:
    with pytest.raises(ValueError, match="unknown party 'green'"):
        split_speeches([Speech("green", "text")])


def test_held_out_passages_are_balanced_and_from_held_out_speeches_only() -> None:
    # The Democrats give three times the text; the held-out set still takes as many of each.
    speeches = [Speech("democrat", _words(6 * PASSAGE_WORDS, 1000 * i)) for i in range(10)]
    speeches += [Speech("republican", _words(2 * PASSAGE_WORDS, 1000 * i)) for i in range(10, 20)]
    train, held = load_passages(speeches)
    counts = [sum(y == label for _, y in held) for label in range(len(LABELS))]
    assert counts == [4, 4]  # two held-out Republican speeches × two passages each
    assert not {t for t, _ in train} & {t for t, _ in held}
    assert len(train) == 8 * 6 + 8 * 2
    assert EVAL_PER_CLASS == 256  # the real corpus has more than that per party (below)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.skipif(missing_reason() is not None, reason="needs `bash scripts/setup_assets.sh`")
def test_the_party_task_trains_a_two_way_head_through_the_trainer() -> None:
    from research.lm_bench import LMRun, execute
    from research.tasks import fresh_model, task_data

    train, held = task_data("party", 32)
    assert len(train) > 2000 and len(held) == 2 * EVAL_PER_CLASS
    assert sorted(item["labels"] for item in held) == [0] * EVAL_PER_CLASS + [1] * EVAL_PER_CLASS
    assert fresh_model("party", 0).classifier.out_features == len(LABELS)
    record = execute(LMRun("steps", 4, 1e-4, seed=0, steps=3, model="party", batch_size=4, block=32))
    assert record["key"].startswith("party|steps|r=4|")
    assert math.isfinite(record["eval_loss"]) and record["lora_b_norm"] > 0
