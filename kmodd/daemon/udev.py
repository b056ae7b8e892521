"""udev: devices that want a module (MODALIAS), from add events and from coldplug.

One thread of our own reads the netlink monitor and only posts events (design §4).  Not
pyudev's MonitorObserver: its thread dies on the first OSError (measured: ENOBUFS after a
receive-buffer overflow, research python-ecosystem.md §2.2).  Here ANY monitor error drops
the monitor, opens a new one (backing off when that keeps failing) and posts UdevLost so
the core re-coldplugs what the lost events may have announced.

uevent properties are hostile input (any root process or a malicious device can shape
them): values are stripped to printable ASCII and MODALIAS is bounded; a device we cannot
read is counted and skipped, never fatal.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyudev

from kmodd.daemon.events import Post, UdevAction, UdevDevice, UdevLost
from kmodd.errors import KmoddError

MonitorSource = Literal["udev", "kernel"]  # netlink group: after udevd, or raw uevents
MODALIAS_MAX = 1024  # real ones are < 300 bytes (usb/pci/acpi/of); longer means hostile
FIELD_MAX = 4096  # DEVPATH and SUBSYSTEM
DRAIN_MAX = 256  # events read per wake-up before checking for stop
RETRY_FIRST_S = 0.05
RETRY_MAX_S = 5.0
STABLE_S = 10.0  # a monitor that lived this long resets the back-off
UDEVD_NAMES = frozenset({"systemd-udevd", "udevd"})


class UdevError(KmoddError):
    """The netlink monitor could not be opened (not root? no netlink in this namespace?)."""


@dataclass(frozen=True, slots=True)
class UdevCounters:
    events: int  # UdevDevice posted from the monitor
    skipped: int  # unreadable or hostile devices
    lost: int  # monitor failures recovered from (each posted one UdevLost)


def printable(value: str, limit: int) -> str:
    """Printable ASCII only (control bytes, DEL and non-ASCII dropped), at most `limit`."""
    return "".join(ch for ch in value[: limit * 4] if " " <= ch <= "~")[:limit]


def device_from_properties(
    action: str | None, props: Mapping[str, str], *, coldplug: bool = False
) -> UdevDevice | None:
    """Pure: the UdevDevice for an `add` (or coldplugged) device with a usable MODALIAS,
    or a `remove` (so the core forgets the device; its modalias may be empty)."""
    if not coldplug and action == "remove":
        devpath = printable(props.get("DEVPATH") or "", FIELD_MAX)
        return (
            UdevDevice(action=UdevAction.REMOVE, devpath=devpath, subsystem="", modalias="")
            if devpath
            else None
        )
    if not coldplug and action != "add":
        return None
    raw = props.get("MODALIAS") or ""
    if len(raw) > MODALIAS_MAX:
        return None
    modalias = printable(raw, MODALIAS_MAX)
    if not modalias:
        return None
    seqnum = props.get("SEQNUM", "")
    return UdevDevice(
        action=UdevAction.COLDPLUG if coldplug else UdevAction.ADD,
        devpath=printable(props.get("DEVPATH") or "", FIELD_MAX),
        subsystem=printable(props.get("SUBSYSTEM") or "", FIELD_MAX),
        modalias=modalias,
        seqnum=int(seqnum) if seqnum.isdigit() and len(seqnum) < 20 else 0,
    )


def udevd_running(run_dir: Path = Path("/run"), proc_dir: Path = Path("/proc")) -> bool:
    """systemd-udevd is alive: its control socket exists AND a udevd process runs (a stale
    /run/udev/control survives a killed udevd, and then the `udev` source stays silent)."""
    if not (run_dir / "udev/control").exists():
        return False
    for entry in proc_dir.iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() in UDEVD_NAMES:
                    return True
    return False


def _pending_error(fd: int) -> str:
    """The socket's pending error (ENOBUFS after an overflow), read and cleared."""
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    except OSError as err:
        return f"monitor fd unusable: {err.strerror}"
    if code:
        return f"{errno.errorcode.get(code, str(code))}: {os.strerror(code)}"
    return "monitor poll error"


class MonitorError(Exception):
    """Internal: the current monitor failed; carries the reason for UdevLost."""


class UdevSource:
    """Posts UdevDevice for `add` uevents with MODALIAS; `coldplug()` lists present ones.

    source: "udev" (after udevd's rules) when udevd runs, else "kernel" (raw uevents);
    None picks automatically at construction.  receive_buffer: only for tests; the
    default as root is already 256 MiB and must not be shrunk.
    """

    def __init__(
        self,
        post: Post,
        *,
        context_factory: Callable[[], Any] = pyudev.Context,
        source: MonitorSource | None = None,
        receive_buffer: int | None = None,
    ) -> None:
        self._post = post
        self._context_factory = context_factory
        self.source: MonitorSource = source or ("udev" if udevd_running() else "kernel")
        self._receive_buffer = receive_buffer
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._wake_fds: tuple[int, ...] = (self._wake_r, self._wake_w)
        self._thread = threading.Thread(target=self._run, name="kmodd-udev", daemon=True)
        self._monitor: Any = None
        self._events = self._skipped = self._lost = 0

    @property
    def counters(self) -> UdevCounters:
        return UdevCounters(self._events, self._skipped, self._lost)

    def start(self) -> None:
        """Open the monitor (raises UdevError) and start reading it."""
        try:
            self._monitor = self._open()
        except OSError as err:
            raise UdevError(
                f"cannot open the {self.source} uevent monitor: {err}",
                hint="needs root in the initial network namespace",
            ) from err
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._wake_fds:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")
        if self._thread.is_alive():
            self._thread.join()
        self._monitor = None
        # Once only: a second close could hit an fd number someone else reopened since.
        fds, self._wake_fds = self._wake_fds, ()
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    def coldplug(self) -> list[UdevDevice]:
        """Present devices with a MODALIAS, read from sysfs (udevd not needed)."""
        found: list[UdevDevice] = []
        try:
            devices = list(self._context_factory().list_devices(MODALIAS="*"))
        except Exception:  # sysfs unreadable: nothing to coldplug, and say so in counters
            self._skipped += 1
            return found
        for device in devices:
            try:
                item = device_from_properties(None, device.properties, coldplug=True)
            except Exception:  # a hostile or vanished device is skipped, never fatal
                self._skipped += 1
                continue
            if item is not None:
                found.append(item)
        return found

    def _open(self) -> Any:
        monitor = pyudev.Monitor.from_netlink(self._context_factory(), source=self.source)
        if self._receive_buffer is not None:
            monitor.set_receive_buffer_size(self._receive_buffer)
        monitor.start()
        return monitor

    # -- reader thread -----------------------------------------------------------------

    def _run(self) -> None:
        delay = 0.0
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self._pump(self._monitor)
                return  # stop requested
            except Exception as err:  # whatever breaks the monitor must not end the thread
                reason = str(err) or type(err).__name__
            # Drop the broken monitor before opening the next: the socket closes with it.
            self._monitor = None
            if time.monotonic() - started > STABLE_S:
                delay = 0.0
            monitor = self._reopen(delay)
            if monitor is None:
                return
            self._monitor = monitor
            self._lost += 1
            self._post(UdevLost(reason))
            delay = min(max(delay * 2, RETRY_FIRST_S), RETRY_MAX_S)

    def _reopen(self, delay: float) -> Any:
        """A new monitor, retrying with back-off until it opens or we are stopped."""
        while not self._stop.wait(delay):
            try:
                return self._open()
            except OSError:
                delay = min(max(delay * 2, RETRY_FIRST_S), RETRY_MAX_S)
        return None

    def _pump(self, monitor: Any) -> None:
        """Deliver events until stopped (returns) or the monitor fails (MonitorError)."""
        fd = monitor.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._stop.is_set():
            for ready, mask in poller.poll():
                if ready == self._wake_r:
                    return
                if mask & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                    raise MonitorError(_pending_error(fd))
                self._drain(monitor)

    def _drain(self, monitor: Any) -> None:
        for _ in range(DRAIN_MAX):
            try:
                device = monitor.poll(timeout=0)
            except OSError as err:
                raise MonitorError(f"{err}; {_pending_error(monitor.fileno())}") from err
            if device is None:
                return
            self._deliver(device)

    def _deliver(self, device: Any) -> None:
        try:
            item = device_from_properties(device.action, device.properties)
        except Exception:  # a hostile or vanished device is skipped, never fatal
            self._skipped += 1
            return
        if item is not None:
            self._events += 1
            self._post(item)
