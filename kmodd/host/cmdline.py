"""The kernel command line's `kmodd.mode=` escape hatch, read once for daemon and kmodctl.

The text is read by kmodd.kmod.kcmdline.read_host_cmdline (libkmod's own bound and
encoding), the value parsed by kmodd.policy.engine.mode_override (pure, tested alone).
"""

from __future__ import annotations

from pathlib import Path

from kmodd.kmod.kcmdline import CMDLINE, read_host_cmdline
from kmodd.policy.engine import mode_override
from kmodd.policy.types import Mode

PROC_CMDLINE = Path(CMDLINE)


def read_mode_override(cmdline: Path = PROC_CMDLINE) -> Mode | None:
    """`kmodd.mode=` from CMDLINE (last one wins, unknown values ignored); None when the
    file is unreadable or says nothing."""
    return mode_override(read_host_cmdline(str(cmdline)))
