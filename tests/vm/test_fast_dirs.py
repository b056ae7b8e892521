"""The guest's fast (cache=loose) mounts cover the Python that runs there, whatever its
version: a hard-coded /usr/lib/python3.11 was silently skipped on Debian 13's 3.13, so
every guest import went through the slow cache=none root (no VM needed to check this)."""

from __future__ import annotations

import os
from pathlib import Path

from tests.vm.harness import FAST_DIRS, REPO_ROOT


def _covered(path: Path) -> bool:
    return any(path.is_relative_to(d) for d in (*FAST_DIRS, str(REPO_ROOT)))


def test_the_stdlib_this_python_imports_from_is_a_fast_dir() -> None:
    stdlib = Path(os.__file__).resolve().parent  # /usr/lib/python3.X
    assert _covered(stdlib), (stdlib, FAST_DIRS)


def test_every_fast_dir_exists_here() -> None:
    """The prelude skips a missing dir without a word: none may be missing."""
    missing = [d for d in FAST_DIRS if not Path(d).is_dir()]
    assert missing == []
