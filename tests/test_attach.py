"""alpha_tuner.attach: the same engine on an existing optimizer (step and state-dict hooks) or Trainer."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import lm_batch, tiny_llama
from test_trainer import EAGER, LR, assert_same_tensors, lora_params, losses, rows, trainer_args
from torch import nn
from transformers import Trainer

from alpha_tuner import AlphaTunedOptimizer, attach
from alpha_tuner.attach import attached_tuner
from alpha_tuner.integrations import AlphaTunerCallback, collect_metrics, find_alpha_tuned_optimizer

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, start: int = 0) -> None:
    for i in range(start, start + steps):
        model(**lm_batch(seed=i)).loss.backward()
        opt.step()
        opt.zero_grad()


def _save(sd: dict[str, Any]) -> dict[str, Any]:
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_attached_engine_matches_the_wrapper_step_for_step() -> None:
    ref_model, model = tiny_llama(), tiny_llama()
    ref = AlphaTunedOptimizer(torch.optim.AdamW(ref_model.parameters(), lr=LR), ref_model, **EAGER)
    inner = torch.optim.AdamW(model.parameters(), lr=LR)
    handle = attach(inner, model, **EAGER)
    assert attached_tuner(inner) is handle and find_alpha_tuned_optimizer(inner) is handle
    assert handle.alphas() == ref.alphas()  # the same principled α at attach time
    _train(ref_model, ref, 6)
    _train(model, inner, 6)
    assert handle.alphas() == ref.alphas()
    alpha0 = ref.engine.state.control.log_alpha0.exp().tolist()
    assert list(handle.alphas().values()) != pytest.approx(alpha0)  # α moved
    assert_same_tensors(lora_params(ref_model), lora_params(model))
    assert handle.diagnostics() == ref.diagnostics()
    assert collect_metrics(inner) == collect_metrics(ref)


def test_the_optimizers_state_dict_carries_and_restores_the_tuner() -> None:
    model = tiny_llama()
    inner = torch.optim.AdamW(model.parameters(), lr=LR)
    handle = attach(inner, model, **EAGER)
    _train(model, inner, 4)
    sd = _save(inner.state_dict())
    assert sd["alpha_tuner"]["steps"] == 4
    # Resume order: model, attach, adapter weights, then the optimizer state.
    resumed_model = tiny_llama()
    resumed = torch.optim.AdamW(resumed_model.parameters(), lr=LR)
    resumed_handle = attach(resumed, resumed_model, **EAGER)
    resumed_model.load_state_dict(model.state_dict())
    resumed.load_state_dict(sd)
    assert resumed_handle.alphas() == handle.alphas()
    assert resumed_handle.engine.state.steps == 4
    for key, value in handle.engine.state.control._asdict().items():
        assert torch.equal(value, getattr(resumed_handle.engine.state.control, key)), key
    _train(model, inner, 4, start=4)
    _train(resumed_model, resumed, 4, start=4)
    assert resumed_handle.alphas() == handle.alphas()
    assert_same_tensors(lora_params(model), lora_params(resumed_model))


def test_detach_removes_every_hook() -> None:
    model = tiny_llama()
    inner = torch.optim.AdamW(model.parameters(), lr=LR)
    handle = attach(inner, model, **EAGER)
    _train(model, inner, 2)
    handle.detach()
    alphas, steps = handle.alphas(), handle.engine.state.steps
    _train(model, inner, 4, start=2)
    assert handle.alphas() == alphas and handle.engine.state.steps == steps
    assert "alpha_tuner" not in inner.state_dict()
    assert attached_tuner(inner) is None
    attach(inner, model, init="keep")  # detached: may attach again


def test_attach_refuses_what_it_cannot_tune() -> None:
    model = tiny_llama()
    wrapped = AlphaTunedOptimizer(torch.optim.AdamW(model.parameters(), lr=LR), model)
    with pytest.raises(TypeError, match="AlphaTunedOptimizer already"):
        attach(wrapped, model)
    inner = torch.optim.AdamW(model.parameters(), lr=LR)
    with pytest.raises(TypeError, match="pass the PEFT model"):
        attach(inner)
    with pytest.raises(TypeError, match=r"takes a torch\.optim\.Optimizer or a transformers\.Trainer"):
        attach([p for p in model.parameters()], model)
    attach(inner, model, init="keep")
    with pytest.raises(TypeError, match="already attached"):
        attach(inner, model)
    with pytest.raises(ValueError, match="control_every"):
        attach(torch.optim.AdamW(model.parameters(), lr=LR), model, control_every=3)


def _trainer(out: Path, model: nn.Module, **overrides: Any) -> Trainer:
    args = trainer_args(out, learning_rate=LR, lr_scheduler_type="linear", warmup_steps=1, **overrides)
    return Trainer(model=model, args=args, train_dataset=rows(), callbacks=[AlphaTunerCallback()])


def test_attach_to_a_trainer_tunes_the_optimizer_it_builds(tmp_path: Path) -> None:
    """No optimizer in the recipe: attach(trainer) equals passing optimizers=(AlphaTunedOptimizer, None)."""
    model = tiny_llama()
    trainer = attach(_trainer(tmp_path / "attached", model, max_steps=6), **EAGER)
    trainer.train()
    handle = find_alpha_tuned_optimizer(trainer.optimizer)
    assert handle is not None and handle.engine.state.steps == 6
    assert any("alpha/mean" in r for r in trainer.state.log_history)  # the callback found it
    ref_model = tiny_llama()
    args = trainer_args(tmp_path / "ref", learning_rate=LR, lr_scheduler_type="linear", warmup_steps=1)
    args.max_steps = 6
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, ref_model)  # what the Trainer builds ...
    inner = cls(ref_model.parameters(), **kwargs, weight_decay=args.weight_decay)  # ... with its decay
    ref_opt = AlphaTunedOptimizer(inner, ref_model, **EAGER)
    ref = Trainer(model=ref_model, args=args, train_dataset=rows(), optimizers=(ref_opt, None))
    ref.train()
    assert handle.alphas() == ref_opt.alphas()
    assert losses(trainer) == losses(ref)
    assert_same_tensors(lora_params(ref_model), lora_params(model))
    with pytest.raises(TypeError, match="already called"):
        attach(trainer)


def test_attach_to_a_trainer_resumes_exactly(tmp_path: Path) -> None:
    full_model = tiny_llama()
    full = attach(_trainer(tmp_path / "full", full_model, max_steps=6, save_strategy="steps", save_steps=3),
                  **EAGER)  # fmt: skip
    full.train()
    model = tiny_llama()
    resumed = attach(_trainer(tmp_path / "resumed", model, max_steps=6, save_strategy="steps", save_steps=3),
                     **EAGER)  # fmt: skip
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    a, b = find_alpha_tuned_optimizer(full.optimizer), find_alpha_tuned_optimizer(resumed.optimizer)
    assert a is not None and b is not None
    assert b.alphas() == a.alphas()
    assert b.engine.state.steps == a.engine.state.steps == 6
    assert_same_tensors(lora_params(full_model), lora_params(model))
    assert losses(resumed) == losses(full)  # the checkpoint's log history, then the same steps


def test_the_factory_path_resumes_exactly(tmp_path: Path) -> None:
    """optimizer_cls_and_kwargs builds the tuner after a resume has loaded the trained adapter."""
    from alpha_tuner import create_alpha_tuned_optimizer

    def run(out: Path, resume: str | None) -> tuple[Trainer, nn.Module]:
        model = tiny_llama()
        args = trainer_args(out, learning_rate=LR, lr_scheduler_type="linear", warmup_steps=1, max_steps=6,
                            save_strategy="steps", save_steps=3)  # fmt: skip
        factory = (create_alpha_tuned_optimizer, {"optimizer_cls": torch.optim.AdamW, "lr": LR, **EAGER})
        trainer = Trainer(model=model, args=args, train_dataset=rows(), optimizer_cls_and_kwargs=factory)
        trainer.train(resume_from_checkpoint=resume)
        return trainer, model

    full, full_model = run(tmp_path / "full", None)
    resumed, model = run(tmp_path / "resumed", str(tmp_path / "full" / "checkpoint-3"))
    a, b = find_alpha_tuned_optimizer(full.optimizer), find_alpha_tuned_optimizer(resumed.optimizer)
    assert a is not None and b is not None and b.alphas() == a.alphas()
    # Exact: the resume puts back the loaded B that init had rescaled (without that the factors
    # are off by ~1e-4 after three steps).
    assert_same_tensors(lora_params(full_model), lora_params(model))
    assert losses(resumed) == losses(full)
