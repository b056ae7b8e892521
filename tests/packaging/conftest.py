"""The Debian 13 package, built by `make deb`'s script and installed with apt into a fresh
trixie chroot (packaging/debian13.sh; caches in /var/cache/kmodd-dev)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import IN_CI
from tests.kerneltree import KernelTree

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "packaging/debian13.sh"
CACHE = Path(os.environ.get("KMODD_DEV_CACHE", "/var/cache/kmodd-dev"))
# Left out of the before/after comparison of a purge: apt's and dpkg's own bookkeeping,
# logs, and the mount points the runner binds.
UNTRACKED = ("proc/", "dev/", "tmp/", "var/cache/", "var/lib/apt/", "var/lib/dpkg/", "var/log/")


@dataclass(frozen=True, slots=True)
class Chroot:
    root: Path

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(SCRIPT), "run", str(self.root), *argv],
            capture_output=True,
            text=True,
            check=False,
            timeout=900,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
            )
        return result

    def files(self) -> set[str]:
        """Every path of the tree (a trailing / for directories), bookkeeping left out."""
        out: set[str] = set()
        for dirpath, dirnames, filenames in os.walk(self.root):
            rel = os.path.relpath(dirpath, self.root)
            base = "" if rel == "." else rel + "/"
            out.update(base + d + "/" for d in dirnames)
            out.update(base + f for f in filenames)
        return {p for p in out if not p.startswith(UNTRACKED)}


def _needs_root_and_tools() -> None:
    missing = [tool for tool in ("debootstrap", "unshare", "chroot") if not shutil.which(tool)]
    reason = "needs root" if os.geteuid() != 0 else f"needs {', '.join(missing)}" if missing else ""
    if reason:
        if IN_CI:
            pytest.fail(f"the package tests cannot run in CI: {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="session")
def deb_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`make deb` of this checkout (its build chroot is cached; the build is not)."""
    _needs_root_and_tools()
    out = tmp_path_factory.mktemp("deb")
    result = subprocess.run(
        [str(SCRIPT), "build", str(out)], capture_output=True, text=True, check=False, timeout=1800
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (deb,) = out.glob("kmodd_*.deb")
    return deb


@pytest.fixture(scope="module")
def fresh_chroot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chroot]:
    """A copy of the pristine minbase trixie chroot."""
    _needs_root_and_tools()
    subprocess.run([str(SCRIPT), "base"], check=True, timeout=1800)
    root = tmp_path_factory.mktemp("trixie") / "root"
    subprocess.run(["cp", "-a", str(CACHE / "trixie-base"), str(root)], check=True)
    yield Chroot(root)
    shutil.rmtree(root, ignore_errors=True)


def add_kernel_tree(chroot: Chroot, tree: KernelTree) -> None:
    """Debian 13's kernel modules at usr/lib/modules/RELEASE, hard-linked (read only)."""
    target = chroot.root / "usr/lib/modules" / tree.release
    target.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-al", str(tree.module_dir), str(target)], check=True)
