"""A read-only view of the core's state, for the status document and control methods.

status.py and control.py get this (and the Decider), never the Core: they cannot change
what the core owns, and the core imports them without a circle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kmodd.contract.status import DecisionCounters, LastGoodInfo
from kmodd.daemon.events import ReloadCause, UdevDevice
from kmodd.daemon.generation import Generation
from kmodd.daemon.ports import KernelLike, TamperLike, UdevLike, WatcherLike
from kmodd.paths import Paths
from kmodd.policy.engine import Decision
from kmodd.policy.types import Source


@dataclass(frozen=True, slots=True)
class ReloadResult:
    ok: bool
    cause: ReloadCause
    detail: str  # what changed (watch: the paths), "" otherwise
    at: float  # wall clock
    duration_s: float
    generation: int | None  # the new one on success, the kept one on failure
    errors: tuple[str, ...] = ()

    @property
    def cause_text(self) -> str:
        """As KMODD_RELOAD_CAUSE and status say it: `watch: PATHS`, `control`, ..."""
        return f"{self.cause.value}: {self.detail}" if self.detail else self.cause.value


@dataclass(frozen=True, slots=True)
class CoreView:
    started: float
    paths: Paths
    generation: Generation | None
    last_reload: ReloadResult | None
    decisions: DecisionCounters
    journal_dropped: int
    journal_failed: int
    server_overflows: int
    notify_dropped: int
    modprobe_managed: bool  # the daemon manages kernel.modprobe
    tamper: TamperLike | None  # its last check
    static_usermodehelper: str | None  # why the kernel ignores kernel.modprobe
    devices: tuple[UdevDevice, ...]
    notes: tuple[str, ...]
    udev: UdevLike | None
    watcher: WatcherLike | None
    kernel: KernelLike | None  # the BPF LSM layer; None: not started
    last_good: LastGoodInfo | None  # the persisted store; None: a core without one
    decide: Callable[[str, Source], Decision | None]  # the Decider's, uncounted
    # (outcome, rule, source, enforcing layers) -> decisions: the metrics file's rows
    decisions_by_layer: tuple[tuple[tuple[str, str, str, tuple[str, ...]], int], ...] = ()
