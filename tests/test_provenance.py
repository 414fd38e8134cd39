"""A benchmark record names the code that made it (research.provenance), on a real git checkout."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from research.provenance import code_revision, cpu_model

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True)
    return done.stdout.strip()


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    (tmp_path / "alpha_tuner").mkdir()
    (tmp_path / "alpha_tuner" / "law.py").write_text("A = 1\n")
    (tmp_path / "notes.md").write_text("notes\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "start")
    return tmp_path


def test_a_clean_checkout_is_named_by_its_commit(checkout: Path) -> None:
    assert code_revision(checkout) == _git(checkout, "rev-parse", "--short=12", "HEAD")


def test_a_change_to_the_code_marks_the_revision_dirty(checkout: Path) -> None:
    commit = code_revision(checkout)
    (checkout / "notes.md").write_text("other notes\n")  # not code: the results do not depend on it
    assert code_revision(checkout) == commit
    (checkout / "alpha_tuner" / "law.py").write_text("A = 2\n")
    assert code_revision(checkout) == f"{commit}+dirty"
    (checkout / "alpha_tuner" / "law.py").write_text("A = 1\n")
    (checkout / "research").mkdir()
    (checkout / "research" / "new.py").write_text("")  # an untracked module counts too
    assert code_revision(checkout) == f"{commit}+dirty"


def test_a_folder_outside_git_has_no_revision(tmp_path: Path) -> None:
    assert code_revision(tmp_path / "nowhere") is None


def test_the_cpu_is_named_with_its_bf16_flags(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu avx512f amx_bf16 avx512_bf16\n\n"
        "processor\t: 1\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu avx512f amx_bf16 avx512_bf16\n"
    )
    assert cpu_model(info) == "AMD EPYC 9R14 (avx512_bf16, amx_bf16)"
    info.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx2\n")
    assert cpu_model(info) == "Some CPU"  # no bf16 instructions: the model alone
    assert cpu_model(tmp_path / "missing") != ""  # off Linux: whatever platform says, or "unknown"
