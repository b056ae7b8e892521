"""N concurrent decide clients in one process, one selectors loop (no threads: a GIL-bound
thread pool would measure itself, not the daemon).

Each client does what the helper does -- connect, `decide NAME\\n`, read the line, close --
and starts its next request as soon as one is answered, so N requests are always in
flight.  Latency is per request, connect to reply.
"""

from __future__ import annotations

import errno
import selectors
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kmodd import helper


@dataclass
class Load:
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    elapsed_s: float = 0.0

    @property
    def per_s(self) -> float:
        return len(self.latencies_ms) / self.elapsed_s


@dataclass
class _Conn:
    sock: socket.socket
    started: float
    request: bytes
    reply: bytes = b""


def _open(path: str, name: str) -> _Conn:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    started = time.perf_counter()
    request = helper.DECIDE_PREFIX + name.encode() + b"\n"
    # A unix socket connects at once or fails with EAGAIN when the backlog is full; the
    # daemon listens with a backlog of 128 > 50 clients, so EAGAIN here is a real failure.
    sock.connect(path)
    return _Conn(sock, started, request)


def run_load(sock_path: Path, names: Sequence[str], concurrency: int, total: int) -> Load:
    """TOTAL requests over NAMES (round-robin), CONCURRENCY in flight."""
    sel = selectors.DefaultSelector()
    load = Load()
    issued = 0
    path = str(sock_path)

    def issue() -> None:
        nonlocal issued
        conn = _open(path, names[issued % len(names)])
        issued += 1
        sel.register(conn.sock, selectors.EVENT_WRITE, conn)

    t0 = time.perf_counter()
    for _ in range(min(concurrency, total)):
        issue()
    while sel.get_map():
        for key, events in sel.select(timeout=5.0) or _timeout(sel):
            conn: _Conn = key.data
            done = _step(sel, conn, events, load)
            if done and issued < total:
                issue()
    load.elapsed_s = time.perf_counter() - t0
    sel.close()
    return load


def _timeout(sel: selectors.BaseSelector) -> list[tuple[selectors.SelectorKey, int]]:
    raise RuntimeError(f"daemon did not answer {len(sel.get_map())} requests within 5 s")


def _step(sel: selectors.BaseSelector, conn: _Conn, events: int, load: Load) -> bool:
    """Advance one connection; True when it is finished (answered or failed)."""
    try:
        if events & selectors.EVENT_WRITE:
            sent = conn.sock.send(conn.request)
            conn.request = conn.request[sent:]
            if not conn.request:
                sel.modify(conn.sock, selectors.EVENT_READ, conn)
            return False
        chunk = conn.sock.recv(helper.DECIDE_MAX)
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno == errno.EAGAIN:
            return False
        chunk = b""
    conn.reply += chunk
    if chunk and not conn.reply.endswith(b"\n"):
        return False
    sel.unregister(conn.sock)
    conn.sock.close()
    if conn.reply.startswith((b"allow ", b"deny ")):
        load.latencies_ms.append((time.perf_counter() - conn.started) * 1000)
    else:
        load.errors += 1
    return True
