"""sd_notify from a thread of its own.

The service manager reads NOTIFY_SOCKET datagrams; a unix datagram socket queues only
net.unix.max_dgram_qlen (10 by default) unread messages, after which a send blocks.  A
manager that stops reading (hung PID 1, a test harness that only waited for READY=1)
must not freeze the core, which answers the kernel: the core hands each message to this
relay and goes on.  Order is kept (one thread); a full relay, or a datagram the
manager's full queue refuses, is dropped and counted.  If the
core itself hangs it stops handing over WATCHDOG=1, so the watchdog still catches it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from kmodd.daemon.ports import NotifierLike

RELAY_MAX = 64


class NotifyRelay:
    def __init__(self, notifier: NotifierLike, maxsize: int = RELAY_MAX) -> None:
        self._notifier = notifier
        self._queue: queue.SimpleQueue[Callable[[], object] | None] = queue.SimpleQueue()
        self._maxsize = maxsize
        self._thread = threading.Thread(target=self._run, name="kmodd-notify", daemon=True)
        self.dropped = 0

    @property
    def watchdog_ping_interval_s(self) -> float | None:
        return self._notifier.watchdog_ping_interval_s

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Send what is queued (STOPPING=1 last), waiting at most TIMEOUT."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)

    def _hand_over(self, send: Callable[[], object]) -> bool:
        if self._queue.qsize() >= self._maxsize:
            self.dropped += 1
            return False
        self._queue.put(send)
        return True

    def _run(self) -> None:
        while (send := self._queue.get()) is not None:
            # The notifier's socket is non-blocking: a manager that stopped reading makes
            # the send fail (EAGAIN) rather than wait; that is a drop too.
            if send() is False:
                self.dropped += 1

    def ready(self, status: str) -> bool:
        return self._hand_over(lambda: self._notifier.ready(status))

    def reloading(self) -> bool:
        return self._hand_over(self._notifier.reloading)

    def status(self, text: str) -> bool:
        return self._hand_over(lambda: self._notifier.status(text))

    def watchdog(self) -> bool:
        return self._hand_over(self._notifier.watchdog)

    def stopping(self, status: str | None = None) -> bool:
        return self._hand_over(lambda: self._notifier.stopping(status))
