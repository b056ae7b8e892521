"""The first generation build as systemd sees it: asking for time, stopping promptly.

The first build resolves every policy name against the module tree: ~0.5 s natively,
but 13-17 s in an emulated boot and 265-618 s under TCG on a busy host (docs/vm.md).
Built on the main thread, it could neither ask systemd for more time (TimeoutStartSec=
killed it, Restart= started it again: 13 restarts in 2 minutes, issue 14) nor act on
SIGTERM before it finished (the policy went live 7 s after systemd said stop).  So it
runs on a builder thread while the main thread

- sends `EXTEND_TIMEOUT_USEC=` every EXTEND_EVERY_S, each granting EXTEND_BY_S from now
  (three missed sends before systemd's deadline: a stalled main thread is still caught);
- gives up after START_CAP_S (default; --start-cap), loudly, with EXIT_START_GAVE_UP, which
  kmodd.service does not restart (RestartPreventExitStatus=): a build that slow will be
  as slow next time, and the boot step's or the snapshot's enforcement stays in place;
- returns at once on SIGTERM/SIGINT (any time: the signal handler posts Stop).

Half a generation is never published: the builder publishes only through the CommitGate,
and stopping closes the gate (waiting at most COMMIT_WAIT_S for a publish already under
way, which takes milliseconds: two atomic renames and the store's manifest), so either the
whole generation was committed before the daemon exits, or nothing of it is.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum

from kmodd.errors import KmoddError

EXTEND_EVERY_S = 5.0
EXTEND_BY_S = 15.0
# Sent by the `kmodd` command before it imports the daemon (kmodd.daemon.entry): that
# import took 12 s under TCG and 50 s at load 7 (docs/vm.md), near TimeoutStartSec=60s.
IMPORT_EXTEND_S = 120.0
START_CAP_S = 1200.0  # 2x the slowest first build seen (618 s, TCG on a busy host)
COMMIT_WAIT_S = 5.0  # a publish in progress: two renames and a manifest, ~10 ms
EXIT_START_GAVE_UP = 75  # EX_TEMPFAIL; kmodd.service: RestartPreventExitStatus=75 78


class BuildCancelled(KmoddError):
    """The daemon is stopping: this build must not publish anything."""


class CommitGate:
    """Publish everything of a generation, or nothing: the builder commits through
    `commit()`, the stopping main thread calls `close()`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._closed = False
        self.committed = 0  # commits that ended (the stopping daemon says whether any did)

    @property
    def closed(self) -> bool:
        return self._closed

    @contextlib.contextmanager
    def commit(self) -> Iterator[None]:
        with self._lock:
            if self._closed:
                raise BuildCancelled(
                    "kmodd is stopping: the generation built is not published",
                    hint="start kmodd again to build and publish it",
                )
            yield
            self.committed += 1

    def close(self, timeout: float = COMMIT_WAIT_S) -> bool:
        """No commit after this; False when one in progress did not end within TIMEOUT."""
        got = self._lock.acquire(timeout=timeout)
        self._closed = True
        if got:
            self._lock.release()
        return got


@dataclass(frozen=True, slots=True)
class StartLimits:
    every_s: float = EXTEND_EVERY_S
    extend_s: float = EXTEND_BY_S
    cap_s: float = START_CAP_S

    def extend_usec(self) -> int:
        return int(self.extend_s * 1_000_000)


class StartOutcome(StrEnum):
    BUILT = "built"  # the first build ended (a generation, or errors: the core decides)
    STOPPED = "stopped"  # SIGTERM/SIGINT came first
    GAVE_UP = "gave-up"  # START_CAP_S passed


def wait_for_first(
    limits: StartLimits,
    clock: Callable[[], float],
    wait: Callable[[float], StartOutcome | None],
    extend: Callable[[int], object],
) -> StartOutcome:
    """Until WAIT reports an outcome (StartOutcome.BUILT / STOPPED), calling EXTEND every
    limits.every_s; StartOutcome.GAVE_UP after limits.cap_s.  WAIT(timeout) blocks for at most
    TIMEOUT and returns None when nothing happened."""
    start = clock()
    while True:
        now = clock()
        if now - start >= limits.cap_s:
            return StartOutcome.GAVE_UP
        extend(limits.extend_usec())
        found = wait(min(limits.every_s, max(0.0, start + limits.cap_s - now)))
        if found is not None:
            return found
