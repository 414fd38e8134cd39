"""Where a benchmark record came from: the code a run imported and the CPU's kernel family.

A worker imports the library once, when its process starts, and a queue may run for hours while
the checkout moves on; a record then says which code made it only if it is read at import. Two
records of the same run differ only if the code or the kernels differ, so each record carries
both: ``code`` (the checkout's commit, ``+dirty`` where the library or the research code had
uncommitted changes) and ``cpu_capability`` (the vector ISA torch dispatches to; bf16 matmuls
round differently across them). The same ISA is not enough: the same code on two AVX512 machines
ended debates runs 0.0007 % to 0.04 % apart, its training losses apart from step 10 on, so each
record also names the ``cpu`` (the processor's model and the bf16 instructions it has).
"""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import torch

import alpha_tuner

#: The CPU flags of bf16 arithmetic, which change how torch's bf16 kernels round.
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "avx_ne_convert")

#: The folders whose files decide a run's result.
CODE_DIRS = ("alpha_tuner", "research")


def code_revision(root: Path) -> str | None:
    """The checkout's short commit, plus ``+dirty`` if ``CODE_DIRS`` differ from it.

    Args:
        root: the repository that holds ``CODE_DIRS``.

    Returns:
        ``"<commit>"`` or ``"<commit>+dirty"``; ``None`` where ``root`` is not a git checkout or
        git is missing (an installed package: the version then says what ran).
    """

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True)
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--", *CODE_DIRS)
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{commit}+dirty" if dirty else commit


#: Read once, when the first benchmark module is imported: the code this process runs (outside
#: a checkout, the installed version).
CODE = code_revision(Path(alpha_tuner.__file__).resolve().parent.parent) or (
    f"alpha_tuner {alpha_tuner.__version__}"
)


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The processor's model name and its bf16 flags, e.g. ``"AMD EPYC (avx512_bf16)"``.

    Args:
        cpuinfo: the kernel's CPU description (Linux); elsewhere :func:`platform.processor`.

    Returns:
        The first ``model name`` of ``cpuinfo`` followed by the :data:`BF16_FLAGS` its first
        ``flags`` line lists, in brackets; ``"unknown"`` where neither source names a model.
    """
    try:
        lines = cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return platform.processor() or "unknown"

    def first(field: str) -> str:
        values = (line.split(":", 1)[1].strip() for line in lines if line.split(":")[0].strip() == field)
        return next(values, "")

    flags = set(first("flags").split())
    bf16 = [f for f in BF16_FLAGS if f in flags]
    model = first("model name") or platform.processor() or "unknown"
    return f"{model} ({', '.join(bf16)})" if bf16 else model


def environment() -> dict[str, object]:
    """The fields every benchmark record carries about the process that made it."""
    return {
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu": cpu_model(),
        "code": CODE,
    }
