"""What the daemon's threads tell its core.  Watcher, udev and signal sources only *post*
these to one queue; the core thread owns all state (design §4)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from kmodd.bpf.layout import KernelEvent


class ReloadCause(StrEnum):
    START = "start"
    SIGNAL = "signal"  # SIGHUP (systemctl reload)
    CONTROL = "control"  # kmodctl reload
    WATCH = "watch"  # a watched file changed (the detail names them)


class UdevAction(StrEnum):
    ADD = "add"  # an add uevent
    COLDPLUG = "coldplug"  # present at start (or after a lost monitor), read from sysfs
    REMOVE = "remove"  # gone: only devpath is set


@dataclass(frozen=True, slots=True)
class FilesChanged:
    """Debounced: one event per burst, naming what changed (for the log only: the core
    always rescans everything)."""

    paths: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class UdevDevice:
    """A device that wants a module (an `add` uevent or a coldplugged device), or one that
    went away (`remove`: only devpath is set)."""

    action: UdevAction
    devpath: str
    subsystem: str
    modalias: str
    seqnum: int = 0


@dataclass(frozen=True, slots=True)
class UdevLost:
    """The monitor failed (e.g. ENOBUFS: events were dropped); it has been recreated and the
    core should re-coldplug."""

    reason: str


@dataclass(frozen=True, slots=True)
class ReloadRequested:
    cause: ReloadCause
    # Called by the core with the outcome (None on success, else the error text); used by
    # the control socket to answer `kmodctl reload` only when the new generation is live.
    reply: Callable[[str | None], None] | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class Stop:
    reason: str


@dataclass(frozen=True, slots=True)
class KernelEvents:
    """What the kernel layer's hooks saw (daemon/kernel_layer.py's reader thread)."""

    events: tuple[KernelEvent, ...]


Event = FilesChanged | UdevDevice | UdevLost | ReloadRequested | Stop | KernelEvents
Post = Callable[[Event], None]
