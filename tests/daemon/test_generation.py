"""Generation builds in-process on the real Debian tree: what one build keeps for the next
(resolutions, the alias index) must never outlive a modprobe.d or module tree change."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmodd import helper
from kmodd.daemon.generation import BuildOptions, Generation, build_generation
from kmodd.daemon.treeindex import TreeIndex
from kmodd.kmod.context import KmodContext
from kmodd.kmod.model import Resolution
from kmodd.paths import Paths, make_paths
from kmodd.policy.types import Source, Verdict
from tests.daemon.running import BASE_POLICY, SystemRoot, make_root
from tests.kerneltree import KernelTree

DENY_VFAT = BASE_POLICY.replace("module: [algif_aead]", "module: [algif_aead, vfat]")


@pytest.fixture
def sr(kernel_tree: KernelTree) -> Iterator[SystemRoot]:
    root = make_root(kernel_tree)
    yield root
    shutil.rmtree(root.root.parent, ignore_errors=True)


@pytest.fixture
def idx() -> TreeIndex:
    """What the Core keeps from one build to the next (one per test: no reuse between)."""
    return TreeIndex()


def build(sr: SystemRoot, number: int, index: TreeIndex | None = None) -> Generation:
    paths: Paths = make_paths(str(sr.root), sr.release, str(sr.runtime))
    paths.runtime_dir.mkdir(exist_ok=True)
    return build_generation(number, paths, BuildOptions(cmdline=sr.cmdline), index)


def snapshot_row(gen: Generation, key: str) -> str | None:
    for line in gen.snapshot.decode().splitlines():
        if line.startswith(f"{key} "):
            return line
    return None


class CountingResolve:
    """KmodContext.resolve, counted (the libkmod work a build does)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = KmodContext.resolve

        def counted(ctx: KmodContext, name: str) -> Resolution:
            self.calls += 1
            return real(ctx, name)

        monkeypatch.setattr(KmodContext, "resolve", counted)


def test_policy_only_rebuild_reuses_resolutions(
    sr: SystemRoot, idx: TreeIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    counter = CountingResolve(monkeypatch)
    first = build(sr, 1, idx)
    cold = counter.calls
    first.close()
    sr.write_policy(DENY_VFAT)
    second = build(sr, 2, idx)
    try:
        assert cold > 4000  # every snapshot name resolved once
        assert counter.calls - cold < 10  # a policy edit: no name resolved again
        assert snapshot_row(second, "vfat") == "vfat d copy-fail"
        assert second.decide("vfat", Source.KERNEL).verdict is Verdict.DENY
    finally:
        second.close()


@pytest.mark.parametrize("how", ["in_place", "new_file"])
def test_modprobe_d_edit_after_a_reuse_is_seen(sr: SystemRoot, idx: TreeIndex, how: str) -> None:
    """A softdep changes what an already resolved name loads.  In place: the directory
    mtime stays, which libkmod's own validate does not notice."""
    conf = sr.root / "etc/modprobe.d/local.conf"
    if how == "in_place":
        conf.write_text("# nothing yet\n")
    build(sr, 1, idx).close()
    sr.write_policy(BASE_POLICY + "# edited\n")
    reused = build(sr, 2, idx)  # policy only: resolutions reused
    assert snapshot_row(reused, "vfat") == "vfat a default"
    reused.close()
    with conf.open("w") as handle:  # the same inode when it exists
        handle.write("softdep vfat pre: algif_aead\n")
    seen = build(sr, 3, idx)
    try:
        assert snapshot_row(seen, "vfat") == "vfat d copy-fail"
        decision = seen.decide("vfat", Source.KERNEL)
        assert "algif_aead" in decision.load_set
        assert decision.verdict is Verdict.DENY
    finally:
        seen.close()


def test_module_tree_change_is_seen(
    sr: SystemRoot, idx: TreeIndex, kernel_tree: KernelTree, monkeypatch: pytest.MonkeyPatch
) -> None:
    """depmod renames new index files in: a tree whose modules.* differ is resolved anew."""
    build(sr, 1, idx).close()
    tree = sr.root / "lib/modules" / sr.release
    tree.unlink()  # the symlink to the shared tree: copy the indexes, link the rest
    tree.mkdir()
    for entry in Path(kernel_tree.module_dir).iterdir():
        if entry.name.startswith("modules."):
            shutil.copy2(entry, tree / entry.name)
        else:
            (tree / entry.name).symlink_to(entry)
    counter = CountingResolve(monkeypatch)
    gen = build(sr, 2, idx)
    try:
        assert counter.calls > 4000
        assert snapshot_row(gen, helper.normalize("algif-aead")) == "algif_aead d copy-fail"
    finally:
        gen.close()


CODA_FOR_KERNEL = """\
kmodd: 1
rules:
  - id: kernel-coda
    action: deny
    match: {module: [coda], source: [kernel]}
"""


def test_daemon_build_snapshot_denies_wildcard_aliases(sr: SystemRoot, idx: TreeIndex) -> None:
    """The daemon's build sees the whole alias index, wildcards included, as KmodContext
    does: char-major-67-0 (alias char-major-67-* -> coda) is denied by the snapshot alone,
    on a first build and on a rebuild that reuses the tree index (the VM found a build
    that only kept glob-free aliases and rendered no glob rows)."""
    sr.write_policy(CODA_FOR_KERNEL)
    for number in (1, 2):
        gen = build(sr, number, idx)
        key = helper.normalize("char-major-67-0").encode()
        assert helper.snapshot_lookup(gen.snapshot, key) == (b"d", b"kernel-coda")
        assert helper.snapshot_lookup(gen.snapshot, b"char_major_67") is None  # kmod: no such name
    with KmodContext(str(sr.root), sr.release) as ctx:
        assert idx.alias_patterns(ctx) == ctx.alias_patterns()
