"""A tiny module tree: a handful of real module files of the Debian tree, re-indexed."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.kerneltree import KernelTree, module_file

# Real modules with real dependencies: appletalk -> psnap -> llc, ext4 -> jbd2 mbcache
# crc16 (+ softdep crypto-crc32c from modules.softdep), vfat -> fat, algif_* -> af_alg;
# crc32c-intel keeps a '-' in its file name.  Stems under kernel/: the suffix is the
# tree's own (`.ko` on Debian 12, `.ko.xz` on Debian 13), see KernelTree.module_file.
TINY_MODULES = (
    "net/llc/llc",
    "net/802/psnap",
    "net/appletalk/appletalk",
    "fs/ext4/ext4",
    "fs/jbd2/jbd2",
    "fs/mbcache",
    "lib/crc16",
    "fs/fat/fat",
    "fs/fat/vfat",
    "fs/fat/msdos",
    "arch/x86/crypto/crc32c-intel",  # before crc32c_generic, as in Debian's modules.order
    "crypto/crc32c_generic",
    "crypto/af_alg",
    "crypto/algif_aead",
    "crypto/algif_hash",
    "drivers/net/dummy",
    "drivers/block/loop",
)
COPIED_INDEXES = ("modules.builtin", "modules.builtin.modinfo")


@dataclass(frozen=True, slots=True)
class TinyTree:
    root: Path
    release: str

    @property
    def module_dir(self) -> Path:
        return self.root / "lib/modules" / self.release

    def module_file(self, stem: str) -> Path:
        return module_file(self.module_dir, stem)


def copy_modules(tree: KernelTree, moddir: Path, stems: tuple[str, ...]) -> None:
    """Copy STEMS' real files (their own suffix) under MODDIR/kernel and write
    modules.order for them: depmod then indexes exactly these."""
    order = []
    for stem in stems:
        src = tree.module_file(stem)
        rel = src.relative_to(tree.module_dir)
        dest = moddir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        order.append(f"{rel}\n")
    (moddir / "modules.order").write_text("".join(order))


@pytest.fixture(scope="session")
def tiny_tree(kernel_tree: KernelTree, tmp_path_factory: pytest.TempPathFactory) -> TinyTree:
    root = tmp_path_factory.mktemp("tiny") / "root"
    moddir = root / "lib/modules" / kernel_tree.release
    copy_modules(kernel_tree, moddir, TINY_MODULES)
    for name in COPIED_INDEXES:
        shutil.copyfile(kernel_tree.module_dir / name, moddir / name)
    subprocess.run(["depmod", "-b", str(root), kernel_tree.release], check=True)
    return TinyTree(root=root, release=kernel_tree.release)


def write_conf(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(text)
    return path
