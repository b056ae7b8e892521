"""Who asked: the requesting task of a kernel autoload, from tracefs and /proc.

The kernel passes the helper only the module name, and the helper is a child of a kernel
worker, so SO_PEERCRED on decide.sock says nothing about the requester.  What the kernel
does give: `__request_module()` fires the `module:module_request` tracepoint in the
requesting task's context (pid, comm) right before it execs the helper, and for a waiting
request that task stays blocked in request_module() until the helper exits.  So:

1. The daemon creates its own tracefs instance (`instances/kmodd`: its own ring buffer,
   never the global one an admin may be using), enables only that event there, and a
   reader thread blocks on the instance's `trace_pipe`, parsing each line into a
   TraceEvent kept for MATCH_WINDOW_S.
2. When the helper asks about NAME, `Attributor.lookup(NAME)` takes the oldest unmatched
   event of that name (waiting at most a short bound: the event is written before the
   helper even starts, ~20 ms of Python start-up earlier) and reads /proc/PID while the
   requester is still blocked: ids, comm, exe, cgroup (systemd unit), namespaces.
3. Anything missing (no tracefs, lockdown, no event within the bound, a task already
   gone) gives None: the decision says "requester unknown", it never waits longer.

`trace_pipe` is read with a blocking read (wakes on every commit) rather than poll():
poll on trace_pipe honours the instance's buffer_percent on recent kernels and would sit
on events.  Stop writes a line to the instance's trace_marker to wake the reader.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kmodd.contract.status import AttributionInfo
from kmodd.host.proc import PROC, Requester, read_requester, spawned_by_kernel
from kmodd.host.tracefs import EVENT_DIR, LOCKDOWN, TRACEFS_ROOTS, Availability, probe

INSTANCE = "kmodd"
# An event not matched within this long is stale: a request_module_nowait() caller, or a
# request whose helper never reached the daemon (snapshot fallback).
MATCH_WINDOW_S = 5.0
LOOKUP_TIMEOUT_S = 0.25  # the longest a decision waits for its event (usually 0)
PENDING_MAX = 1024  # unmatched events kept (the kernel runs at most 50 helpers at once)
BUFFER_KB = 64  # per-CPU ring of our instance: one event is ~100 bytes
READ_SIZE = 65536
STOP_MARK = "kmodd-attribution-stop"

# `  comm-pid  [(tgid)]  [cpu]  [flags]  seconds.micros: module_request: NAME wait=W ...`
# comm may hold spaces and dashes: greedy, anchored on the last `-PID` before `[CPU]`.
_LINE = re.compile(
    r"^\s*(?P<comm>.+)-(?P<pid>\d+)\s+(?:\(\s*[\d-]+\)\s+)?\[(?P<cpu>\d+)\]\s+"
    r"(?:\S{1,8}\s+)?(?P<ts>\d+\.\d+):\s+module_request:\s+(?P<rest>.*)$"
)


@dataclass(frozen=True, slots=True)
class TraceEvent:
    """One module_request event as trace_pipe printed it."""

    name: str
    pid: int  # the requesting task (a thread id: /proc/PID works for threads too)
    comm: str  # "<...>" when the tracer had no saved comm for the pid
    wait: bool  # False: request_module_nowait(), the task does not block
    timestamp: float  # trace clock (seconds since boot, local clock)
    cpu: int
    seen: float = 0.0  # our monotonic clock when the line was read


def parse_event_line(line: str) -> TraceEvent | None:
    """A trace_pipe line of module_request, or None for anything else."""
    m = _LINE.match(line.rstrip("\n"))
    if m is None:
        return None
    name, sep, tail = m["rest"].rpartition(" wait=")
    if not sep or not name or not tail[:1].isdigit():
        return None
    return TraceEvent(
        name=name,
        pid=int(m["pid"]),
        comm=m["comm"].strip(),
        wait=tail[:1] != "0",
        timestamp=float(m["ts"]),
        cpu=int(m["cpu"]),
    )


# ---------------------------------------------------------------------------------------
# The reader


class Attributor:
    """Owns the tracefs instance and its reader thread; `lookup` is thread-safe."""

    def __init__(
        self,
        roots: tuple[Path, ...] = TRACEFS_ROOTS,
        *,
        proc: Path = PROC,
        lockdown: Path = LOCKDOWN,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._roots = roots
        self._proc = proc
        self._lockdown = lockdown
        self._clock = clock
        self._pending: deque[TraceEvent] = deque(maxlen=PENDING_MAX)
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._instance: Path | None = None
        self._availability = probe(roots, lockdown)
        self.events = 0  # lines parsed as module_request
        self.matched = 0
        self.unmatched = 0  # lookups that found no event within the bound
        self.gone = 0  # matched, but /proc/PID had vanished
        self.wait_s_max = 0.0  # longest a lookup waited for its event
        self.read_s_max = 0.0  # longest /proc read of a matched requester
        self.margin_s_min: float | None = None  # least time an event waited for its lookup

    def availability(self) -> Availability:
        return self._availability

    def start(self) -> Availability:
        """Create and enable our instance and start the reader; never raises."""
        found = self._availability
        if found.tracefs is None or not found.event:
            return found
        instance = Path(found.tracefs) / "instances" / INSTANCE
        try:
            fd = self._open_instance(instance)
        except OSError as err:
            self._availability = Availability(
                found.tracefs,
                True,
                False,
                found.lockdown,
                f"{err.filename or instance}: {err.strerror}",
            )
            return self._availability
        self._instance = instance
        self._thread = threading.Thread(
            target=self._run, args=(fd,), name="kmodd-attribution", daemon=True
        )
        self._thread.start()
        self._availability = Availability(found.tracefs, True, True, found.lockdown, None)
        return self._availability

    @staticmethod
    def _open_instance(instance: Path) -> int:
        with contextlib.suppress(FileExistsError):  # left by a killed daemon: reuse it
            instance.mkdir()
        _write(instance / EVENT_DIR / "enable", "0")
        _truncate(instance / "trace")  # drop whatever a previous daemon left unread
        with contextlib.suppress(OSError):  # only memory: keep the kernel's size if refused
            _write(instance / "buffer_size_kb", str(BUFFER_KB))
        _write(instance / EVENT_DIR / "enable", "1")
        _write(instance / "tracing_on", "1")
        return os.open(instance / "trace_pipe", os.O_RDONLY | os.O_CLOEXEC)

    def _run(self, fd: int) -> None:
        partial = b""
        try:
            while not self._stopping:
                try:
                    chunk = os.read(fd, READ_SIZE)
                except InterruptedError:
                    continue
                if not chunk:
                    break
                *lines, partial = (partial + chunk).split(b"\n")
                partial = partial[-READ_SIZE:]
                self._feed([line.decode("utf-8", "replace") for line in lines])
        except OSError:
            pass
        finally:
            os.close(fd)

    def _feed(self, lines: list[str]) -> None:
        now = self._clock()
        events = [e for e in map(parse_event_line, lines) if e is not None]
        if not events:
            return
        with self._cond:
            for event in events:
                self._pending.append(_seen(event, now))
            self.events += len(events)
            self._cond.notify_all()

    def feed_lines(self, lines: list[str]) -> None:
        """Feed trace_pipe lines by hand (tests; a replay of a saved trace)."""
        self._feed(lines)

    def _take(self, name: str) -> TraceEvent | None:
        """The oldest fresh unmatched event for NAME (stale ones are dropped)."""
        horizon = self._clock() - MATCH_WINDOW_S
        while self._pending and self._pending[0].seen < horizon:
            self._pending.popleft()
        for i, event in enumerate(self._pending):
            if event.name == name:
                del self._pending[i]
                return event
        return None

    def lookup(self, name: str, timeout_s: float = LOOKUP_TIMEOUT_S) -> Requester | None:
        """The requester of NAME's request, or None if it cannot be known within TIMEOUT_S.

        Without a running reader this returns None at once (no waiting for nothing)."""
        if self._thread is None and not self._pending:
            return None
        started = self._clock()
        deadline = started + timeout_s
        with self._cond:
            event = self._take(name)
            while event is None:
                left = deadline - self._clock()
                if left <= 0 or self._thread is None:
                    break
                self._cond.wait(left)
                event = self._take(name)
        found = self._clock()
        self.wait_s_max = max(self.wait_s_max, found - started)
        if event is None:
            self.unmatched += 1
            return None
        margin = started - event.seen
        self.margin_s_min = margin if self.margin_s_min is None else min(self.margin_s_min, margin)
        requester = read_requester(event.pid, self._proc)
        self.read_s_max = max(self.read_s_max, self._clock() - found)
        if requester is None:
            self.gone += 1
            return None
        self.matched += 1
        return requester

    def kernel_spawned(self, pid: int) -> bool:
        """PID (a decide.sock peer) was started by the kernel (see spawned_by_kernel)."""
        return spawned_by_kernel(pid, self._proc)

    def counters(self) -> dict[str, int]:
        return {
            "events": self.events,
            "matched": self.matched,
            "unmatched": self.unmatched,
            "gone": self.gone,
        }

    def timings(self) -> dict[str, float | None]:
        """Worst cases so far, in ms: waiting for an event, reading /proc, and the least
        head start an event had over its lookup (how close the race ever came)."""
        margin = self.margin_s_min
        return {
            "wait_ms_max": round(self.wait_s_max * 1000, 3),
            "read_ms_max": round(self.read_s_max * 1000, 3),
            "margin_ms_min": None if margin is None else round(margin * 1000, 3),
        }

    def status(self) -> AttributionInfo:
        """For `kmodctl status`: what is available, the counters and the timings."""
        a, margin = self._availability, self.margin_s_min
        return AttributionInfo(
            tracefs=a.tracefs,
            event=a.event,
            instance=a.instance,
            lockdown=a.lockdown,
            reason=a.reason,
            available=a.available,
            events=self.events,
            matched=self.matched,
            unmatched=self.unmatched,
            gone=self.gone,
            wait_ms_max=round(self.wait_s_max * 1000, 3),
            read_ms_max=round(self.read_s_max * 1000, 3),
            margin_ms_min=None if margin is None else round(margin * 1000, 3),
        )

    def stop(self) -> None:
        """Disable the event, wake and end the reader, remove our instance."""
        instance, thread = self._instance, self._thread
        self._stopping = True
        if instance is None or thread is None:
            return
        with contextlib.suppress(OSError):
            _write(instance / EVENT_DIR / "enable", "0")
        with contextlib.suppress(OSError):
            _write(instance / "trace_marker", STOP_MARK)  # wakes the blocked read
        thread.join(2.0)
        self._thread = None
        with self._cond:
            self._cond.notify_all()
        if not thread.is_alive():
            with contextlib.suppress(OSError):
                instance.rmdir()  # EBUSY while trace_pipe is open: then it stays
        self._instance = None


def _seen(event: TraceEvent, now: float) -> TraceEvent:
    return TraceEvent(
        event.name, event.pid, event.comm, event.wait, event.timestamp, event.cpu, now
    )


def _write(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _truncate(path: Path) -> None:
    """Opening a tracefs `trace` file with O_TRUNC clears the instance's buffer."""
    os.close(os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC))
