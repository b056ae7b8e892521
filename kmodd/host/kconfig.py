"""The kernel's build configuration (ROOT/boot/config-RELEASE or /proc/config.gz), and
what it says about kmodd: CONFIG_STATIC_USERMODEHELPER makes kernel.modprobe moot."""

from __future__ import annotations

import gzip
from pathlib import Path

PROC_CONFIG = Path("/proc/config.gz")  # CONFIG_IKCONFIG_PROC kernels
CONFIG_READ_MAX = 16 << 20  # a kernel .config is ~250 KiB; refuse anything absurd


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
