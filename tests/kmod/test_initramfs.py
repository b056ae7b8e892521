"""kmodd's initramfs reader against images Debian's own mkinitramfs built, with
initramfs-tools' lsinitramfs as the oracle; and against hostile images."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from kmodd.kmod.initramfs import InitramfsError, image_path, module_names, read_image
from tests import mkinitramfs
from tests.conftest import root_required
from tests.kerneltree import KernelTree

pytestmark = [
    root_required,
    pytest.mark.skipif(not mkinitramfs.available(), reason="needs initramfs-tools (make apt)"),
]


def leading(tree: KernelTree) -> tuple[str, ...]:
    """initramfs-tools 0.148 (Debian 13) stores already-compressed files (`.ko.xz`, `.zst`)
    in an uncompressed cpio ahead of the compressed main archive; 0.142 (Debian 12) and
    a `.ko` tree give the main archive alone."""
    splits = "__TMPUNCOMPRESSEDFILES" in Path(mkinitramfs.MKINITRAMFS).read_text()
    compressed = tree.module_file("fs/ext4/ext4").name.endswith((".xz", ".zst"))
    return ("cpio",) if splits and compressed else ()


@pytest.fixture(scope="module")
def zstd_image(kernel_tree: KernelTree, tmp_path_factory: pytest.TempPathFactory) -> Path:
    image, run = mkinitramfs.build(kernel_tree, tmp_path_factory.mktemp("zstd"))
    assert run.returncode == 0, run.stderr
    return image


@pytest.mark.parametrize("compress", ["gzip", "xz"])
def test_every_compression_lists_what_lsinitramfs_lists(
    kernel_tree: KernelTree, tmp_path: Path, compress: str
) -> None:
    image, run = mkinitramfs.build(kernel_tree, tmp_path, compress=compress)
    assert run.returncode == 0, run.stderr
    read = read_image(image)
    assert read.segments == (*leading(kernel_tree), compress)
    assert set(read.names) == mkinitramfs.lsinitramfs(image)


def test_zstd_image_names_and_kept_file(zstd_image: Path, kernel_tree: KernelTree) -> None:
    read = read_image(zstd_image, keep=["/usr/lib/modprobe.d/aliases.conf", "no/such/file"])
    assert read.segments == (*leading(kernel_tree), "zstd")
    assert set(read.names) == mkinitramfs.lsinitramfs(zstd_image)
    assert read.files == {
        "usr/lib/modprobe.d/aliases.conf": Path("/usr/lib/modprobe.d/aliases.conf").read_bytes()
    }
    assert "zstd: " in read.reader
    # MODULES=list with an empty list: the few modules the hooks add (dm_mod, psmouse ...)
    modules = module_names(read, kernel_tree.release)
    listed = {
        n.rsplit("/", 1)[-1].split(".ko")[0].replace("-", "_") for n in read.names if ".ko" in n
    }
    assert modules == listed and modules


def test_early_cpio_then_compressed_main(
    zstd_image: Path, kernel_tree: KernelTree, tmp_path: Path
) -> None:
    """The Debian layout with microcode: an uncompressed archive, then the main one."""
    early = tmp_path / "early"
    (early / "kernel/x86/microcode").mkdir(parents=True)
    (early / "kernel/x86/microcode/GenuineIntel.bin").write_bytes(b"\x01" * 1001)
    listing = subprocess.run(
        ["sh", "-c", "find . | cpio -o -H newc --quiet"],
        cwd=early,
        capture_output=True,
        check=True,
    ).stdout
    combined = tmp_path / "initrd.img"
    combined.write_bytes(listing + b"\0" * 512 + zstd_image.read_bytes())
    read = read_image(combined, keep=["kernel/x86/microcode/GenuineIntel.bin"])
    assert read.segments == ("cpio", *leading(kernel_tree), "zstd")
    assert read.files["kernel/x86/microcode/GenuineIntel.bin"] == b"\x01" * 1001
    assert set(read.names) == mkinitramfs.lsinitramfs(combined)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "^$"),  # an empty file is an empty image, not an error
        (b"hello world, not an initramfs", "unknown data"),
        (b"BZh91AY&SY" + b"\0" * 50, "bzip2-compressed"),
        (b"070701" + b"0" * 90 + b"FFFFFFFF" + b"0" * 8, "a name of"),
        (b"070701" + b"zz" * 52, "not hex"),
        (b"\x1f\x8b\x08\x00" + b"\xff" * 64, "corrupt compressed"),
    ],
)
def test_hostile_images(tmp_path: Path, data: bytes, message: str) -> None:
    path = tmp_path / "bad.img"
    path.write_bytes(data)
    if not data:
        assert read_image(path).names == frozenset()
        return
    with pytest.raises(InitramfsError, match=message):
        read_image(path)


def test_truncated_image_is_an_error(tmp_path: Path) -> None:
    """A real newc archive (cpio -o) cut in half (not mkinitramfs's: on Debian 13 its image
    starts with an uncompressed cpio, so `zstd -dc IMAGE` no longer applies)."""
    tree = tmp_path / "tree"
    (tree / "usr/lib").mkdir(parents=True)
    (tree / "usr/lib/blob").write_bytes(bytes(range(256)) * 64)
    whole = subprocess.run(
        ["sh", "-c", "find . | cpio -o -H newc --quiet"], cwd=tree, capture_output=True, check=True
    )
    path = tmp_path / "cut.img"
    path.write_bytes(whole.stdout[: len(whole.stdout) // 2])
    with pytest.raises(InitramfsError, match="ends inside"):
        read_image(path)


def test_image_path_prefers_the_debian_name(tmp_path: Path) -> None:
    assert image_path(tmp_path, "6.1.0-1-amd64") is None
    (tmp_path / "boot").mkdir()
    (tmp_path / "boot/initramfs-6.1.0-1-amd64.img").write_bytes(b"")
    assert image_path(tmp_path, "6.1.0-1-amd64") == tmp_path / "boot/initramfs-6.1.0-1-amd64.img"
    (tmp_path / "boot/initrd.img-6.1.0-1-amd64").write_bytes(b"")
    assert image_path(tmp_path, "6.1.0-1-amd64") == tmp_path / "boot/initrd.img-6.1.0-1-amd64"
