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
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .rule import AlphaRule

__all__ = ["PathNotFoundError", "checkpoint_lr", "inspect_adapters", "main"]

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


class PathNotFoundError(FileNotFoundError):
    """The path is neither a folder nor a model id in the local Hugging Face cache (a bad argument)."""


def _resolve(path: str) -> Path:
    folder = Path(path)
    if folder.is_dir():
        return folder
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=path, local_files_only=True))
    except Exception:  # any hub error means: not a local folder and not cached (nothing is downloaded)
        raise PathNotFoundError(
            f"{path!r} is not a folder, nor a model id in the local Hugging Face cache "
            "(inspect never downloads): pass an adapter folder, e.g. the output of save_pretrained()"
        ) from None


def checkpoint_lr(folder: Path) -> float | None:
    """The peak learning rate a Trainer logged in ``folder/trainer_state.json``, or ``None``.

    Plain JSON: the largest ``learning_rate`` of its ``log_history``, which is the base LR of the
    usual warm-up + decay schedules up to one logging interval (``training_args.bin`` is a pickle
    and is never read from a folder a user points at).
    """
    state = folder / "trainer_state.json"
    if not state.is_file():
        return None
    try:
        history = json.loads(state.read_text(encoding="utf-8")).get("log_history", [])
    except (OSError, ValueError, AttributeError):
        return None
    rates = [float(e["learning_rate"]) for e in history if isinstance(e, dict) and "learning_rate" in e]
    rates = [r for r in rates if math.isfinite(r) and r > 0]
    return max(rates) if rates else None


def inspect_adapters(path: str, *, lr: float | None = None, rule: AlphaRule | None = None) -> dict[str, Any]:
    """Describe every LoRA adapter under ``path`` (see the module docstring).

    Args:
        path: An adapter folder or a cached model id.
        lr: The learning rate of the recommendation (default: the peak LR of a Trainer
            checkpoint's ``trainer_state.json``, else the rule's reference LR, said as assumed).
        rule: The α rule (default: the library's).

    Raises:
        FileNotFoundError: If no adapter is found.
    """
    root = _resolve(path)
    rule = rule or AlphaRule()
    if lr is not None:
        lr_source = "given"
    elif (read := checkpoint_lr(root)) is not None:
        lr, lr_source = read, "trainer_state.json"
    else:
        lr, lr_source = rule.reference_lr, "assumed"
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
        "lr_source": lr_source,
        "rule": rule.to_dict(),
        "recommended_coefficient": rule.coefficient(lr),
        "recommended_rank_exponent": rule.exponent(lr),
        "adapters": adapters,
    }


def format_report(report: Mapping[str, Any]) -> str:
    """The report as an aligned text table per adapter."""
    source = {
        "given": "given with --lr",
        "trainer_state.json": "the peak learning_rate logged in trainer_state.json",
        "assumed": "ASSUMED: the rule's reference LR; pass --lr with the LR the adapter trained at",
    }[report.get("lr_source", "given")]
    lines = [f"{report['path']}: recommendations at lr = {report['lr']:g} ({source})"]
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
    """Print the report of ``path`` (text or JSON).

    Returns:
        0; 2 (with a one-line error) when ``path`` does not exist; 1 when it holds no adapter.
    """
    try:
        report = inspect_adapters(path, lr=lr)
    except PathNotFoundError as err:
        print(f"alpha-tuner inspect: error: argument path: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"alpha-tuner inspect: {err}")
        return 1
    print(json.dumps(report, indent=2) if as_json else format_report(report))
    return 0
