"""Find the trainable LoRA layers of a PEFT model.

A *target* is one (module, adapter) pair whose LoRA factors A and B are both trainable.
It records everything the rest of the library needs: the factors as live parameters, the
rank, the scaling convention (``alpha / r`` or ``alpha / sqrt(r)`` for rsLoRA), and the key
under which the adapter config of a saved model stores per-module values.

Supported PEFT layer kinds: ``Linear`` (including transformers ``Conv1D`` with
``fan_in_fan_out``), ``Embedding`` (``lora_embedding_A/B``), ``Conv1d/2d/3d`` and DoRA
variants of these. Only the product ``s·B·A`` enters the model's function for all of them,
which is what makes the rescale in :mod:`alpha_tuner.rescale` function-preserving.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["LoraTarget", "find_lora_targets", "lora_layer_types"]


def lora_layer_types() -> tuple[type, ...]:
    """Return the PEFT base class of LoRA layers (imported lazily)."""
    from peft.tuners.lora import LoraLayer

    return (LoraLayer,)


@dataclass(frozen=True, eq=False)
class LoraTarget:
    """One trainable LoRA adapter of one module.

    Attributes:
        module_name: Name of the LoRA layer in ``model.named_modules()``.
        adapter: PEFT adapter name (``"default"`` unless several adapters exist).
        key: Stable identifier ``"{module_name}::{adapter}"`` used in state dicts.
        config_key: Name of the module relative to the PEFT base model, as matched by
            ``LoraConfig.alpha_pattern`` (``None`` for models that are not ``PeftModel``).
        layer: The PEFT ``LoraLayer`` itself.
        kind: ``"linear"``, ``"embedding"`` or ``"conv"``.
        rank: The rank r of this adapter.
        use_rslora: Whether the scaling is ``alpha / sqrt(r)`` instead of ``alpha / r``.
        has_bias: Whether B has a trainable bias (``lora_bias=True``); it is multiplied by
            the scaling like B, so it is rescaled with B.
    """

    module_name: str
    adapter: str
    key: str
    config_key: str | None
    layer: Any = field(repr=False)
    kind: str
    rank: int
    use_rslora: bool
    has_bias: bool = False

    # The factors are looked up in the layer at each use rather than stored: FSDP2 (through
    # Accelerate) replaces parameter objects after the optimizer is built, and the tuner must
    # act on the live ones.
    @property
    def weight_a(self) -> nn.Parameter:
        """The A factor parameter (``r × k``, or ``r × in × kernel`` for convs)."""
        if self.kind == "embedding":
            return self.layer.lora_embedding_A[self.adapter]
        return self.layer.lora_A[self.adapter].weight

    @property
    def weight_b(self) -> nn.Parameter:
        """The B factor parameter (``d × r``, or ``out × r × 1…`` for convs)."""
        if self.kind == "embedding":
            return self.layer.lora_embedding_B[self.adapter]
        return self.layer.lora_B[self.adapter].weight

    @property
    def bias_b(self) -> nn.Parameter | None:
        """B's bias when the adapter has ``lora_bias=True`` (scaled by ``s`` like B)."""
        return self.layer.lora_B[self.adapter].bias if self.has_bias else None

    @property
    def divisor(self) -> float:
        """The denominator of PEFT's scaling: ``r`` or ``sqrt(r)`` (rsLoRA)."""
        return math.sqrt(self.rank) if self.use_rslora else float(self.rank)

    @property
    def scaling(self) -> float:
        """The current multiplier ``s`` that PEFT applies to ``B·A``."""
        return float(self.layer.scaling[self.adapter])

    @property
    def alpha(self) -> float:
        """The current α in the model's own convention (``s·r`` or ``s·sqrt(r)``)."""
        return float(self.layer.lora_alpha[self.adapter])

    def factor_slots(self) -> tuple[tuple[nn.Module, str], tuple[nn.Module, str]]:
        """Where A and B live: ``(module, name)`` with the factor in ``module._parameters[name]``.

        Reading a factor's identity there is a dict lookup, where :attr:`weight_a` walks PEFT's
        module dicts; FSDP2 replaces the parameter in that slot, so the slot shows it.
        """
        if self.kind == "embedding":
            return (self.layer.lora_embedding_A, self.adapter), (self.layer.lora_embedding_B, self.adapter)
        return (self.layer.lora_A[self.adapter], "weight"), (self.layer.lora_B[self.adapter], "weight")

    def factor_params(self) -> list[nn.Parameter]:
        """The parameters whose values carry the scale of ``B`` (B and its bias)."""
        return [self.weight_b] if self.bias_b is None else [self.weight_b, self.bias_b]


def _adapter_factors(
    layer: Any, adapter: str
) -> tuple[str, nn.Parameter, nn.Parameter, nn.Parameter | None] | None:
    lora_a = layer.lora_A
    lora_b = layer.lora_B
    if adapter in lora_a and adapter in lora_b:
        mod_a, mod_b = lora_a[adapter], lora_b[adapter]
        kind = "conv" if isinstance(mod_a, nn.modules.conv._ConvNd) else "linear"
        bias = getattr(mod_b, "bias", None)
        return kind, mod_a.weight, mod_b.weight, bias
    emb_a = layer.lora_embedding_A
    emb_b = layer.lora_embedding_B
    if adapter in emb_a and adapter in emb_b:
        return "embedding", emb_a[adapter], emb_b[adapter], None
    return None


def _base_prefix(model: nn.Module) -> str | None:
    """The prefix that turns a module name into the key PEFT's ``alpha_pattern`` matches."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return "base_model.model."
    return None


def _adapter_names(layer: Any) -> Iterable[str]:
    names = list(layer.lora_A.keys()) + list(layer.lora_embedding_A.keys())
    return sorted(set(names))


def find_lora_targets(model: nn.Module) -> list[LoraTarget]:
    """Find every LoRA adapter of ``model`` whose A and B factors are both trainable.

    Adapters whose factors are frozen (``requires_grad=False``), for example inactive
    or loaded-for-inference adapters, are not targets and are never touched.

    Args:
        model: A ``peft.PeftModel`` or any module with PEFT LoRA layers injected.

    Returns:
        The targets in ``named_modules()`` order, adapters sorted by name within a module.

    Raises:
        TypeError: If ``model`` is not an ``nn.Module``.
        ValueError: If the model has no LoRA layers, or none with trainable factors.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be a torch.nn.Module (a peft.PeftModel), got {type(model).__name__}. "
            "Pass the model returned by peft.get_peft_model(base_model, LoraConfig(...))."
        )
    (lora_cls,) = lora_layer_types()
    prefix = _base_prefix(model)
    layers: list[tuple[str, Any]] = [(n, m) for n, m in model.named_modules() if isinstance(m, lora_cls)]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no PEFT LoRA layers. Wrap the model first: "
            "model = peft.get_peft_model(model, peft.LoraConfig(r=..., target_modules=[...]))."
        )
    targets: list[LoraTarget] = []
    for name, layer in layers:
        for adapter in _adapter_names(layer):
            found = _adapter_factors(layer, adapter)
            if found is None:
                continue
            kind, weight_a, weight_b, bias_b = found
            if not (weight_a.requires_grad and weight_b.requires_grad):
                continue
            config_key = None
            if prefix is not None and name.startswith(prefix):
                config_key = name[len(prefix) :]
            targets.append(
                LoraTarget(
                    module_name=name,
                    adapter=adapter,
                    key=f"{name}::{adapter}",
                    config_key=config_key,
                    layer=layer,
                    kind=kind,
                    has_bias=bias_b is not None and bias_b.requires_grad,
                    rank=int(layer.r[adapter]),
                    use_rslora=bool(layer.use_rslora.get(adapter, False)),
                )
            )
    if not targets:
        raise ValueError(
            "The model has LoRA layers but none with trainable A and B factors. Train an adapter "
            "with is_trainable=True (PeftModel.from_pretrained(..., is_trainable=True)) or "
            "model.set_adapter(name) before wrapping the optimizer."
        )
    return targets


def display_names(targets: list[LoraTarget]) -> list[str]:
    """User-facing names: the module name, plus ``[adapter]`` when several adapters train."""
    adapters = {t.adapter for t in targets}
    if len(adapters) == 1:
        return [t.module_name for t in targets]
    return [f"{t.module_name}[{t.adapter}]" for t in targets]


def param_ids(params: Iterable[torch.Tensor]) -> set[int]:
    """Identity set of tensors, to check membership without tensor equality."""
    return {id(p) for p in params}
