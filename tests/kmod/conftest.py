"""A tiny module tree: a handful of real .ko files of the Debian tree, re-indexed."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.kerneltree import KernelTree

# Real modules with real dependencies: appletalk -> psnap -> llc, ext4 -> jbd2 mbcache
# crc16 (+ softdep crypto-crc32c from modules.softdep), vfat -> fat, algif_* -> af_alg;
# crc32c-intel keeps a '-' in its file name.
TINY_MODULES = (
    "net/llc/llc.ko",
    "net/802/psnap.ko",
    "net/appletalk/appletalk.ko",
    "fs/ext4/ext4.ko",
    "fs/jbd2/jbd2.ko",
    "fs/mbcache.ko",
    "lib/crc16.ko",
    "fs/fat/fat.ko",
    "fs/fat/vfat.ko",
    "fs/fat/msdos.ko",
    "arch/x86/crypto/crc32c-intel.ko",  # before crc32c_generic, as in Debian's modules.order
    "crypto/crc32c_generic.ko",
    "crypto/af_alg.ko",
    "crypto/algif_aead.ko",
    "crypto/algif_hash.ko",
    "drivers/net/dummy.ko",
    "drivers/block/loop.ko",
)
COPIED_INDEXES = ("modules.builtin", "modules.builtin.modinfo")


@dataclass(frozen=True, slots=True)
class TinyTree:
    root: Path
    release: str

    @property
    def module_dir(self) -> Path:
        return self.root / "lib/modules" / self.release


@pytest.fixture(scope="session")
def tiny_tree(kernel_tree: KernelTree, tmp_path_factory: pytest.TempPathFactory) -> TinyTree:
    root = tmp_path_factory.mktemp("tiny") / "root"
    moddir = root / "lib/modules" / kernel_tree.release
    for rel in TINY_MODULES:
        dest = moddir / "kernel" / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(kernel_tree.module_dir / "kernel" / rel, dest)
    for name in COPIED_INDEXES:
        shutil.copyfile(kernel_tree.module_dir / name, moddir / name)
    (moddir / "modules.order").write_text("".join(f"kernel/{rel}\n" for rel in TINY_MODULES))
    subprocess.run(["depmod", "-b", str(root), kernel_tree.release], check=True)
    return TinyTree(root=root, release=kernel_tree.release)


def write_conf(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(text)
    return path
