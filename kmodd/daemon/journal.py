"""Journal records: one per decision, plus reload/conflict/fallback/tamper/lifecycle events.

Decide first, log after (design §5.3): `JournalSink.emit` only puts the record on a bounded
queue; one writer thread sends it with systemd.journal.send (or to stderr without a
journald socket).  A full queue drops the record and counts it -- a decision never waits
for the journal.  Every MESSAGE_ID is documented in docs/journal.md and systemd/kmodd.catalog.
"""

from __future__ import annotations

import contextlib
import os
import queue
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import TextIO

IDENTIFIER = "kmodd"
JOURNAL_SOCKET = "/run/systemd/journal/socket"
QUEUE_MAX = 8192  # ~1.6 s of the 5,000 decisions/s goal if journald stalls completely


class MessageId(StrEnum):
    """Stable per event type; never change a value (users filter on them)."""

    ALLOW = "8bd2e8ad851f41c691d60a6769ff481b"
    DENY = "3fd47b15f71a497a96fce61bb48c2e03"
    WOULD_DENY = "9a9705a46d7f4c43be225164cbef514e"
    RELOAD_OK = "e85821c83b0b4d1ea1242595920b38f6"
    RELOAD_FAILED = "75f0bddb413247d68fb3ada830a519fa"
    CONFLICT = "697fd0b86e9243698e3d137fc76d9920"
    FALLBACK = "0413ef2892df42c293ed6b87dbe9063b"
    TAMPER = "6a908a442ccd4ab98a73e91b8ea8091d"
    START = "b98b4780cf534ac4bf943b4aa2290c3b"
    STOP = "1626f6b5e39b4b398aa0354110b92850"
    REFUSED = "1a6d939937784e3793b6d00de945a7f4"  # a socket peer was refused
    NOTICE = "b3a56f075e5841ac958992ec21739b68"  # anything else worth a line


class Priority(IntEnum):
    ERR = 3
    WARNING = 4
    NOTICE = 5
    INFO = 6
    DEBUG = 7


@dataclass(frozen=True, slots=True)
class Record:
    message_id: MessageId
    priority: Priority
    message: str
    fields: Mapping[str, str] = field(default_factory=dict)  # KMODD_* -> value


Sender = Callable[[Record], None]


def journal_sender() -> Sender:
    """systemd.journal.send, imported lazily (~15 ms) only when journald is there."""
    from systemd import journal  # type: ignore[attr-defined]  # noqa: PLC0415

    def send(record: Record) -> None:
        journal.send(
            record.message,
            MESSAGE_ID=record.message_id.value,
            PRIORITY=int(record.priority),
            SYSLOG_IDENTIFIER=IDENTIFIER,
            **record.fields,
        )

    return send


def stream_sender(stream: TextIO) -> Sender:
    """One line per record, with syslog-style <N> prefix (journald's stdout parses it)."""

    def send(record: Record) -> None:
        extra = " ".join(f"{k}={v}" for k, v in record.fields.items())
        stream.write(f"<{int(record.priority)}>{IDENTIFIER}: {record.message}  {extra}\n")
        stream.flush()

    return send


def default_sender() -> Sender:
    if os.path.exists(JOURNAL_SOCKET):  # noqa: PTH110 -- one stat, no Path object needed
        return journal_sender()
    return stream_sender(sys.stderr)


class JournalSink:
    """Bounded queue + one writer thread.  `emit` never blocks."""

    def __init__(self, sender: Sender, maxsize: int = QUEUE_MAX) -> None:
        self._sender = sender
        self._queue: queue.Queue[Record | _FlushMarker | None] = queue.Queue(maxsize)
        self._thread = threading.Thread(target=self._run, name="kmodd-journal", daemon=True)
        self.dropped = 0  # written by the emitting thread only (the core)
        self.failed = 0  # written by the writer thread only

    def start(self) -> None:
        self._thread.start()

    def emit(self, record: Record) -> None:
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything queued so far was sent (tests, shutdown)."""
        done = threading.Event()
        deadline_ok = True
        with contextlib.suppress(queue.Full):
            self._queue.put(_FlushMarker(done), timeout=timeout)
            deadline_ok = done.wait(timeout)
        return deadline_ok and done.is_set()

    def stop(self, timeout: float = 5.0) -> None:
        if not self._thread.is_alive():
            return
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)
        self._thread.join(timeout)

    def _run(self) -> None:
        while (record := self._queue.get()) is not None:
            if isinstance(record, _FlushMarker):
                record.done.set()
                continue
            try:
                self._sender(record)
            except Exception:  # a journald hiccup must not kill the writer
                self.failed += 1


@dataclass(frozen=True, slots=True)
class _FlushMarker:
    done: threading.Event
