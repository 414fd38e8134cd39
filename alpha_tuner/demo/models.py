"""Base models and the LoRA set-up of every method the experiments compare.

Methods (all train the LoRA factors plus the same classification head, with AdamW at one base
learning rate and weight decay 0; AlphaTuned raises the head's rate to ``HEAD_LR`` when the base
rate is lower):

* ``lora``: vanilla LoRA, α = 2r unless an explicit α is given (the sweep's grid cells);
* ``rslora``: PEFT ``use_rslora=True`` with α = 16 (its common default: s = 16/√r);
* ``loraplus``: α = 2r and PEFT's ``create_loraplus_optimizer`` with B's learning rate ×16;
* ``alphatuned``: :class:`~alpha_tuner.AlphaTunedOptimizer` with its defaults (principled α,
  online adaptation, the head's learning rate lifted to at least ``HEAD_LR``);
* ``alphatuned-static``: the same with ``adapt=False`` (principled α only).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from . import assets

__all__ = [
    "METHODS",
    "BaseModel",
    "ModelSpec",
    "attach_lora",
    "build_optimizer",
    "default_alpha",
    "load_base",
]

METHODS = ("lora", "rslora", "loraplus", "alphatuned", "alphatuned-static")
RSLORA_ALPHA = 16.0
LORAPLUS_RATIO = 16.0
_BERT_TARGETS = (
    r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
    r"|intermediate\.dense|output\.dense)"
)


@dataclass(frozen=True)
class ModelSpec:
    """What to adapt in a model family and how its task is scored."""

    name: str
    task: Literal["classification", "causal_lm"]
    target_modules: str | tuple[str, ...]
    modules_to_save: tuple[str, ...] = ()
    max_length: int = 64


SPECS = {
    "minilm": ModelSpec("minilm", "classification", _BERT_TARGETS, ("classifier", "pooler")),
    "smollm2": ModelSpec(
        "smollm2",
        "causal_lm",
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    ),
    "tiny": ModelSpec("tiny", "classification", _BERT_TARGETS, ("classifier", "pooler"), max_length=16),
}


@dataclass
class BaseModel:
    """A loaded base model with its tokenizer; :meth:`fresh` gives an independent copy."""

    spec: ModelSpec
    model: nn.Module
    tokenizer: Any
    source: str
    meta: dict[str, Any] = field(default_factory=dict)

    def fresh(self, seed: int) -> nn.Module:
        """A deep copy whose task head is re-initialised from ``seed`` (LM heads are kept)."""
        model = copy.deepcopy(self.model)
        head = getattr(model, "classifier", None)
        if isinstance(head, nn.Linear):
            gen = torch.Generator().manual_seed(seed)
            std = float(getattr(model.config, "initializer_range", 0.02))
            with torch.no_grad():
                head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * std)
                head.bias.zero_()
        return model


def load_base(name: str) -> BaseModel:
    """Load ``minilm``, ``smollm2`` or ``tiny`` (a random 2-layer BERT for tests, no assets).

    Raises:
        ValueError: For an unknown name.
        alpha_tuner.demo.assets.AssetMissingError: If the model is not installed.
    """
    if name not in SPECS:
        raise ValueError(f"Unknown model {name!r}; choose one of {sorted(SPECS)}.")
    spec = SPECS[name]
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the "newly initialised classifier" report is expected
    if name == "tiny":
        from .data import WordHashTokenizer

        torch.manual_seed(0)
        config = BertConfig(
            vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=32, num_labels=2,
        )  # type: ignore[call-arg]  # fmt: skip
        return BaseModel(spec, BertForSequenceClassification(config), WordHashTokenizer(128), "tiny-bert")
    path = assets.minilm_path() if name == "minilm" else assets.smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if spec.task == "classification":
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    else:
        model = AutoModelForCausalLM.from_pretrained(path)
    return BaseModel(spec, model, tokenizer, str(path))


def default_alpha(method: str, rank: int) -> float:
    """The α a method starts from (AlphaTuned overwrites it with its principled α)."""
    return RSLORA_ALPHA if method == "rslora" else 2.0 * rank


def attach_lora(base: BaseModel, method: str, rank: int, *, alpha: float | None, seed: int) -> nn.Module:
    """A fresh copy of ``base`` with one LoRA adapter for ``method`` (dropout 0, seeded init).

    Raises:
        ValueError: For an unknown method.
    """
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {METHODS}.")
    from peft import LoraConfig, get_peft_model

    model = base.fresh(seed)
    spec = base.spec
    targets = spec.target_modules if isinstance(spec.target_modules, str) else list(spec.target_modules)
    config = LoraConfig(
        r=rank,
        lora_alpha=default_alpha(method, rank) if alpha is None else alpha,  # type: ignore[arg-type]
        lora_dropout=0.0,
        use_rslora=method == "rslora",
        target_modules=targets,
        modules_to_save=list(spec.modules_to_save) or None,
        task_type="SEQ_CLS" if spec.task == "classification" else "CAUSAL_LM",
    )
    torch.manual_seed(seed)  # LoRA's A initialisation
    return get_peft_model(model, config)


def build_optimizer(
    model: nn.Module,
    method: str,
    lr: float,
    *,
    measure_every: int = 10,
    measure: bool = True,
    tuner_options: dict[str, Any] | None = None,
) -> tuple[torch.optim.Optimizer, Any]:
    """The optimizer of ``method`` and, when measuring, the AlphaTuned wrapper that reads ρ.

    Peers are wrapped with ``init="keep", adapt=False, head_lr=None``, which leaves their training unchanged
    and only measures the drift ratio, so every method reports ρ the same way.

    Args:
        model: The PEFT model.
        method: One of :data:`METHODS`.
        lr: The base learning rate.
        measure_every: Steps between drift measurements.
        measure: Measure ρ of the peers too.
        tuner_options: Extra options of the AlphaTuned wrapper (e.g. ``{"head_lr": None}``
            for an ablation); ignored by the peers.

    Returns:
        ``(optimizer, tuner)``: the optimizer to step and the wrapper (``None`` when not measuring
        a peer); for AlphaTuned methods they are the same object.
    """
    from alpha_tuner import AlphaTunedOptimizer

    params = [p for p in model.parameters() if p.requires_grad]
    if method == "loraplus":
        from peft.optimizers import create_loraplus_optimizer

        inner: torch.optim.Optimizer = create_loraplus_optimizer(
            model,  # type: ignore[arg-type]
            optimizer_cls=torch.optim.AdamW,
            lr=lr,
            loraplus_lr_ratio=LORAPLUS_RATIO,
            weight_decay=0.0,
        )
    else:
        inner = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if method.startswith("alphatuned"):
        # measure=True only adds telemetry to the static variant; it does not change its training.
        tuned = AlphaTunedOptimizer(
            inner,
            model,
            adapt=method == "alphatuned",
            measure=True,
            measure_every=measure_every,
            **(tuner_options or {}),
        )
        return tuned, tuned
    if not measure:
        return inner, None
    meter = AlphaTunedOptimizer(
        inner,
        model,
        init="keep",
        adapt=False,
        measure=True,
        measure_every=measure_every,
        head_lr=None,
        steps=None,
    )
    return meter, meter
