"""Where a benchmark record came from: the code a run imported and the CPU's kernel family.

A worker imports the library once, when its process starts, and a queue may run for hours while
the checkout moves on; a record then says which code made it only if it is read at import. Two
records of the same run differ only if the code or the kernels differ, so each record carries
both: ``code`` (the checkout's commit, ``+dirty`` where the library or the research code had
uncommitted changes) and ``cpu_capability`` (the vector ISA torch dispatches to; bf16 matmuls
round differently across them).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import torch

import alpha_tuner

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


def environment() -> dict[str, object]:
    """The fields every benchmark record carries about the process that made it."""
    return {
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "code": CODE,
    }
