"""Fixtures of the real-boot suite: one image per release (cached outside the checkout),
three boots of it (tests/realboot/test_realboot.py says which scenario runs in which)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.realboot import image as image_mod
from tests.realboot.qemu import Boot, available, boot, extract_file

RELEASE = os.environ.get("KMODD_REALBOOT_RELEASE", "bookworm")
ROUTE = os.environ.get("KMODD_REALBOOT_INSTALL", "venv")  # or deb (Debian 13's package)


@pytest.fixture(scope="session")
def realboot_image() -> image_mod.Image:
    why = available()
    if why is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"real-boot image unavailable in CI: {why}")
        pytest.skip(f"real-boot image unavailable: {why}")
    return image_mod.build_image(RELEASE, ROUTE)


@pytest.fixture(scope="session")
def realboot_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    # Sparse root disks of ~2 GiB apparent size each; /var/tmp, not a small /tmp tmpfs.
    base = Path(os.environ.get("KMODD_REALBOOT_WORK", "/var/tmp"))
    path = tmp_path_factory.mktemp("realboot") if not base.is_dir() else base
    work = path / f"kmodd-realboot-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    yield work
    if os.environ.get("KMODD_REALBOOT_KEEP") != "1":
        for f in work.glob("*.disk.raw"):
            f.unlink()


def _keep(b: Boot, work: Path) -> Boot:
    (work / f"{b.plan}.results.json").write_text(json.dumps(b.results, indent=1))
    return b


@pytest.fixture(scope="session")
def first_boot(realboot_image: image_mod.Image, realboot_dir: Path) -> Boot:
    return _keep(boot(realboot_image, "first", realboot_dir, timeout_s=1800), realboot_dir)


@pytest.fixture(scope="session")
def second_boot(realboot_image: image_mod.Image, realboot_dir: Path, first_boot: Boot) -> Boot:
    # The same machine again: boot 1's disk, and the initramfs its update-initramfs built.
    rel = realboot_image.kernel_release
    initrd = extract_file(first_boot.disk, f"/boot/initrd.img-{rel}", realboot_dir / "initrd2")
    b = boot(
        realboot_image, "second", realboot_dir, disk=first_boot.disk, initrd=initrd, timeout_s=720
    )
    return _keep(b, realboot_dir)


@pytest.fixture(scope="session")
def broken_boot(realboot_image: image_mod.Image, realboot_dir: Path) -> Boot:
    b = boot(realboot_image, "broken", realboot_dir, append="kmodd.mode=permissive", timeout_s=720)
    return _keep(b, realboot_dir)
