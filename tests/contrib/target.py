"""The Ansible test's target: a Debian chroot, built once per machine and copied per run.

`debootstrap --variant=minbase RELEASE` (this machine's own: bookworm, trixie) with python3
(Ansible's modules), python3-venv (the role's venv route), kmod and systemd (journalctl:
`kmodctl simulate` reads journals with it), cached in
/var/cache/kmodd-dev/ansible-target/rootfs-DIGEST (DIGEST: the release and package list;
~250 MB, ~80-150 s to build, reused after).  Each test session works on
a copy (`cp -a`, ~3 s) that is removed afterwards, so every session starts from a host
that has no kmodd.  An flock serializes builders; a base is built beside its final name
and renamed, so a half-built one is never used.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import IN_CI

CACHE = Path("/var/cache/kmodd-dev/ansible-target")


def this_release(os_release: Path = Path("/etc/os-release")) -> str:
    """VERSION_CODENAME of this machine: the target is the same Debian release, so the
    wheels built here (this Python's ABI: cp311 on Debian 12, cp313 on 13) install there.
    A bookworm target under Debian 13 got cp313 wheels: "No matching distribution found
    for PyYAML" (tools/test-debian13 found it)."""
    for line in os_release.read_text().splitlines():
        key, _, value = line.partition("=")
        if key == "VERSION_CODENAME" and value.strip('"'):
            return value.strip('"')
    raise RuntimeError(f"{os_release}: no VERSION_CODENAME (the target needs a release)")


RELEASE = this_release()
MIRROR = "http://deb.debian.org/debian"
PACKAGES = ("python3", "python3-venv", "kmod", "systemd")
BUILD_TIMEOUT_S = 1500  # debootstrap over a slow mirror; a hang fails, never eats CI
WHEEL_TIMEOUT_S = 900


@dataclass(frozen=True)
class Target:
    root: Path  # the chroot (the Ansible host)
    wheels: Path  # on the controller: wheels the role copies in (kmodd_wheels)


def _digest() -> str:
    return hashlib.sha256(f"{RELEASE} {' '.join(PACKAGES)}".encode()).hexdigest()[:16]


def _unavailable(why: str) -> None:
    if IN_CI:
        pytest.fail(f"ansible target unavailable in CI: {why}")
    pytest.skip(f"ansible target unavailable: {why}")


def _build(base: Path) -> None:
    if shutil.which("debootstrap") is None:
        _unavailable("debootstrap is missing (Makefile APT_PACKAGES installs it)")
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=CACHE))
    argv = ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}"]
    argv += [RELEASE, str(work / "rootfs"), MIRROR]
    proc = subprocess.run(
        argv, check=False, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S
    )
    if proc.returncode != 0:
        shutil.rmtree(work, ignore_errors=True)
        _unavailable(f"debootstrap failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    (work / "rootfs").rename(base)
    shutil.rmtree(work, ignore_errors=True)


def base_root() -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    base = CACHE / f"rootfs-{_digest()}"
    with (CACHE / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not base.is_dir():
            _build(base)
    return base


@contextlib.contextmanager
def ensure_target() -> Iterator[Target]:
    base = base_root()
    work = Path(tempfile.mkdtemp(prefix="run-", dir=CACHE))
    try:
        root = work / "rootfs"
        subprocess.run(["cp", "-a", str(base), str(root)], check=True, timeout=600)
        (work / "wheels").mkdir()
        yield Target(root, work / "wheels")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def wheels(repo: Path, dest: Path) -> None:
    """This checkout's wheel and its dependencies' (built here: systemd-python is an sdist)."""
    argv = [sys.executable, "-m", "pip", "wheel", "-q", "-w", str(dest), str(repo)]
    proc = subprocess.run(
        argv, check=False, capture_output=True, text=True, timeout=WHEEL_TIMEOUT_S
    )
    if proc.returncode != 0:
        _unavailable(f"pip wheel failed: {proc.stderr[-3000:]}")
