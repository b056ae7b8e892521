"""Journal records: one per decision, plus reload/conflict/fallback/tamper/lifecycle events.

Decide first, log after (design §5.3): `JournalSink.emit` only puts the record on a bounded
queue; one writer thread sends it to journald's native socket (or to stderr without a
journald socket).  A full queue drops the record and counts it -- a decision never waits
for the journal.  What a record holds is kmodd.contract.journal (the schema: every
MESSAGE_ID and field, checked against docs/journal.md and systemd/kmodd.catalog).
"""

from __future__ import annotations

import errno
import os
import queue
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TextIO

from kmodd.contract.journal import IDENTIFIER, Record

JOURNAL_SOCKET = "/run/systemd/journal/socket"
BATCH_PAUSE_S = 0.005  # records reach journald at most this much later than decided
NATIVE_VALUE_MAX = 16 << 10  # per field, only when a record exceeds the datagram limit
QUEUE_MAX = 8192  # ~1.6 s of the 5,000 decisions/s goal if journald stalls completely


Sender = Callable[[Record], None]


def journal_sender(path: str = JOURNAL_SOCKET) -> Sender:
    """journald's native protocol on a datagram socket of our own (JOURNAL_NATIVE_PROTOCOL).

    Not systemd.journal.sendv: it calls sd_journal_sendv WITHOUT releasing the GIL, and once
    journald stalls, its socket queue (net.unix.max_dgram_qlen, 10 datagrams here) is full
    and sendmsg blocks there -- freezing every thread of the daemon, the one answering the
    kernel included (measured: tests/reliability/test_faults.py, journald SIGSTOPped).
    socket.sendto releases the GIL: only this writer waits, the bounded queue fills up and
    records are dropped and counted.  sendto (not connect) follows a restarted journald."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def send(record: Record) -> None:
        fields = {
            "MESSAGE": record.message,
            "MESSAGE_ID": record.message_id.value,
            "PRIORITY": str(int(record.priority)),
            "SYSLOG_IDENTIFIER": IDENTIFIER,
            **record.fields,
        }
        try:
            sock.sendto(_native(fields, None), path)
        except OSError as err:
            if err.errno != errno.EMSGSIZE:
                raise
            sock.sendto(_native(fields, NATIVE_VALUE_MAX), path)  # e.g. thousands of errors

    return send


def _native(fields: Mapping[str, str], limit: int | None) -> bytes:
    """KEY=value lines; a value with a newline as KEY\\n, 64-bit LE length, value."""
    out = bytearray()
    for key, value in fields.items():
        data = value.encode("utf-8", "replace")
        if limit is not None and len(data) > limit:
            data = data[:limit] + b"... (truncated)"
        if b"\n" in data:
            out += key.encode() + b"\n" + len(data).to_bytes(8, "little") + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


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
        # SimpleQueue (C, lock-free for us) with our own bound: queue.Queue's Condition costs
        # ~20 us per put under contention, on the thread that answers the kernel.
        self._queue: queue.SimpleQueue[Record | _FlushMarker | None] = queue.SimpleQueue()
        self._maxsize = maxsize
        self._thread = threading.Thread(target=self._run, name="kmodd-journal", daemon=True)
        self.dropped = 0  # written by the emitting thread only (the core)
        self.failed = 0  # written by the writer thread only

    def start(self) -> None:
        self._thread.start()

    def emit(self, record: Record) -> None:
        if self._queue.qsize() >= self._maxsize:
            self.dropped += 1
        else:
            self._queue.put(record)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything queued so far was sent (tests, shutdown)."""
        done = threading.Event()
        self._queue.put(_FlushMarker(done))
        return done.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        if not self._thread.is_alive():
            return
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        """Drain in batches, then pause: under load the emitting thread then finds the
        writer asleep rather than blocked in get(), so a put() wakes nobody and the two
        threads do not hand the GIL back and forth once per record (measured: that
        ping-pong cost ~100 us of the core's time per decision on 2 CPUs)."""
        while True:
            item = self._queue.get()
            while item is not None:
                self._handle(item)
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if item is None:
                return
            time.sleep(BATCH_PAUSE_S)

    def _handle(self, item: Record | _FlushMarker) -> None:
        if isinstance(item, _FlushMarker):
            item.done.set()
            return
        try:
            self._sender(item)
        except Exception:  # a journald hiccup must not kill the writer
            self.failed += 1


@dataclass(frozen=True, slots=True)
class _FlushMarker:
    done: threading.Event
