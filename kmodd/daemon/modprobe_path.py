"""The kernel's `kernel.modprobe` sysctl: point it at the helper, remember what it was,
notice tampering, and tell when the kernel ignores it (CONFIG_STATIC_USERMODEHELPER).

Pure mechanism: the core decides when to install (never with --root other than /), what to
log and whether to re-assert after tampering.
"""

from __future__ import annotations

import gzip
import os
import secrets
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from kmodd import helper
from kmodd.errors import KmoddError

PROC_MODPROBE = Path("/proc/sys/kernel/modprobe")
PROC_CONFIG = Path("/proc/config.gz")  # CONFIG_IKCONFIG_PROC kernels
PREVIOUS_FILE = "modprobe_path.previous"  # in the runtime dir, survives a daemon restart
KMOD_PATH_LEN = 256  # the kernel's buffer for modprobe_path, NUL included
CONFIG_READ_MAX = 16 << 20  # a kernel .config is ~250 KiB; refuse anything absurd


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


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    # O_EXCL|O_NOFOLLOW: a planted symlink in the runtime dir cannot redirect the write.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
            _write_atomic(self.previous_file, current + "\n")
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


def _config_text(release: str, root: Path, proc_config: Path) -> str | None:
    boot = root / "boot" / f"config-{release}"
    try:
        if boot.is_file():
            with boot.open("rb") as raw:
                return raw.read(CONFIG_READ_MAX).decode(errors="replace")
        if root == Path("/") and proc_config.is_file():
            with gzip.open(proc_config, "rb") as raw:
                return raw.read(CONFIG_READ_MAX).decode(errors="replace")
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    return None


def kernel_config(
    release: str, root: Path, *, proc_config: Path = PROC_CONFIG
) -> dict[str, str] | None:
    """CONFIG_* = value from ROOT/boot/config-RELEASE, else (live root) /proc/config.gz."""
    text = _config_text(release, root, proc_config)
    if text is None:
        return None
    options: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.startswith("CONFIG_"):
            options[key] = value.strip().strip('"')
    return options


def static_usermodehelper(
    release: str, root: Path, *, proc_config: Path = PROC_CONFIG
) -> str | None:
    """A plain warning when CONFIG_STATIC_USERMODEHELPER=y, else None (also when the
    kernel config cannot be found: absence of evidence is reported by the caller)."""
    options = kernel_config(release, root, proc_config=proc_config)
    if options is None or options.get("CONFIG_STATIC_USERMODEHELPER") != "y":
        return None
    target = options.get("CONFIG_STATIC_USERMODEHELPER_PATH", "")
    via = f"through {target}" if target else "nowhere (the path is empty: autoload is off)"
    return (
        f"kernel {release} is built with CONFIG_STATIC_USERMODEHELPER=y: every usermode "
        f"helper call goes {via}, so kernel module autoload bypasses kernel.modprobe and "
        "the kmodd helper; only the rendered modprobe.d file and udev visibility apply"
    )
