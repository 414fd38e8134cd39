"""The Hugging Face paths: Trainer (optimizers= and factory), GradScaler, Accelerate, TRL, resume."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import lm_batch, tiny_llama
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import Trainer, TrainingArguments

from alpha_tuner import AlphaTunedOptimizer, ControlConfig, create_alpha_tuned_optimizer, principled_alpha
from alpha_tuner.integrations import AlphaTunerCallback, find_alpha_tuned_optimizer, history_from_log_history

LR = 1e-3
#: A controller that backs off at every control step (ρ is always above a 1e-9 ceiling) from the
#: first measurement on, so that α changes within a few steps.
EAGER_CONTROL = ControlConfig(rho_max=1e-9, min_factor=1e-3, warmup=1)
EAGER = {"measure_every": 1, "measure_phases": 2, "control_every": 2, "control": EAGER_CONTROL}


def rows(n: int = 16, t: int = 12, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """A tiny in-memory causal-LM dataset: a plain list of dicts."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 64, (t,), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def trainer_args(out: Path, **overrides: Any) -> TrainingArguments:
    kw: dict[str, Any] = {
        "output_dir": str(out),
        "max_steps": 4,
        "per_device_train_batch_size": 2,
        "logging_steps": 1,
        "save_strategy": "no",
        "use_cpu": True,
        "report_to": [],
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": 0,
    }
    kw.update(overrides)
    return TrainingArguments(**kw)


def lora_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def losses(trainer: Trainer) -> list[float]:
    return [r["loss"] for r in trainer.state.log_history if "loss" in r]


def wrap(model: nn.Module, **options: Any) -> AlphaTunedOptimizer:
    return AlphaTunedOptimizer(torch.optim.AdamW(model.parameters(), lr=LR), model, **options)


pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")


# ------------------------------------------------------------------------ Trainer, optimizers=
def test_trainer_with_tuning_off_equals_bare_adamw(tmp_path: Path) -> None:
    """Scheduler with warmup, gradient accumulation and clipping act on the wrapper as on AdamW."""
    common = {
        "lr_scheduler_type": "linear",
        "warmup_steps": 2,
        "gradient_accumulation_steps": 2,
        "max_grad_norm": 0.05,
    }
    results = []
    for tuned in (False, True):
        model = tiny_llama()
        inner = torch.optim.AdamW(model.parameters(), lr=LR)
        opt = (
            AlphaTunedOptimizer(
                inner, model, init="keep", adapt=False, measure=True, measure_every=1, measure_phases=1
            )
            if tuned
            else inner
        )
        trainer = Trainer(
            model=model,
            args=trainer_args(tmp_path / str(tuned), **common),
            train_dataset=rows(),
            optimizers=(opt, None),
        )
        trainer.train()
        results.append((lora_params(model), losses(trainer), trainer))
    (bare, bare_losses, bare_trainer), (wrapped, wrapped_losses, trainer) = results
    assert_same_tensors(bare, wrapped)
    assert bare_losses == wrapped_losses and len(wrapped_losses) == 4
    # Clipping was active (the norm before clipping exceeds max_grad_norm).
    assert max(r["grad_norm"] for r in trainer.state.log_history if "grad_norm" in r) > 0.05
    opt = find_alpha_tuned_optimizer(trainer.optimizer)
    assert opt is not None
    # One wrapper step per optimizer step, not per micro-batch; one measurement of 12 layers each,
    # except the first step, whose warm-up learning rate of 0 leaves the factors unchanged: its
    # 12 layers are skipped rather than read as rho = 0.
    diag = opt.diagnostics()
    assert diag["steps"] == trainer.state.global_step == 4
    assert diag["measurements"] == 12 * 3
    assert diag["skipped"] == 12
    # The scheduler wrote its learning rate into the shared param groups.
    assert opt.param_groups is opt.optimizer.param_groups
    assert opt.param_groups[0]["lr"] == pytest.approx(trainer.lr_scheduler.get_last_lr()[0])
    assert bare_trainer.lr_scheduler.get_last_lr() == trainer.lr_scheduler.get_last_lr()


def test_trainer_adapts_alpha_under_cosine_schedule_and_accumulation(tmp_path: Path) -> None:
    model = tiny_llama()
    opt = wrap(model, **EAGER)
    alpha0 = opt.alphas()
    trainer = Trainer(
        model=model,
        args=trainer_args(
            tmp_path,
            max_steps=4,
            lr_scheduler_type="cosine",
            warmup_steps=1,
            gradient_accumulation_steps=2,
            max_grad_norm=1.0,
        ),
        train_dataset=rows(),
        optimizers=(opt, None),
    )
    trainer.train()
    alphas = opt.alphas()
    assert all(alphas[k] < alpha0[k] for k in alpha0), "the eager controller backs off every control step"
    assert all(math.isfinite(v) for v in losses(trainer))
    assert all(torch.isfinite(p).all() for p in lora_params(model).values())
    # Cosine decays to 0 at the last step; the wrapper's groups carry the scheduler's lr.
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)
    assert opt.param_groups[0]["lr"] == trainer.lr_scheduler.get_last_lr()[0]
    assert opt.diagnostics()["steps"] == 4


def test_trainer_bf16_autocast_on_cpu(tmp_path: Path) -> None:
    model = tiny_llama()
    opt = wrap(model, **EAGER)
    alpha0 = opt.alphas()
    seen: set[torch.dtype] = set()
    lora_a = next(m for n, m in model.named_modules() if n.endswith("q_proj.lora_A.default"))
    lora_a.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
    trainer = Trainer(
        model=model,
        args=trainer_args(tmp_path, bf16=True, max_steps=3),
        train_dataset=rows(),
        optimizers=(opt, None),
    )
    trainer.train()
    assert seen == {torch.bfloat16}, "the forward ran under bf16 autocast"
    params = lora_params(model)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in params.values())
    assert opt.alphas() != alpha0
    assert all(math.isfinite(v) for v in losses(trainer))


# ----------------------------------------------------------------- Trainer, factory path
def test_trainer_factory_path_builds_the_wrapper_inside_the_trainer(tmp_path: Path) -> None:
    model = tiny_llama()
    callback = AlphaTunerCallback()
    trainer = Trainer(
        model=model,
        args=trainer_args(tmp_path, max_steps=2),
        train_dataset=rows(),
        optimizer_cls_and_kwargs=(
            create_alpha_tuned_optimizer,
            {
                "optimizer_cls": torch.optim.AdamW,
                "lr": LR,
                "weight_decay": 0.0,
                "measure_every": 1,
                "steps": None,
            },  # the rule, whose α the test can predict
        ),
        callbacks=[callback],
    )
    trainer.train()
    opt = find_alpha_tuned_optimizer(trainer.optimizer)
    assert isinstance(opt, AlphaTunedOptimizer)
    assert trainer.optimizer is not opt  # the Trainer wrapped it (Accelerate)
    assert opt.param_groups[0]["weight_decay"] == 0.0
    assert opt.measure_every == 1
    expected = principled_alpha(4, LR)
    assert all(a == pytest.approx(expected) for a in opt.alphas().values())
    assert [e["step"] for e in callback.history] == [1.0, 2.0]
    assert "rho/mean" in callback.history[-1]


# ------------------------------------------------------------------------- GradScaler
def test_gradscaler_skipped_step_leaves_alpha_factors_and_state_untouched() -> None:
    model = tiny_llama()
    # A control step after every step: had the skipped step reached the wrapper, α would move.
    opt = wrap(model, measure_every=1, measure_phases=1, control_every=1, control=EAGER_CONTROL)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)

    def step(seed: int, poison: bool = False) -> None:
        scaler.scale(model(**lm_batch(seed=seed)).loss).backward()
        if poison:
            param = next(p for n, p in model.named_parameters() if "lora_B" in n)
            param.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()

    step(0)
    before = (lora_params(model), opt.alphas(), opt.diagnostics(), scaler.get_scale())
    state = {k: {n: v.clone() for n, v in s.items()} for k, s in opt.optimizer.state.items()}
    step(1, poison=True)
    assert_same_tensors(before[0], lora_params(model))
    assert opt.alphas() == before[1]
    assert opt.diagnostics() == before[2]
    assert scaler.get_scale() == before[3] / 2  # the scaler saw the inf and skipped the step
    for param, entries in state.items():
        for key, value in entries.items():
            assert torch.equal(opt.optimizer.state[param][key], value), key
    # The next finite step goes through the wrapper: measured, controlled, α backed off.
    step(2)
    assert opt.diagnostics()["steps"] == before[2]["steps"] + 1
    assert all(a < before[1][k] for k, a in opt.alphas().items())


# -------------------------------------------------------------------------- Accelerate
def test_accelerate_prepare_is_harmless_and_matches_the_plain_loop() -> None:
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    data = rows(n=8)
    micro = 2

    def plain() -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        model = tiny_llama()
        opt = wrap(model, **EAGER)
        loader = torch.utils.data.DataLoader(data, batch_size=2)
        for i, batch in enumerate(loader):
            (model(**batch).loss / micro).backward()
            if (i + 1) % micro == 0:
                opt.step()
                opt.zero_grad()
        return lora_params(model), opt.alphas()

    def accelerated() -> tuple[dict[str, torch.Tensor], dict[str, float], AlphaTunedOptimizer]:
        model = tiny_llama()
        opt = wrap(model, **EAGER)
        alphas, control = opt.alphas(), opt.state_dict()["alpha_tuner"]["control"]
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=micro)
        loader = torch.utils.data.DataLoader(data, batch_size=2)
        model, prepared, loader = accelerator.prepare(model, opt, loader)
        assert isinstance(prepared, AcceleratedOptimizer) and prepared.optimizer is opt
        # prepare() did save -> move -> load: α and the controller are as they were.
        assert opt.alphas() == alphas
        after = opt.state_dict()["alpha_tuner"]["control"]
        assert all(torch.equal(after[k], v) for k, v in control.items())
        for batch in loader:
            with accelerator.accumulate(model):
                accelerator.backward(model(**batch).loss)
                prepared.step()
                prepared.zero_grad()
        return lora_params(model), opt.alphas(), opt

    ref_params, ref_alphas = plain()
    params, alphas, opt = accelerated()
    assert opt.diagnostics()["steps"] == 2
    assert all(a < principled_alpha(4, LR) for a in alphas.values()), "α moved during the run"
    assert alphas == ref_alphas
    assert_same_tensors(ref_params, params)


# ------------------------------------------------------------------------------ resume
def _resume_run(out: Path, resume: str | None) -> tuple[Trainer, nn.Module, AlphaTunedOptimizer]:
    model = tiny_llama()
    opt = wrap(model, **{**EAGER, "measure_phases": 1})  # every layer measured at every step
    trainer = Trainer(
        model=model,
        args=trainer_args(
            out,
            max_steps=6,
            save_strategy="steps",
            save_steps=3,
            gradient_accumulation_steps=2,
            lr_scheduler_type="linear",
            warmup_steps=1,
        ),
        train_dataset=rows(),
        optimizers=(opt, None),
        callbacks=[AlphaTunerCallback()],
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, model, opt


def test_resume_from_checkpoint_is_exact_and_the_adapter_loads_standalone(tmp_path: Path) -> None:
    full, full_model, full_opt = _resume_run(tmp_path / "full", None)
    middle = tmp_path / "full" / "checkpoint-3"
    saved = torch.load(middle / "optimizer.pt", weights_only=True)["alpha_tuner"]
    resumed, model, opt = _resume_run(tmp_path / "resumed", str(middle))

    # α moved before the checkpoint and again after it, so the resume really carries it.
    alpha0 = principled_alpha(4, LR)
    assert all(a < alpha0 for a in saved["alpha"])
    assert all(a < b for a, b in zip(opt.alphas().values(), saved["alpha"], strict=True))

    assert opt.alphas() == full_opt.alphas()
    assert_same_tensors(lora_params(full_model), lora_params(model))
    sd_full, sd = full_opt.state_dict(), opt.state_dict()
    assert sd_full["alpha_tuner"]["steps"] == sd["alpha_tuner"]["steps"] == 6
    for key, value in sd_full["alpha_tuner"]["control"].items():
        assert torch.equal(value, sd["alpha_tuner"]["control"][key]), key
    assert sd_full["state"].keys() == sd["state"].keys()
    for index, entries in sd_full["state"].items():
        for key, value in entries.items():
            assert torch.equal(value, sd["state"][index][key]), (index, key)
    assert losses(resumed) == losses(full)
    # The telemetry in the checkpointed log history survives the resume, identical.
    assert history_from_log_history(resumed.state.log_history) == history_from_log_history(
        full.state.log_history
    )

    # The final checkpoint's adapter folder alone rebuilds the tuned model.
    base = tiny_llama().unload()
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "full" / "checkpoint-6")).eval()
    full_model.eval()
    ids = rows(n=2, seed=5)[0]["input_ids"][None]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, full_model(input_ids=ids).logits)
    tuned = {n: m.scaling["default"] for n, m in full_model.named_modules() if isinstance(m, LoraLayer)}
    again = {n: m.scaling["default"] for n, m in loaded.named_modules() if isinstance(m, LoraLayer)}
    assert tuned == again


# ---------------------------------------------------------------------------------- TRL
def _word_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(62)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


@pytest.mark.parametrize("path", ["peft_model_and_optimizers", "peft_config_and_factory"])
def test_trl_sft_trainer(tmp_path: Path, path: str) -> None:
    """SFTTrainer with a PEFT model and ``optimizers=``, or with ``peft_config=`` and the factory."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from peft import LoraConfig

    g = torch.Generator().manual_seed(0)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(0, 62, (10,), generator=g)) for _ in range(8)]
    callback = AlphaTunerCallback()
    config = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        bf16=False,  # SFTConfig defaults to bf16
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        gradient_checkpointing=False,
        max_length=16,
    )
    common = {
        "args": config,
        "train_dataset": datasets.Dataset.from_dict({"text": texts}),
        "processing_class": _word_tokenizer(),
        "callbacks": [callback],
    }
    if path == "peft_model_and_optimizers":
        model = tiny_llama()
        opt = wrap(model, **EAGER)
        trainer = trl.SFTTrainer(model=model, optimizers=(opt, None), **common)
    else:
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        factory = {"optimizer_cls": torch.optim.AdamW, "lr": LR, **EAGER}
        trainer = trl.SFTTrainer(
            model=tiny_llama().unload(),
            peft_config=lora,
            optimizer_cls_and_kwargs=(create_alpha_tuned_optimizer, factory),
            **common,
        )
    trainer.train()
    tuned = find_alpha_tuned_optimizer(trainer.optimizer)
    assert isinstance(tuned, AlphaTunedOptimizer)
    assert tuned.diagnostics()["steps"] == 2
    assert all(a < principled_alpha(4, LR) for a in tuned.alphas().values())
    assert [e["step"] for e in callback.history] == [1.0, 2.0]


def test_trainer_schedules_the_lifted_head_lr(tmp_path: Path) -> None:
    """A sequence classifier: the Trainer's scheduler is built after the wrapper split the head off."""
    from conftest import tiny_bert_cls

    from alpha_tuner import HEAD_LR, find_head_parameters

    model = tiny_bert_cls()
    opt = AlphaTunedOptimizer(torch.optim.AdamW(model.parameters(), lr=2e-5), model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (8, 10), generator=g)
    data = [{"input_ids": ids[i], "labels": torch.tensor(i % 2)} for i in range(8)]
    head_before = {n: p.detach().clone() for n, p in find_head_parameters(model)}
    trainer = Trainer(
        model=model,
        args=trainer_args(tmp_path, lr_scheduler_type="constant_with_warmup", warmup_steps=2),
        train_dataset=data,
        optimizers=(opt, None),
    )
    trainer.train()
    assert trainer.lr_scheduler.base_lrs == [2e-5, HEAD_LR]  # type: ignore[union-attr]
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2e-5, HEAD_LR])  # after the warm-up
    assert any(not torch.equal(p, head_before[n]) for n, p in find_head_parameters(model))
