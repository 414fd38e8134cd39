"""Task heads: finding PEFT's fully trained modules and lifting their learning rate."""

from __future__ import annotations

import io

import pytest
import torch
from conftest import cls_batch, tiny_bert_cls, tiny_llama
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from alpha_tuner import HEAD_LR, AlphaTunedOptimizer, find_head_parameters
from alpha_tuner.heads import lift_head_lr_
from alpha_tuner.principled import principled_alpha


def _lr_of(optimizer: torch.optim.Optimizer) -> dict[int, float]:
    return {id(p): float(g["lr"]) for g in optimizer.param_groups for p in g["params"]}


def test_finds_the_classifier_of_a_seq_cls_model_and_nothing_of_lora() -> None:
    model = tiny_bert_cls()
    names = [n for n, _ in find_head_parameters(model)]
    assert names == [
        "base_model.model.classifier.modules_to_save.default.weight",
        "base_model.model.classifier.modules_to_save.default.bias",
    ]
    assert all(p.requires_grad for _, p in find_head_parameters(model))


def test_finds_every_listed_module_and_none_without_modules_to_save() -> None:
    model = tiny_bert_cls(modules_to_save=["pooler"])
    names = {n.split(".modules_to_save")[0] for n, _ in find_head_parameters(model)}
    assert names == {"base_model.model.classifier", "base_model.model.bert.pooler"}
    assert find_head_parameters(tiny_llama()) == []


def test_wrapper_lifts_the_head_and_leaves_lora_at_the_base_lr() -> None:
    model = tiny_bert_cls()
    inner = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01)
    opt = AlphaTunedOptimizer(inner, model, steps=None)  # the rule's lift: "at least head_lr"
    lrs = _lr_of(opt)
    heads = {id(p) for _, p in find_head_parameters(model)}
    assert opt.head_params_lifted == len(heads) == 2
    assert {lrs[i] for i in heads} == {HEAD_LR}
    assert {lr for i, lr in lrs.items() if i not in heads} == {2e-5}
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.01]
    # The principled α follows the LoRA factors' LR, not the head's.
    assert next(iter(opt.alphas().values())) == pytest.approx(principled_alpha(opt.targets[0].rank, 2e-5))


def test_head_lr_none_and_a_higher_base_lr_leave_the_groups_alone() -> None:
    for lr, head_lr in ((2e-5, None), (1e-3, HEAD_LR)):
        model = tiny_bert_cls()
        inner = torch.optim.AdamW(model.parameters(), lr=lr)
        opt = AlphaTunedOptimizer(inner, model, head_lr=head_lr, steps=None)  # the rule: "at least"
        assert opt.head_params_lifted == 0
        assert len(opt.param_groups) == 1 and opt.param_groups[0]["lr"] == lr


def test_lifted_training_equals_adamw_built_with_a_head_group() -> None:
    """With α kept and no adaptation, the wrapper is AdamW with the head in its own group."""
    torch.manual_seed(0)
    model_a, model_b = tiny_bert_cls(seed=3), tiny_bert_cls(seed=3)
    opt_a = AlphaTunedOptimizer(
        torch.optim.AdamW(model_a.parameters(), lr=1e-4), model_a, init="keep", adapt=False, head_lr=5e-3
    )
    heads_b = {id(p) for _, p in find_head_parameters(model_b)}
    opt_b = torch.optim.AdamW(
        [
            {"params": [p for p in model_b.parameters() if p.requires_grad and id(p) not in heads_b]},
            {"params": [p for p in model_b.parameters() if id(p) in heads_b], "lr": 5e-3},
        ],
        lr=1e-4,
    )
    for step in range(5):
        for model, opt in ((model_a, opt_a), (model_b, opt_b)):
            model(**cls_batch(step)).loss.backward()
            opt.step()
            opt.zero_grad()
    for (name, pa), pb in zip(model_a.named_parameters(), model_b.parameters(), strict=True):
        assert torch.equal(pa, pb), name


def test_state_dict_round_trip_after_the_split() -> None:
    model = tiny_bert_cls(seed=1)
    opt = AlphaTunedOptimizer(torch.optim.AdamW(model.parameters(), lr=2e-5), model)
    model(**cls_batch()).loss.backward()
    opt.step()
    opt.zero_grad()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)  # a checkpoint, as the Trainer writes it
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model2 = tiny_bert_cls(seed=1)
    model2.load_state_dict(model.state_dict())
    opt2 = AlphaTunedOptimizer(torch.optim.AdamW(model2.parameters(), lr=2e-5), model2, init="keep")
    opt2.load_state_dict(saved)
    assert [g["lr"] for g in opt2.param_groups] == [2e-5, HEAD_LR]
    for model_, opt_ in ((model, opt), (model2, opt2)):
        model_(**cls_batch(1)).loss.backward()
        opt_.step()
    for (name, p1), p2 in zip(model.named_parameters(), model2.parameters(), strict=True):
        assert torch.equal(p1, p2), name


def test_a_scheduler_attached_first_is_an_error_that_says_the_fix() -> None:
    model = tiny_bert_cls()
    inner = torch.optim.AdamW(model.parameters(), lr=2e-5)
    torch.optim.lr_scheduler.LambdaLR(inner, lambda _: 1.0)
    with pytest.raises(ValueError, match="before creating the scheduler"):
        AlphaTunedOptimizer(inner, model)
    # Without the lift there is nothing for the scheduler to miss.
    AlphaTunedOptimizer(inner, model, head_lr=None)


@pytest.mark.parametrize("bad", [0.0, -1e-4, float("nan"), float("inf"), "1e-4"])
def test_invalid_head_lr_is_rejected(bad: object) -> None:
    model = tiny_bert_cls()
    with pytest.raises(ValueError, match="head_lr must be a finite number > 0"):
        AlphaTunedOptimizer(torch.optim.AdamW(model.parameters(), lr=2e-5), model, head_lr=bad)  # type: ignore[arg-type]


@given(
    sizes=st.lists(st.integers(1, 4), min_size=1, max_size=4),
    lrs=st.lists(st.sampled_from([1e-5, 1e-4, 1e-3]), min_size=4, max_size=4),
    picks=st.lists(st.booleans(), min_size=16, max_size=16),
    min_lr=st.sampled_from([5e-5, 5e-4]),
)
def test_lift_invariants(sizes: list[int], lrs: list[float], picks: list[bool], min_lr: float) -> None:
    """Every lifted parameter ends at ≥ min_lr, the others keep their LR, none is lost or doubled."""
    groups, params = [], []
    for i, n in enumerate(sizes):
        ps = [nn.Parameter(torch.zeros(2)) for _ in range(n)]
        params += ps
        groups.append({"params": ps, "lr": lrs[i], "betas": (0.8, 0.9 + 0.01 * i)})
    opt = torch.optim.AdamW(groups, lr=1.0)
    before = _lr_of(opt)
    betas = {id(p): g["betas"] for g in opt.param_groups for p in g["params"]}
    chosen = [p for p, pick in zip(params, picks, strict=False) if pick]
    lifted = lift_head_lr_(opt, chosen, min_lr)
    after = _lr_of(opt)
    held = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(held) == sorted(id(p) for p in params)  # each parameter exactly once
    assert all(g["params"] for g in opt.param_groups)
    for p in params:
        if any(p is c for c in chosen):
            assert after[id(p)] == max(before[id(p)], min_lr)
        else:
            assert after[id(p)] == before[id(p)]
        assert {id(p): g["betas"] for g in opt.param_groups for p in g["params"]}[id(p)] == betas[id(p)]
    assert lifted == sum(1 for c in chosen if before[id(c)] < min_lr)
    assert lift_head_lr_(opt, chosen, min_lr) == 0  # idempotent
