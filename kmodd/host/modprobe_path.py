"""The kernel's `kernel.modprobe` sysctl: point it at the helper, remember what it was,
notice tampering (whether the kernel uses it at all: kmodd.host.kconfig).

Pure mechanism: the daemon decides when to install (never with --root other than /), what
to log and whether to re-assert after tampering; `kmodctl uninstall` restores it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from kmodd import helper
from kmodd.atomic import write_atomic
from kmodd.errors import KmoddError

PROC_MODPROBE = Path("/proc/sys/kernel/modprobe")
PREVIOUS_FILE = "modprobe_path.previous"  # in the runtime dir, survives a daemon restart
KMOD_PATH_LEN = 256  # the kernel's buffer for modprobe_path, NUL included


class ModprobePathError(KmoddError):
    """kernel.modprobe could not be read or written, or the helper is not usable."""


class TamperKind(StrEnum):
    OURS = "ours"  # points at the helper
    CHANGED = "changed"  # somebody pointed it elsewhere
    UNAVAILABLE = "unavailable"  # no such sysctl (kernel without CONFIG_MODULES) or unreadable


@dataclass(frozen=True, slots=True)
class TamperState:
    kind: TamperKind
    current: str | None  # what the sysctl holds now; None when unavailable
    expected: str  # the helper path

    @property
    def ok(self) -> bool:
        return self.kind is TamperKind.OURS


def _check_helper(path: Path) -> None:
    # Pointing the kernel at a missing or non-executable file turns every autoload into a
    # silent failure, so refuse before touching the sysctl.
    text = str(path)
    if not path.is_absolute() or "\n" in text or len(text.encode()) >= KMOD_PATH_LEN:
        raise ModprobePathError(
            f"unusable helper path {text!r}",
            hint=f"an absolute path shorter than {KMOD_PATH_LEN} bytes",
        )
    # Mode bits, not os.access: for root, X_OK is true as soon as any x bit is set.
    if not path.is_file() or not path.stat().st_mode & 0o111:
        raise ModprobePathError(
            f"helper {path} is missing or not executable",
            hint="run `kmodctl install` first",
        )


class ModprobePath:
    """Manages /proc/sys/kernel/modprobe (injectable `proc_path` for tests).

    `state_dir` (the runtime dir) keeps the value we replaced, so that a restarted daemon
    or `kmodctl uninstall` restores the admin's value rather than ours.
    """

    def __init__(
        self, helper_path: Path, state_dir: Path, *, proc_path: Path = PROC_MODPROBE
    ) -> None:
        self.helper_path = helper_path
        self.proc_path = proc_path
        self.previous_file = state_dir / PREVIOUS_FILE

    @property
    def available(self) -> bool:
        return self.proc_path.is_file()

    def read(self) -> str:
        try:
            return self.proc_path.read_text(errors="replace").rstrip("\n")
        except OSError as err:
            raise ModprobePathError(
                f"cannot read {self.proc_path}: {err.strerror}",
                hint="the kernel has no module support (CONFIG_MODULES is not set)",
            ) from err

    def _write(self, value: str) -> None:
        try:
            fd = os.open(self.proc_path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
            try:
                os.write(fd, value.encode() + b"\n")
            finally:
                os.close(fd)
        except OSError as err:
            raise ModprobePathError(
                f"cannot write {self.proc_path}: {err.strerror}",
                hint="needs root (CAP_SYS_ADMIN) and a writable /proc/sys",
            ) from err

    def previous(self) -> str | None:
        """The value we replaced, as remembered in the runtime dir."""
        try:
            text = self.previous_file.read_text().strip()
        except OSError:
            return None
        return text if text.startswith("/") else None

    def install(self) -> str:
        """Point kernel.modprobe at the helper; returns the remembered previous value.

        Idempotent: if it already points at us (restart, or the sysctl.d drop-in at boot)
        the remembered value is kept, else the kernel default is assumed.
        """
        _check_helper(self.helper_path)
        current = self.read()
        ours = str(self.helper_path)
        if not current.strip():
            # An empty modprobe_path is the admin switching autoload off altogether; the
            # helper would switch it back on (with a policy, but still on).
            raise ModprobePathError(
                "kernel.modprobe is empty: kernel module autoload is disabled, kmodd leaves "
                "it so (the rendered modprobe.d file still applies)",
                hint="to autoload through the kmodd helper, set kernel.modprobe to "
                f"{helper.DEFAULT_MODPROBE} and restart kmodd",
            )
        if current != ours:
            self.previous_file.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            write_atomic(self.previous_file, (current + "\n").encode())
            self._write(ours)
        return self.previous() or helper.DEFAULT_MODPROBE

    def restore(self) -> str | None:
        """Put back the remembered value (default /sbin/modprobe) if it still points at
        us; returns what was written, None when someone else changed it meanwhile."""
        if not self.available or self.read() != str(self.helper_path):
            return None
        value = self.previous() or helper.DEFAULT_MODPROBE
        if value == str(self.helper_path):
            value = helper.DEFAULT_MODPROBE
        self._write(value)
        self.previous_file.unlink(missing_ok=True)
        return value

    def check(self) -> TamperState:
        """Does kernel.modprobe still point at the helper?  Never raises."""
        expected = str(self.helper_path)
        try:
            current = self.read()
        except ModprobePathError:
            return TamperState(TamperKind.UNAVAILABLE, None, expected)
        kind = TamperKind.OURS if current == expected else TamperKind.CHANGED
        return TamperState(kind, current, expected)
