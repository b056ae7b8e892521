"""What this kernel's tracefs offers for attribution: the module_request event, lockdown.

A probe only: it creates nothing (kmodctl explain and status ask it; the daemon's
Attributor then sets up its own instance, kmodd.daemon.attribution).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kmodd.host.proc import read_bounded

TRACEFS_ROOTS = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))
EVENT_DIR = "events/module/module_request"
LOCKDOWN = Path("/sys/kernel/security/lockdown")


@dataclass(frozen=True, slots=True)
class Availability:
    """What attribution can do here; `reason` says why not when it cannot."""

    tracefs: str | None  # the mounted tracefs root, None if none was found
    event: bool  # events/module/module_request exists (CONFIG_MODULES + tracepoints)
    instance: bool  # our instance is set up and its reader runs
    lockdown: str | None  # the active lockdown level, None if the LSM is absent
    reason: str | None = None

    @property
    def available(self) -> bool:
        return self.instance

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "available": self.available}


def lockdown_level(path: Path = LOCKDOWN) -> str | None:
    """The bracketed level of `none [integrity] confidentiality`, or None."""
    text = read_bounded(path)
    if text is None:
        return None
    m = re.search(r"\[(\w+)\]", text)
    return m[1] if m else None


def find_tracefs(roots: tuple[Path, ...] = TRACEFS_ROOTS) -> Path | None:
    """The first root that is a mounted tracefs (it has `instances` and `events`)."""
    for root in roots:
        if (root / "instances").is_dir() and (root / "events").is_dir():
            return root
    return None


def probe(roots: tuple[Path, ...] = TRACEFS_ROOTS, lockdown: Path = LOCKDOWN) -> Availability:
    """What this kernel offers, without creating anything (kmodctl explain, status)."""
    level = lockdown_level(lockdown)
    root = find_tracefs(roots)
    if root is None:
        why = "tracefs is not mounted (mount -t tracefs nodev /sys/kernel/tracing)"
        if level == "confidentiality":
            why = "kernel lockdown=confidentiality forbids tracefs"
        return Availability(None, False, False, level, why)
    event = (root / EVENT_DIR / "enable").exists()
    why = "attribution is not running"
    if not event:
        why = "no module:module_request event (a kernel without module support?)"
    return Availability(str(root), event, False, level, why)
