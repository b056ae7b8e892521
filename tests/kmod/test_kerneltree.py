"""The cached real kernel tree every kmod test runs against (tests/kerneltree.py)."""

from __future__ import annotations

import subprocess
import sys

from tests.kerneltree import REPO_ROOT, KernelTree, Kmod34, ensure_kernel_tree, ensure_trixie_tree


def test_tree_is_complete_and_cached(kernel_tree: KernelTree) -> None:
    assert kernel_tree.release.endswith("-amd64")
    assert kernel_tree.vmlinuz.is_file()
    for index in ("modules.dep.bin", "modules.alias.bin", "modules.builtin.bin"):
        assert (kernel_tree.module_dir / index).is_file(), index
    for rel in ("etc/modprobe.d", "run/modprobe.d", "usr/lib/modprobe.d", "lib/modprobe.d"):
        assert (kernel_tree.root / rel).is_dir(), rel
    assert ensure_kernel_tree() == kernel_tree  # idempotent: same tree, not a rebuild
    assert not list(kernel_tree.root.parent.parent.glob(".build-*"))  # no half-built trees


def test_module_entry_point_prints_the_root(kernel_tree: KernelTree) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.kerneltree"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    roots = proc.stdout.splitlines()
    assert roots[0] == str(kernel_tree.root)
    assert len(roots) == 3  # the Debian 13 tree and kmod 34 follow


def test_debian13_tree_is_merged_usr_with_compressed_modules(trixie_tree: KernelTree) -> None:
    """Debian 13's 6.12 image: modules only under usr/lib/modules, every one .ko.xz."""
    assert trixie_tree.release.startswith("6.12.") and trixie_tree.release.endswith("-amd64")
    assert not (trixie_tree.root / "lib/modules").exists()
    assert trixie_tree.module_dir == trixie_tree.root / "usr/lib/modules" / trixie_tree.release
    assert trixie_tree.dirname == trixie_tree.root / "usr"
    deps = (trixie_tree.module_dir / "modules.dep").read_text().splitlines()
    assert len(deps) > 4000
    assert all(line.split(":", 1)[0].endswith(".ko.xz") for line in deps)
    assert ensure_trixie_tree() == trixie_tree


def test_kmod34_runs_from_its_own_libraries(kmod34: Kmod34) -> None:
    assert kmod34.version() == "kmod version 34.2"
