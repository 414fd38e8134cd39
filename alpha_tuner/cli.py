"""``alpha-tuner``: the command line (argparse only; the work lives in :mod:`alpha_tuner.demo`).

``sweep`` runs the calibration harness, which is research and not installed with the library: it
works from a clone of the repository (its ``research/`` folder next to ``alpha_tuner/``, or in
the current directory).

Sub-commands::

    alpha-tuner demo      fine-tune MiniLM (or SmolLM2) with four LoRA methods; table and figure
    alpha-tuner sweep     the α × LR × rank grid, the held-out bar runs, and the report
    alpha-tuner inspect   LoRA layers, ranks, α and the recommended α of a saved adapter
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["main"]

_DEFAULT_SWEEP = Path("benchmarks/results/sweep_minilm.jsonl")


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer ≥ ``minimum``, refused in one line that names the range."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    return parse


def _positive_float(text: str) -> float:
    """An argparse type: a finite number > 0 (a learning rate)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def _floats(text: str) -> tuple[float, ...]:
    return tuple(_positive_float(v) for v in text.split(","))


def _ints(minimum: int) -> Callable[[str], tuple[int, ...]]:
    def parse(text: str) -> tuple[int, ...]:
        return tuple(_int_at_least(minimum)(v) for v in text.split(","))

    return parse


def _demo_methods(text: str) -> str:
    from .demo.models import METHODS

    unknown = [m for m in (x.strip() for x in text.split(",")) if m and m not in METHODS]
    if unknown or not text.strip(","):
        raise argparse.ArgumentTypeError(f"choose from {', '.join(METHODS)} (comma-separated), got {text!r}")
    return text


def _device(text: str) -> str:
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be a torch device (cpu, cuda:0, ...), got {text!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r} asks for CUDA, which this machine does not have; use cpu")
    return text


def _writable_folder(parser: argparse.ArgumentParser, folder: Path) -> None:
    """Exit 2, naming ``--out``, unless ``folder`` can be created and written to."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as err:
        reason = err.strerror or str(err)
        parser.error(f"argument --out: cannot write to {str(folder)!r} ({reason}); choose a writable folder")


def _shard(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    try:
        k, n = int(index), int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard takes K/N (e.g. 0/2), got {text!r}") from None
    if n < 1 or not 0 <= k < n:
        raise argparse.ArgumentTypeError(f"--shard K/N needs 0 <= K < N, got {text!r}")
    return k, n


class ResearchMissingError(RuntimeError):
    """``research/`` is not importable: the command needs a clone of the repository."""


def _research() -> None:
    """Make ``research`` importable from a clone (next to this package, or the current directory).

    Raises:
        ResearchMissingError: Outside a clone.
    """
    if importlib.util.find_spec("research") is not None:
        return
    for root in (Path(__file__).resolve().parent.parent, Path.cwd()):
        if (root / "research" / "sweep.py").exists():
            sys.path.insert(0, str(root))
            return
    raise ResearchMissingError(
        "alpha-tuner sweep runs the calibration harness in research/, which is not installed with the "
        "library: run it from a clone of the repository (cd into it first)."
    )


def _methods(text: str) -> tuple[str, ...]:
    try:
        _research()
    except ResearchMissingError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    from research.sweep import select_configs

    methods = tuple(m.strip() for m in text.split(",") if m.strip())
    try:
        select_configs([], methods=methods)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return methods


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alpha-tuner", description="LoRA scaling factors (α): demo, sweep and inspection of adapters."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="vanilla LoRA vs rsLoRA vs LoRA+ vs AlphaTuned on one task")
    demo.add_argument(
        "--model", choices=("minilm", "smollm2", "tiny"), default="minilm", help="tiny: random test model"
    )
    demo.add_argument("--rank", type=_int_at_least(1), default=16, help="LoRA rank (>= 1)")
    lr = demo.add_mutually_exclusive_group()
    lr.add_argument("--lr", type=_positive_float, default=None, help="base LR of every method (> 0)")
    lr.add_argument(
        "--lrs", type=_floats, default=None,
        help="several base LRs, comma-separated: every method at each (default: 1e-4,1e-3 for smollm2)",
    )  # fmt: skip
    demo.add_argument("--steps", type=_int_at_least(1), default=None, help="optimizer steps (>= 1)")
    demo.add_argument("--batch-size", type=_int_at_least(1), default=None)
    demo.add_argument("--eval-size", type=_int_at_least(1), default=None, help="held-out examples")
    demo.add_argument("--seed", type=_int_at_least(0), default=0)
    demo.add_argument("--methods", type=_demo_methods, default="lora,rslora,loraplus,alphatuned")
    demo.add_argument("--out", type=Path, default=Path("demo_output"), help="folder of the outputs")
    demo.add_argument("--threads", type=_int_at_least(1), default=None, help="torch CPU threads")
    demo.add_argument("--device", type=_device, default="cpu", help="cpu, cuda, cuda:1, ...")
    demo.add_argument("--no-progress", action="store_true")

    sweep = sub.add_parser("sweep", help="grid over alpha x LR x rank (resumable JSON lines)")
    sweep.add_argument("phase", choices=("grid", "bar", "report", "all"), nargs="?", default="all")
    sweep.add_argument("--out", type=Path, default=_DEFAULT_SWEEP, help="JSON-lines results file")
    sweep.add_argument("--model", choices=("minilm", "smollm2", "tiny"), default="minilm")
    sweep.add_argument("--ranks", type=_ints(1), default=None, help="e.g. 4,16,64")
    sweep.add_argument("--lrs", type=_floats, default=None, help="e.g. 2e-5,8e-5,3.2e-4")
    sweep.add_argument("--coefficients", type=_floats, default=None, help="grid g: alpha = g*sqrt(r)")
    sweep.add_argument(
        "--coefficient-lr-shift", type=float, default=None, help="g grid × (lrs[0]/lr)**shift (default 0.5)"
    )
    sweep.add_argument("--seeds", type=_ints(0), default=None, help="selection seeds of the grid")
    sweep.add_argument("--heldout-seeds", type=_ints(0), default=None, help="seeds of the bar runs")
    sweep.add_argument("--steps", type=_int_at_least(1), default=None)
    sweep.add_argument("--batch-size", type=_int_at_least(1), default=None)
    sweep.add_argument("--eval-size", type=_int_at_least(1), default=None)
    sweep.add_argument("--limit", type=_int_at_least(1), default=None, help="at most this many new runs")
    sweep.add_argument(
        "--methods", type=_methods, default=None,
        help="bar: only these methods (e.g. lora,rslora,loraplus)",
    )  # fmt: skip
    sweep.add_argument(
        "--shard", type=_shard, default=None,
        help="K/N: every N-th pending run from the K-th; start N workers together on one file",
    )  # fmt: skip
    sweep.add_argument(
        "--threads", type=_int_at_least(1), default=1, help="torch CPU threads (1 is fastest on a busy CPU)"
    )
    sweep.add_argument("--device", default="cpu", help="cpu, cuda, ... (not part of the resume key)")
    sweep.add_argument("--dry-run", action="store_true", help="list the runs still to do and stop")
    sweep.add_argument("--no-progress", action="store_true")

    insp = sub.add_parser("inspect", help="LoRA layers, ranks and alpha of a saved adapter")
    insp.add_argument("path", help="adapter folder, or a model id already in the local cache")
    insp.add_argument(
        "--lr", type=_positive_float, default=None,
        help="LR of the recommendation (default: a Trainer checkpoint's, else the rule's reference LR)",
    )  # fmt: skip
    insp.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the sub-command; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "inspect":
        from .inspection import main as inspect_main

        return inspect_main(args.path, lr=args.lr, as_json=args.json)
    if args.command == "demo":
        _writable_folder(parser, args.out)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    from .demo.assets import AssetMissingError

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.command == "demo":
            from .demo.run import main as demo_main

            return demo_main(args)
        _research()
        from research.sweep_cli import main as sweep_main

        return sweep_main(args)
    except (AssetMissingError, ResearchMissingError) as err:
        print(f"alpha-tuner: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("alpha-tuner: interrupted; no output file was written or left half-written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
