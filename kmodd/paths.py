"""Every system path kmodd reads or writes, relative to a root (`--root`, default /)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kmodd import bootpublish, helper
from kmodd.errors import KmoddError

# kmod's precedence (libkmod default_config_paths): the first directory holding a
# basename wins; files are then applied in strcmp order of their basenames.  Policy
# drop-ins, lowest to highest: a higher dir replaces the same basename.  Both lists, the
# enforcement file and the last-good store live in kmodd/bootpublish.py (the boot step
# digests the same dirs and may import nothing from kmodd).
MODPROBE_D_DIRS = bootpublish.MODPROBE_D_DIRS
POLICY_DIRS = bootpublish.POLICY_DIRS
ENFORCEMENT_FILE = bootpublish.ENFORCEMENT_FILE
# In the runtime dir: an empty 00-kmodd.conf that hides our own enforcement file from the
# daemon's decisions (kmodd.daemon.generation); `kmodctl uninstall` removes it.
MASK_DIR = "kmod-mask"
# Where the helper and the boot step live: /usr/libexec/kmodd for the Debian package (a
# distribution's files, FHS 4.7), /usr/local/libexec/kmodd for `kmodctl install` from a
# venv (a local install, FHS 4.9).  Which one this copy uses follows from where it is
# installed: dpkg puts Python packages in /usr/lib/python3/dist-packages, where pip never
# writes (pip: a venv, or /usr/local/lib/python3.X/dist-packages).
LOCAL_LIBEXEC = "/usr/local/libexec/kmodd"
PACKAGE_LIBEXEC = "/usr/libexec/kmodd"
PACKAGE_SITE = Path("/usr/lib/python3/dist-packages")
HELPER_NAME = "kmodd-modprobe"


def libexec_dir(package_dir: Path) -> str:
    """PACKAGE_LIBEXEC when PACKAGE_DIR (the kmodd package) was installed by dpkg."""
    return PACKAGE_LIBEXEC if package_dir.is_relative_to(PACKAGE_SITE) else LOCAL_LIBEXEC


LIBEXEC_DIR = libexec_dir(Path(__file__).resolve().parent)
PACKAGED = LIBEXEC_DIR == PACKAGE_LIBEXEC  # kmodd came from the Debian package
# What kernel.modprobe points at (the daemon's --helper-path default, the deny stub of the
# rendered file, what `kmodctl verify` and `status` expect).
HELPER_PATH = f"{LIBEXEC_DIR}/{HELPER_NAME}"
# Where a root keeps its kernels' modules, in the order kmodd looks: lib/modules (kmod 30
# and Debian's kmod 34.2 are built with /lib/modules), then usr/lib/modules (kmod >= 32
# can be built so; Debian 13's merged-/usr kernel packages, extracted, have only that).
MODULE_BASES = ("lib/modules", "usr/lib/modules")


def module_base(root: Path, release: str) -> str:
    """MODULE_BASES entry holding ROOT's RELEASE (the first if none does)."""
    for base in MODULE_BASES:
        if (root / base / release).is_dir():
            return base
    return MODULE_BASES[0]


def base_note(base: str) -> str:
    """What status/explain/cmdline append to the module dir: "" for lib/modules, else
    which base a merged-/usr root (Debian 13's extracted kernel packages) was read from."""
    return "" if base == MODULE_BASES[0] else f" (no {MODULE_BASES[0]}: using {base})"


class NoKernelError(KmoddError):
    """No usable lib/modules/RELEASE under the root."""


@dataclass(frozen=True, slots=True)
class Paths:
    root: Path
    release: str
    runtime_dir: Path

    @property
    def module_dir(self) -> Path:
        """ROOT/lib/modules/RELEASE, or ROOT/usr/lib/modules/RELEASE when only that exists."""
        return self.root / module_base(self.root, self.release) / self.release

    @property
    def module_base(self) -> str:
        """The MODULE_BASES entry module_dir is under (said in status and explain)."""
        return module_base(self.root, self.release)

    @property
    def modprobe_d_dirs(self) -> tuple[Path, ...]:
        return tuple(self.root / d for d in MODPROBE_D_DIRS)

    @property
    def policy_dirs(self) -> tuple[Path, ...]:
        return tuple(self.root / d for d in POLICY_DIRS)

    @property
    def enforcement_file(self) -> Path:
        return self.root / ENFORCEMENT_FILE

    @property
    def store_dir(self) -> Path:
        """The last good generation, persisted outside /run (kmodd.daemon.persist)."""
        return self.root / bootpublish.STORE_DIR

    @property
    def decide_socket(self) -> Path:
        return self.runtime_dir / helper.DECIDE_SOCKET

    @property
    def control_socket(self) -> Path:
        return self.runtime_dir / helper.CONTROL_SOCKET

    @property
    def snapshot(self) -> Path:
        return self.runtime_dir / helper.SNAPSHOT_FILE


def default_release(root: Path) -> str:
    """`uname -r` for the live root, else the only release under ROOT/lib/modules (or,
    when that has none, ROOT/usr/lib/modules)."""
    if root == Path("/"):
        return os.uname().release
    for base in MODULE_BASES:
        modules = root / base
        found = sorted(p.name for p in modules.iterdir() if p.is_dir()) if modules.is_dir() else []
        if found:
            break
    if len(found) == 1:
        return found[0]
    names = ", ".join(found) or "none"
    where = " or ".join(str(root / b) for b in MODULE_BASES)
    raise NoKernelError(
        f"cannot pick a kernel release under {where} (found: {names})",
        hint="name one with --kernel RELEASE",
    )


def make_paths(
    root: str | Path = "/", release: str | None = None, runtime_dir: str | Path | None = None
) -> Paths:
    root = Path(root)
    if runtime_dir is None:
        runtime_dir = os.environ.get(helper.RUNTIME_DIR_ENV) or helper.RUNTIME_DIR
    return Paths(root=root, release=release or default_release(root), runtime_dir=Path(runtime_dir))
