"""sd_notify(3) for the daemon: READY / RELOADING / STATUS / WATCHDOG / STOPPING /
EXTEND_TIMEOUT_USEC.

A direct AF_UNIX datagram to $NOTIFY_SOCKET (stdlib only): systemd.daemon.notify() would do
the same, but its `unset_environment` leaves os.environ stale and it cannot tell us why a
send failed.  Without NOTIFY_SOCKET (not started by systemd, tests) every call is a no-op
that returns False.  A failed send is never fatal: systemd then times the unit out or
kills it for a missed watchdog, which is the right outcome for a daemon it cannot hear.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass

# systemd reads at most one datagram of this size (NOTIFY_BUFFER_MAX is 4 KiB); STATUS= is
# a human line, so we cut it well before that.
STATUS_MAX = 1024


@dataclass(frozen=True, slots=True)
class WatchdogConfig:
    """What WatchdogSec= told us: the deadline and how often to ping (half of it, as
    sd_watchdog_enabled(3) recommends)."""

    usec: int

    @property
    def interval_s(self) -> float:
        return self.usec / 1_000_000

    @property
    def ping_interval_s(self) -> float:
        return self.interval_s / 2


def watchdog_config(env: Mapping[str, str], pid: int) -> WatchdogConfig | None:
    """sd_watchdog_enabled(3): WATCHDOG_USEC set (> 0) and WATCHDOG_PID unset or ours."""
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    owner = env.get("WATCHDOG_PID")
    if owner is not None and owner != str(pid):
        return None
    return WatchdogConfig(int(usec))


def _one_line(text: str) -> str:
    # A newline in STATUS= would start a new assignment (e.g. a policy file name turning
    # into READY=1), so the text is flattened and bounded.
    flat = "".join(ch if ch.isprintable() else " " for ch in text)
    return flat[:STATUS_MAX]


def _address(notify_socket: str) -> str | bytes:
    # "@name" is an abstract socket: a leading NUL byte on the wire.
    if notify_socket.startswith("@"):
        return b"\0" + notify_socket[1:].encode()
    return notify_socket


class Notifier:
    """Talks to the service manager.  `env` and `pid` are injectable for tests."""

    def __init__(self, env: Mapping[str, str] | None = None, pid: int | None = None) -> None:
        env = os.environ if env is None else env
        self.pid = os.getpid() if pid is None else pid
        self.socket_path = env.get("NOTIFY_SOCKET") or None
        self.watchdog_config: WatchdogConfig | None = watchdog_config(env, self.pid)
        self.failures = 0  # sends that did not reach the manager (shown in status)

    @property
    def dropped(self) -> int:
        return self.failures

    @property
    def enabled(self) -> bool:
        return self.socket_path is not None

    def send(self, *assignments: str) -> bool:
        """Send one datagram of KEY=VALUE lines; False if there is no manager or it failed."""
        if self.socket_path is None:
            return False
        payload = "\n".join(assignments).encode("utf-8", "replace")
        try:
            # Non-blocking: a manager that stops reading (its queue holds few datagrams)
            # must cost us a counted failure, never a frozen daemon.
            kind = socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
            with socket.socket(socket.AF_UNIX, kind) as sock:
                sock.sendto(payload, _address(self.socket_path))
        except OSError:
            self.failures += 1
            return False
        return True

    def ready(self, status: str) -> bool:
        """After the first generation, and after each reload (ends RELOADING=1)."""
        return self.send("READY=1", f"STATUS={_one_line(status)}", f"MAINPID={self.pid}")

    def reloading(self) -> bool:
        """Before a reload.  MONOTONIC_USEC makes it valid for Type=notify-reload (systemd
        >= 253) and is ignored by older managers (Debian 12 has 252)."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={_one_line(text)}")

    def extend_timeout(self, usec: int, status: str | None = None) -> bool:
        """EXTEND_TIMEOUT_USEC= (systemd >= 236): the start (or stop) may take USEC more
        from now; the next one must come before that (kmodd.daemon.startup)."""
        if status is None:
            return self.send(f"EXTEND_TIMEOUT_USEC={usec}")
        return self.send(f"EXTEND_TIMEOUT_USEC={usec}", f"STATUS={_one_line(status)}")

    @property
    def watchdog_ping_interval_s(self) -> float | None:
        """How often housekeeping should call watchdog(); None when no WatchdogSec=."""
        return None if self.watchdog_config is None else self.watchdog_config.ping_interval_s

    def watchdog(self) -> bool:
        """WATCHDOG=1, only when WatchdogSec= applies to this process."""
        if self.watchdog_config is None:
            return False
        return self.send("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        if status is None:
            return self.send("STOPPING=1")
        return self.send("STOPPING=1", f"STATUS={_one_line(status)}")
