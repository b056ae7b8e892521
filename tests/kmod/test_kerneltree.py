"""The cached real kernel tree every kmod test runs against (tests/kerneltree.py)."""

from __future__ import annotations

import subprocess
import sys

from tests.kerneltree import REPO_ROOT, KernelTree, ensure_kernel_tree


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
    assert proc.stdout.strip() == str(kernel_tree.root)
