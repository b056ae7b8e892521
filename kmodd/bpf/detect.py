"""Can the kernel layer enforce here?  (active, reason) for the status `layers.kernel`.

Loading and attaching a BPF LSM program succeed even when `bpf` is not among the active
LSMs -- the program then never runs (anchors-2026-12.md §1.2, gotcha 1) -- so attaching
proves nothing: the active list in securityfs is what counts.  Stdlib only and cheap
(three small reads), so `kmodctl status` can call it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

LSM_FILE = "sys/kernel/security/lsm"
LOCKDOWN_FILE = "sys/kernel/security/lockdown"
BTF_FILE = "sys/kernel/btf/vmlinux"


@dataclass(frozen=True, slots=True)
class Support:
    active: bool
    reason: str


def parse_lsm(text: str) -> tuple[str, ...]:
    """'lockdown,capability,…,bpf' -> the LSM names, in the kernel's order."""
    return tuple(name for name in text.strip().split(",") if name)


def parse_lockdown(text: str) -> str | None:
    """'none [integrity] confidentiality' -> 'integrity' (the bracketed one)."""
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return None


def lsm_line(active: tuple[str, ...], configured: tuple[str, ...] = ()) -> str:
    """The `lsm=` kernel parameter that keeps today's LSMs and adds bpf: the kernel's
    CONFIG_LSM order when known (it names `integrity`, which the runtime list omits),
    else the active list.  `capability` is always first and never listed; `lsm=`
    replaces the whole list, so `lsm=bpf` alone would drop AppArmor or SELinux."""
    names = [name for name in configured or active if name not in ("capability", "bpf")]
    return "lsm=" + ",".join([*names, "bpf"])


def config_lsm(text: str) -> tuple[str, ...]:
    """CONFIG_LSM="a,b,c" from a kernel config, or ()."""
    for line in text.splitlines():
        if line.startswith("CONFIG_LSM="):
            return parse_lsm(line.split("=", 1)[1].strip('"'))
    return ()


def _configured(root: Path) -> tuple[str, ...]:
    try:
        return config_lsm((root / "boot" / f"config-{os.uname().release}").read_text())
    except OSError:
        return ()


def detect(root: Path = Path("/")) -> Support:
    """Whether a BPF LSM program would run and could be loaded (not whether kmodd's is)."""
    try:
        lsms = parse_lsm((root / LSM_FILE).read_text())
    except OSError as err:
        return Support(
            False,
            f"cannot read /{LSM_FILE} ({err.strerror}): securityfs not mounted, or no LSM "
            "support, so whether the bpf LSM runs is unknown",
        )
    if "bpf" not in lsms:
        return Support(
            False,
            f"bpf is not an active LSM ({','.join(lsms)}): a BPF LSM program would attach "
            f"but never run; add `{lsm_line(lsms, _configured(root))}` to the kernel command "
            "line and reboot",
        )
    if not (root / BTF_FILE).exists():
        return Support(
            False, f"no kernel BTF (/{BTF_FILE}): the kernel needs CONFIG_DEBUG_INFO_BTF"
        )
    try:
        lockdown = parse_lockdown((root / LOCKDOWN_FILE).read_text())
    except OSError:
        lockdown = None  # no lockdown LSM: nothing forbids bpf()
    if lockdown == "confidentiality":
        return Support(
            False,
            "kernel lockdown=confidentiality forbids the BPF helpers that read kernel "
            "memory (LOCKDOWN_BPF_READ_KERNEL); the kernel layer cannot load",
        )
    return Support(True, f"bpf is an active LSM, BTF present, lockdown {lockdown or 'none'}")
