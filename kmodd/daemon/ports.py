"""What the core needs of its I/O edges, as Protocols: the composition root (daemon/main.py)
injects the real ones, tests inject fakes, and no edge module imports the core."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from kmodd.host.sysmodule import SYS_MODULE

if TYPE_CHECKING:  # lastgood builds generations: ports stay below it
    from kmodd.contract.journal import Record
    from kmodd.contract.status import LayerState
    from kmodd.daemon.events import KernelEvents
    from kmodd.daemon.generation import Generation
    from kmodd.daemon.lastgood import LastGood


class NotifierLike(Protocol):
    def ready(self, status: str) -> bool: ...
    def reloading(self) -> bool: ...
    def status(self, text: str) -> bool: ...
    def extend_timeout(self, usec: int, status: str | None = None) -> bool: ...
    def watchdog(self) -> bool: ...
    def stopping(self, status: str | None = None) -> bool: ...
    @property
    def watchdog_ping_interval_s(self) -> float | None: ...
    @property
    def dropped(self) -> int: ...  # messages the manager did not take (status)


class TamperLike(Protocol):
    @property
    def ok(self) -> bool: ...
    @property
    def current(self) -> str | None: ...
    @property
    def expected(self) -> str: ...


class ModprobePathLike(Protocol):
    def check(self) -> TamperLike: ...
    def install(self) -> str: ...


class UdevCountersLike(Protocol):
    @property
    def events(self) -> int: ...
    @property
    def skipped(self) -> int: ...
    @property
    def lost(self) -> int: ...


class UdevLike(Protocol):
    """The running uevent monitor (daemon/udev.py UdevSource)."""

    @property
    def source(self) -> str: ...
    @property
    def counters(self) -> UdevCountersLike: ...


class WatcherLike(Protocol):
    """The running file watcher (daemon/watch.py Watcher)."""

    @property
    def errors(self) -> int: ...


class KernelLike(Protocol):
    """The kernel layer (daemon/kernel_layer.py KernelEdge)."""

    def apply(self, gen: Generation) -> None: ...
    def records(self, batch: KernelEvents, gen: Generation | None) -> list[Record]: ...
    def state(self) -> LayerState: ...
    def decided_in_kernel(self, name: str, generation: int) -> bool: ...
    def unknown_why(self, name: str) -> str: ...


@dataclass
class Edges:
    """The I/O edges the composition root injects (None: not available / disabled)."""

    notifier: NotifierLike
    modprobe_path: ModprobePathLike | None = None
    recoldplug: Callable[[], None] | None = None
    reassert: bool = False  # re-point kernel.modprobe at the helper after tampering
    last_good: LastGood | None = None  # the persisted store (kmodd.daemon.lastgood)
    udev: UdevLike | None = None  # the running uevent monitor
    watcher: WatcherLike | None = None  # the running file watcher
    kernel: KernelLike | None = None  # the BPF LSM layer (daemon/kernel_layer.py)
    static_usermodehelper: str | None = None  # the kernel bypasses kernel.modprobe: why
    sys_module: Path = SYS_MODULE  # which modules are loaded (udev "already loaded" records)
    clock: Callable[[], float] = time.monotonic
