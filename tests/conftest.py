"""Shared pytest fixtures: the real kernel tree, and the root requirement."""

from __future__ import annotations

import os

import pytest

from tests.kerneltree import KernelTree, KernelTreeError, ensure_kernel_tree

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# Marks a test that needs root (namespaces, journald, uevents, setpriv).  Outside root it
# skips with a reason; CI runs as root, so there it always runs.
root_required = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


@pytest.fixture(scope="session")
def kernel_tree() -> KernelTree:
    """Debian's current kernel image, extracted and depmod'ed (tests/kerneltree.py).

    In CI (CI=true) a tree that cannot be built is a failure, never a skip.
    """
    try:
        return ensure_kernel_tree()
    except KernelTreeError as err:
        if IN_CI:
            pytest.fail(f"kernel tree unavailable in CI: {err}")
        pytest.skip(f"kernel tree unavailable: {err}")
