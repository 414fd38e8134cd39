"""Shared fixtures: tiny real models (transformers configs + PEFT), no hub access."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
from hypothesis import settings
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

settings.register_profile("ci", deadline=None, max_examples=25, derandomize=True, print_blob=True)
settings.register_profile("dev", deadline=None, max_examples=50)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


class ConvNet(nn.Module):
    """A small model with every LoRA layer kind PEFT supports on plain modules."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.conv1 = nn.Conv1d(8, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv3 = nn.Conv3d(1, 2, (1, 3, 3), padding=(0, 1, 1))
        self.lin = nn.Linear(6 + 4 + 2, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)  # (n, t, 8)
        h1 = self.conv1(x.transpose(1, 2)).mean(-1)  # (n, 6)
        img = x.unsqueeze(1)  # (n, 1, t, 8)
        h2 = self.conv2(img).mean((-1, -2))  # (n, 4)
        h3 = self.conv3(img.unsqueeze(2).expand(-1, -1, 2, -1, -1)).mean((-1, -2, -3))  # (n, 2)
        return self.lin(torch.cat([h1, h2, h3], -1))


def make_convnet(
    *, use_dora: bool = False, use_rslora: bool = False, seed: int = 0, **kw: object
) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    kw.setdefault("target_modules", ["emb", "conv1", "conv2", "conv3", "lin"])
    kw.setdefault("init_lora_weights", "gaussian" if not kw.get("lora_bias") else True)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        use_dora=use_dora,
        use_rslora=use_rslora,
        **kw,  # type: ignore[arg-type]
    )
    return get_peft_model(ConvNet(), config)


def tiny_llama(*, seed: int = 0, r: int = 4, **kw: object) -> nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    base = LlamaForCausalLM(cfg)
    kw.setdefault("target_modules", ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
    kw.setdefault("lora_alpha", 2 * r)
    config = LoraConfig(r=r, task_type="CAUSAL_LM", **kw)  # type: ignore[arg-type]
    return get_peft_model(base, config)


def tiny_gpt2(*, seed: int = 0, **kw: object) -> nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=64,
        n_embd=16,
        n_layer=2,
        n_head=2,
        n_positions=32,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    base = GPT2LMHeadModel(cfg)
    kw.setdefault("target_modules", ["c_attn", "c_proj", "wte"])
    config = LoraConfig(r=4, lora_alpha=8, fan_in_fan_out=True, **kw)  # type: ignore[arg-type]
    return get_peft_model(base, config)


def tiny_bert_cls(*, seed: int = 0, modules_to_save: list[str] | None = None) -> nn.Module:
    """A 2-layer BERT sequence classifier with LoRA; PEFT's SEQ_CLS trains the fresh classifier in full."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32, num_labels=2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # type: ignore[call-arg]  # fmt: skip
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS",
        modules_to_save=modules_to_save,
    )  # fmt: skip
    return get_peft_model(BertForSequenceClassification(cfg), config)


def cls_batch(seed: int = 0, n: int = 4, t: int = 10) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, 64, (n, t), generator=gen),
        "labels": torch.randint(0, 2, (n,), generator=gen),
    }


def lm_batch(seed: int = 0, n: int = 4, t: int = 12, vocab: int = 64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, t), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def ids_batch(seed: int = 0, n: int = 3, t: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 20, (n, t), generator=g)


def randomize_lora_b(model: nn.Module, seed: int = 1) -> None:
    """Give B non-zero values so that rescaling is observable in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


@pytest.fixture
def llama() -> nn.Module:
    return tiny_llama()


@pytest.fixture
def convnet() -> nn.Module:
    return make_convnet()


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models: one thread is several times faster than two on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_accelerate_state() -> Iterator[None]:
    """Accelerate keeps process-wide singletons; give every test a clean slate."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
