"""``alpha-tuner inspect``: what α a saved LoRA adapter trains with, and what this library recommends.

Reads an adapter folder (``adapter_config.json`` with ``adapter_model.safetensors`` or
``adapter_model.bin``; sub-folders of extra adapters too) or a model id already in the local
Hugging Face cache, without loading the base model. For every LoRA layer it reports the rank
(from the saved A factor's shape), α (from ``alpha_pattern`` as PEFT matches it, else
``lora_alpha``), the effective multiplier ``s = α/r`` (``α/√r`` with rsLoRA), the coefficient
``c`` of the library's rule that this α amounts to at that LR (:meth:`AlphaRule.implied_c`: the
same c as the rule's ``c = 1130``), and the rule's α at that LR.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .rule import AlphaRule

__all__ = ["inspect_adapters", "main"]

# Saved A factors: "...query.lora_A.weight" (linear, conv) and "...embed.lora_embedding_A" (embedding),
# optionally with the adapter name before the suffix. The first dimension is the rank in both.
_FACTOR = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)"
    r"(?:\.lora_A(?:\.[^.]+)?\.weight|\.lora_embedding_A(?:\.[^.]+)?)$"
)


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    # PEFT's own rule (peft.utils.other.get_pattern_key): the first key matching the name's end.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _factor_shapes(folder: Path) -> dict[str, list[int]]:
    """Module name → shape of its saved A factor."""
    safetensors = folder / "adapter_model.safetensors"
    shapes: dict[str, list[int]] = {}
    if safetensors.exists():
        from safetensors import safe_open

        with safe_open(str(safetensors), "pt") as fh:
            names = {k: list(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118
    elif (folder / "adapter_model.bin").exists():
        import torch

        state = torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)
        names = {k: list(v.shape) for k, v in state.items()}
    else:
        raise FileNotFoundError(f"{folder} has adapter_config.json but no adapter_model.safetensors or .bin.")
    for key, shape in names.items():
        match = _FACTOR.match(key)
        if match:
            shapes[match["module"]] = shape
    return shapes


def _resolve(path: str) -> Path:
    folder = Path(path)
    if folder.is_dir():
        return folder
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=path, local_files_only=True))
    except Exception as err:  # any hub error means: not a local folder and not cached
        raise FileNotFoundError(
            f"{path!r} is neither an adapter folder nor a model id in the local Hugging Face cache ({err})."
        ) from err


def inspect_adapters(path: str, *, lr: float | None = None, rule: AlphaRule | None = None) -> dict[str, Any]:
    """Describe every LoRA adapter under ``path`` (see the module docstring).

    Args:
        path: An adapter folder or a cached model id.
        lr: The learning rate of the recommendation (default: the rule's reference LR).
        rule: The α rule (default: the library's).

    Raises:
        FileNotFoundError: If no adapter is found.
    """
    root = _resolve(path)
    rule = rule or AlphaRule()
    lr = rule.reference_lr if lr is None else lr
    folders = sorted({p.parent for p in root.rglob("adapter_config.json")}, key=lambda p: (len(p.parts), p))
    if not folders:
        raise FileNotFoundError(f"No adapter_config.json under {root}: not a PEFT adapter folder.")
    adapters = []
    for folder in folders:
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        if str(config.get("peft_type", "LORA")).upper() != "LORA":
            continue
        rslora = bool(config.get("use_rslora", False))
        layers = []
        for module, shape in sorted(_factor_shapes(folder).items()):
            rank = int(shape[0])
            alpha = float(
                _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
            )
            s = alpha / (math.sqrt(rank) if rslora else rank)
            layers.append({
                "name": module, "rank": rank, "alpha": alpha, "multiplier": s,
                "coefficient": rule.implied_c(alpha, rank, lr, use_rslora=rslora),
                "recommended_alpha": rule.alpha(rank, lr, use_rslora=rslora),
            })  # fmt: skip
        adapters.append({
            "folder": str(folder), "name": folder.name if folder != root else "default",
            "base_model": config.get("base_model_name_or_path"), "use_rslora": rslora,
            "r": config.get("r"), "lora_alpha": config.get("lora_alpha"), "layers": layers,
        })  # fmt: skip
    return {
        "path": str(root),
        "lr": lr,
        "rule": rule.to_dict(),
        "recommended_coefficient": rule.coefficient(lr),
        "recommended_rank_exponent": rule.exponent(lr),
        "adapters": adapters,
    }


def format_report(report: Mapping[str, Any]) -> str:
    """The report as an aligned text table per adapter."""
    lines = [f"{report['path']}"]
    for ad in report["adapters"]:
        conv = "α/√r (rsLoRA)" if ad["use_rslora"] else "α/r"
        lines += [
            "",
            f"adapter {ad['name']!r}: base model {ad['base_model']}, scaling {conv}, "
            f"{len(ad['layers'])} LoRA layers",
        ]
        width = max([len("layer"), *(len(x["name"]) for x in ad["layers"])])
        lines.append(
            f"{'layer':<{width}}  {'rank':>5}  {'alpha':>9}  {'s':>9}  {'c':>8}  {'recommended α':>13}"
        )
        for x in ad["layers"]:
            lines.append(
                f"{x['name']:<{width}}  {x['rank']:>5}  {x['alpha']:>9.4g}  {x['multiplier']:>9.4g}  "
                f"{x['coefficient']:>8.4g}  {x['recommended_alpha']:>13.4g}"
            )
    rule = report["rule"]
    lines += [
        "",
        f"recommended: α = c·r^p · (η_ref/η)^q (r^(p-1/2) under rsLoRA) with the library's rule "
        f"c = {rule['c']:g}, η_ref = {rule['reference_lr']:g}, q = {rule['lr_exponent']:g}, "
        f"p = {report['recommended_rank_exponent']:.3g} at lr η = {report['lr']:g} (alpha_tuner.AlphaRule)",
        "column c: the c of that rule which each layer's α amounts to at this lr (compare with "
        f"c = {rule['c']:g})",
    ]
    return "\n".join(lines)


def main(path: str, *, lr: float | None = None, as_json: bool = False) -> int:
    """Print the report of ``path`` (text or JSON); exit code 1 when nothing is found."""
    try:
        report = inspect_adapters(path, lr=lr)
    except FileNotFoundError as err:
        print(f"alpha-tuner inspect: {err}")
        return 1
    print(json.dumps(report, indent=2) if as_json else format_report(report))
    return 0
