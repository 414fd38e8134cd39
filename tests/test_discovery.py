"""Discovery of LoRA targets on real PEFT models of every supported layer kind."""

from __future__ import annotations

import pytest
import torch
from conftest import make_convnet, tiny_gpt2, tiny_llama
from peft import LoraConfig, get_peft_model
from torch import nn

from alpha_tuner import find_lora_targets


def test_every_layer_kind_is_found() -> None:
    targets = find_lora_targets(make_convnet())
    kinds = {t.module_name.rsplit(".", 1)[-1]: t.kind for t in targets}
    assert kinds == {"emb": "embedding", "conv1": "conv", "conv2": "conv", "conv3": "conv", "lin": "linear"}
    for t in targets:
        assert t.rank == 4 and t.adapter == "default" and not t.use_rslora
        assert t.config_key == t.module_name.removeprefix("base_model.model.")
        assert t.scaling == pytest.approx(8 / 4)


def test_gpt2_conv1d_and_embedding() -> None:
    targets = find_lora_targets(tiny_gpt2())
    assert len(targets) == 2 * 3 + 1  # c_attn, attn.c_proj, mlp.c_proj per block, wte
    emb = [t for t in targets if t.kind == "embedding"]
    assert len(emb) == 1 and emb[0].weight_a.shape == (4, 64) and emb[0].weight_b.shape == (16, 4)
    lin = [t for t in targets if t.module_name.endswith("c_attn")]
    assert lin[0].weight_a.shape == (4, 16) and lin[0].weight_b.shape == (48, 4)


def test_rslora_rank_pattern_and_dora() -> None:
    model = tiny_llama(
        use_rslora=True, use_dora=True, rank_pattern={"q_proj": 8}, alpha_pattern={"v_proj": 3}
    )
    targets = {t.module_name.rsplit(".", 1)[-1]: t for t in find_lora_targets(model)}
    assert targets["q_proj"].rank == 8 and targets["k_proj"].rank == 4
    assert all(t.use_rslora for t in targets.values())
    assert targets["q_proj"].scaling == pytest.approx(8 / 8**0.5)
    assert targets["v_proj"].alpha == 3 and targets["v_proj"].scaling == pytest.approx(3 / 2)


def test_lora_bias_is_part_of_the_target() -> None:
    targets = find_lora_targets(tiny_llama(target_modules=["q_proj"], lora_bias=True))
    assert targets and all(t.bias_b is not None for t in targets)
    assert all(len(t.factor_params()) == 2 for t in targets)


def test_only_trainable_adapters_are_targets() -> None:
    model = tiny_llama(target_modules=["q_proj", "v_proj"])
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"]))
    # add_adapter leaves the new adapter frozen and inactive
    assert {t.adapter for t in find_lora_targets(model)} == {"default"}
    for name, p in model.named_parameters():
        if ".other." in name:
            p.requires_grad_(True)
    targets = find_lora_targets(model)
    assert {t.adapter for t in targets} == {"default", "other"}
    assert len({t.key for t in targets}) == len(targets)


@pytest.mark.parametrize(
    ("model", "error", "match"),
    [
        (object(), TypeError, "torch.nn.Module"),
        (nn.Linear(3, 3), ValueError, "no PEFT LoRA layers"),
    ],
)
def test_errors(model: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        find_lora_targets(model)  # type: ignore[arg-type]


def test_frozen_adapter_error_names_the_fix() -> None:
    model = get_peft_model(nn.Sequential(nn.Linear(3, 3)), LoraConfig(r=2, target_modules=["0"]))
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="is_trainable=True"):
        find_lora_targets(model)
    assert torch.is_tensor(next(model.parameters()))
