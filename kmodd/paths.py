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
# Where `kmodctl install` puts the helper and what kernel.modprobe points at (the sysctl.d
# drop-in, the daemon's --helper-path default, the deny stub of the rendered file).
HELPER_PATH = "/usr/local/libexec/kmodd/kmodd-modprobe"


class NoKernelError(KmoddError):
    """No usable lib/modules/RELEASE under the root."""


@dataclass(frozen=True, slots=True)
class Paths:
    root: Path
    release: str
    runtime_dir: Path

    @property
    def module_dir(self) -> Path:
        return self.root / "lib/modules" / self.release

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
    """`uname -r` for the live root, else the only release under ROOT/lib/modules."""
    if root == Path("/"):
        return os.uname().release
    modules = root / "lib/modules"
    releases = sorted(p.name for p in modules.iterdir() if p.is_dir()) if modules.is_dir() else []
    if len(releases) == 1:
        return releases[0]
    found = ", ".join(releases) or "none"
    raise NoKernelError(
        f"cannot pick a kernel release under {modules} (found: {found})",
        hint="name one with --kernel RELEASE",
    )


def make_paths(
    root: str | Path = "/", release: str | None = None, runtime_dir: str | Path | None = None
) -> Paths:
    root = Path(root)
    if runtime_dir is None:
        runtime_dir = os.environ.get(helper.RUNTIME_DIR_ENV) or helper.RUNTIME_DIR
    return Paths(root=root, release=release or default_release(root), runtime_dir=Path(runtime_dir))
