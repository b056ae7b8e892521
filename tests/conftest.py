"""Shared pytest fixtures: the real kernel tree, and the root requirement."""

from __future__ import annotations

import os

import pytest

from tests.kerneltree import (
    KernelTree,
    KernelTreeError,
    Kmod34,
    ensure_kmod34,
    ensure_trixie_tree,
    selected_tree,
)

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# Marks a test that needs root (namespaces, journald, uevents, setpriv).  Outside root it
# skips with a reason; CI runs as root, so there it always runs.
root_required = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


@pytest.fixture(scope="session")
def kernel_tree() -> KernelTree:
    """Debian's current kernel image, extracted and depmod'ed (tests/kerneltree.py).

    In CI (CI=true) a tree that cannot be built is a failure, never a skip.
    KMODD_TEST_KERNEL=trixie runs the suite on Debian 13's tree instead (what `make test`
    inside tools/test-debian13 gets), to reproduce a Debian 13 failure on Debian 12.
    """
    try:
        return selected_tree()
    except KernelTreeError as err:
        if IN_CI:
            pytest.fail(f"kernel tree unavailable in CI: {err}")
        pytest.skip(f"kernel tree unavailable: {err}")


@pytest.fixture(scope="session")
def trixie_tree() -> KernelTree:
    """Debian 13's kernel image (6.12, .ko.xz under usr/lib/modules), through a private
    apt configuration (tests/kerneltree.py); `make kernel-tree` builds it for CI."""
    try:
        return ensure_trixie_tree()
    except KernelTreeError as err:
        if IN_CI:
            pytest.fail(f"Debian 13 kernel tree unavailable in CI: {err}")
        pytest.skip(f"Debian 13 kernel tree unavailable: {err}")


@pytest.fixture(scope="session")
def kmod34() -> Kmod34:
    """Debian 13's kmod 34.2 userland, extracted and run through its own ld.so."""
    try:
        return ensure_kmod34()
    except KernelTreeError as err:
        if IN_CI:
            pytest.fail(f"kmod 34 unavailable in CI: {err}")
        pytest.skip(f"kmod 34 unavailable: {err}")
