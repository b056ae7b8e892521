"""The daemon's two unix sockets, served by one non-blocking selectors loop.

decide.sock (0600): the helper's line protocol; peers must be uid 0 (SO_PEERCRED).
control.sock (0660 root:GROUP, or 0600): NUL-framed JSON (kmodd.wire); Status/Explain for
root and the status group, Reload/Decide for uid 0 only.

Why one thread: the core decides against libkmod contexts, which are not thread-safe, and a
decision is a dict hit once warm (~10 us), so serving the sockets on the core thread is
both the simplest correct choice and fast enough (the kernel runs at most 50 helpers at
once).  Every connection has a deadline and bounded buffers, so a slow or malicious client
costs one slot, never the loop.
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import socket
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from kmodd import helper, wire
from kmodd.errors import KmoddError

DECIDE_CONN_TIMEOUT_S = 1.0  # the helper gives up after DECIDE_TIMEOUT_S (0.5 s) anyway
CONTROL_IDLE_TIMEOUT_S = 30.0
# A call's answer is due in this time (a reload: Handler.call_timeout, which follows the
# builds it has seen: ~1 s natively, 70-480 s under TCG, and a reload queued behind a
# running build waits for two).
CONTROL_CALL_TIMEOUT_S = 120.0
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13; not in Python 3.11
PEERGROUPS_MAX = 256
ROOT_ONLY = frozenset({wire.Method.RELOAD, wire.Method.DECIDE})


class ServerError(KmoddError):
    """The runtime directory or a socket cannot be set up safely."""


class Kind(StrEnum):
    DECIDE = "decide"  # also the FileDescriptorName= in kmodd-decide.socket
    CONTROL = "control"


# Per socket, so that status readers filling their slots can never starve the helper.
MAX_CONNECTIONS = {Kind.DECIDE: 512, Kind.CONTROL: 64}  # decide: 10x the kernel's 50 helpers


@dataclass(frozen=True, slots=True)
class Peer:
    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    def in_group(self, gid: int | None) -> bool:
        return gid is not None and (self.gid == gid or gid in self.groups)


_UCRED = struct.Struct("3i")


def peer_of(sock: socket.socket, *, groups_too: bool = True) -> Peer:
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    groups: tuple[int, ...] = ()
    if not groups_too:  # decide.sock only cares about uid 0: one syscall less per decision
        return Peer(pid, uid, gid)
    with contextlib.suppress(OSError):
        buf = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * PEERGROUPS_MAX)
        groups = struct.unpack(f"{len(buf) // 4}I", buf[: len(buf) // 4 * 4])
    return Peer(pid, uid, gid, groups)


class Handler(Protocol):
    """What the core provides to the server (all called on the loop thread)."""

    def decide_line(
        self, name: bytes, peer: Peer, respond: Callable[[bytes], None]
    ) -> bytes | None: ...  # None: parked, RESPOND answers later

    def control(self, call: wire.Call, peer: Peer, respond: Callable[[bytes], None]) -> None: ...

    def call_timeout(self, call: wire.Call) -> float: ...  # seconds until CALL is dropped

    def refused(self, kind: Kind, peer: Peer, what: str) -> None: ...


# ---------------------------------------------------------------------------------------
# Runtime directory and listening sockets


def prepare_runtime_dir(path: Path) -> None:
    """Create PATH 0755 owned by us, or accept an existing one only if it is a real
    directory (never a symlink: O_NOFOLLOW) owned by us and not writable by others."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)  # widened below, after the checks, whatever the umask
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as err:
        raise ServerError(f"{path}: {err.strerror} (a symlink?)", hint="remove it") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise ServerError(
                f"{path} is owned by uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):o}",
                hint=f"it must be owned by uid {os.geteuid()} and not group/other-writable",
            )
        # Others need to traverse it to reach control.sock; decide.sock stays 0600.
        os.fchmod(fd, 0o755)
    finally:
        os.close(fd)


def bind_unix(path: Path, mode: int, gid: int | None) -> socket.socket:
    """Listen on PATH with MODE (and group GID) from the first instant: bind a temp name,
    set ownership, then rename over PATH (never follows a pre-existing symlink)."""
    with contextlib.suppress(FileNotFoundError):
        st = path.lstat()
        if not stat.S_ISSOCK(st.st_mode):
            raise ServerError(f"{path} exists and is not a socket", hint="remove it")
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(str(tmp))
        os.chown(tmp, -1, -1 if gid is None else gid)
        os.chmod(tmp, mode)  # noqa: PTH101
        tmp.rename(path)
        sock.listen(128)
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    sock.setblocking(False)
    return sock


def activated_sockets(env: dict[str, str] | None = None) -> dict[Kind, socket.socket]:
    """sd_listen_fds(3) with names: fds from kmodd-decide.socket and
    kmodd-control.socket, keyed by FileDescriptorName."""
    env = os.environ if env is None else env  # type: ignore[assignment]
    assert env is not None
    if env.get("LISTEN_PID") != str(os.getpid()) or not env.get("LISTEN_FDS", "").isdigit():
        return {}
    count = int(env["LISTEN_FDS"])
    names = env.get("LISTEN_FDNAMES", "").split(":")
    found: dict[Kind, socket.socket] = {}
    for i in range(count):
        name = names[i] if i < len(names) else ""
        if name in (Kind.DECIDE, Kind.CONTROL):
            sock = socket.socket(fileno=3 + i)
            sock.setblocking(False)
            found[Kind(name)] = sock
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    return found


# ---------------------------------------------------------------------------------------
# Connections


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    kind: Kind
    peer: Peer
    deadline: float
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytearray = field(default_factory=bytearray)
    framer: wire.Framer | None = None
    busy: bool = False  # answered later: a control call (reload), a parked decision
    closing: bool = False  # the peer is done (EOF) or we are: close once outbuf is flushed
    events: int = 0  # what the selector watches for this connection (0: not registered)
    closed: bool = False


class Server:
    """Accepts, reads, dispatches, writes; `poll` runs one loop iteration."""

    def __init__(
        self,
        listeners: dict[Kind, socket.socket],
        handler: Handler,
        *,
        status_gid: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._handler = handler
        self._status_gid = status_gid
        self._clock = clock
        self._sel = selectors.DefaultSelector()
        self._conns: set[_Conn] = set()
        self._open = dict.fromkeys(Kind, 0)
        self._listeners = listeners
        for kind, sock in listeners.items():
            self._sel.register(sock, selectors.EVENT_READ, kind)
        self.overflows = 0

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self._sel.register(fd, selectors.EVENT_READ, callback)

    def close(self) -> None:
        for conn in list(self._conns):
            self._close(conn)
        for sock in self._listeners.values():
            self._sel.unregister(sock)
            sock.close()
        self._sel.close()

    def next_deadline(self) -> float | None:
        return min((c.deadline for c in self._conns), default=None)

    def poll(self, timeout: float | None) -> None:
        for key, events in self._sel.select(timeout):
            data = key.data
            if isinstance(data, Kind):
                self._accept(key.fileobj, data)  # type: ignore[arg-type]
            elif isinstance(data, _Conn):
                self._service(data, events)
            else:
                data()
        self._expire()

    def _expire(self) -> None:
        now = self._clock()
        for conn in [c for c in self._conns if c.deadline <= now]:
            self._close(conn)

    def _accept(self, listener: socket.socket, kind: Kind) -> None:
        for _ in range(64):  # bounded batch: other ready fds get their turn
            try:
                sock, _addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:  # EMFILE & co: keep serving the others
                if err.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.overflows += 1
                    return
                raise
            self._admit(sock, kind)

    def _admit(self, sock: socket.socket, kind: Kind) -> None:
        sock.setblocking(False)
        if self._open[kind] >= MAX_CONNECTIONS[kind]:
            self.overflows += 1
            sock.close()
            return
        peer = peer_of(sock, groups_too=kind is Kind.CONTROL)
        if kind is Kind.DECIDE and peer.uid != 0:
            self._handler.refused(kind, peer, "decide.sock needs uid 0")
            sock.close()
            return
        if kind is Kind.CONTROL and not self._may_read(peer):
            self._handler.refused(kind, peer, "not root and not in the status group")
            sock.close()
            return
        timeout = DECIDE_CONN_TIMEOUT_S if kind is Kind.DECIDE else CONTROL_IDLE_TIMEOUT_S
        conn = _Conn(sock, kind, peer, self._clock() + timeout)
        if kind is Kind.CONTROL:
            conn.framer = wire.Framer()
        self._conns.add(conn)
        self._open[kind] += 1
        if kind is Kind.DECIDE:
            # The helper sends its line right after connect(): usually it is already
            # here, so answer it now and register with the selector only when it is not
            # (or the reply does not fit): that saves an epoll_ctl add and delete per
            # decision, ~13 us of the daemon's ~100 us (docs/benchmarks.md).
            self._read(conn)
            if conn.closed or conn.events:
                return
        self._watch(conn, selectors.EVENT_READ)

    def _may_read(self, peer: Peer) -> bool:
        return peer.uid == 0 or peer.in_group(self._status_gid)

    def _service(self, conn: _Conn, events: int) -> None:
        if conn.closed:  # closed by an earlier handler of the same select() batch
            return
        if events & selectors.EVENT_WRITE:
            self._flush(conn)
        if events & selectors.EVENT_READ and not conn.closed:
            self._read(conn)

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not data:
            # EOF: the peer is done sending.  Finish writing what we owe, or close now.
            conn.closing = True
            if conn.outbuf:
                self._watch(conn, selectors.EVENT_WRITE)
            elif conn.busy:
                self._watch(conn, 0)  # nothing to read or write until the answer comes
            else:
                self._close(conn)
            return
        if conn.kind is Kind.DECIDE:
            self._read_decide(conn, data)
        else:
            self._read_control(conn, data)

    def _read_decide(self, conn: _Conn, data: bytes) -> None:
        if conn.busy:  # one request per connection; the parked one is being answered
            return
        conn.inbuf += data
        end = conn.inbuf.find(b"\n")
        if end < 0:
            if len(conn.inbuf) > helper.DECIDE_MAX:
                self._send(conn, b"error request too long\n", close=True)
            return
        line = bytes(conn.inbuf[:end])
        if not line.startswith(helper.DECIDE_PREFIX):
            self._send(conn, b"error expected: decide NAME\n", close=True)
            return

        def respond(reply: bytes) -> None:
            if not conn.closed:
                conn.busy = False
                self._send(conn, reply, close=True)

        reply = self._handler.decide_line(line[len(helper.DECIDE_PREFIX) :], conn.peer, respond)
        if reply is None:  # parked: keep reading only to notice EOF, the deadline still holds
            conn.busy = True
            self._watch(conn, selectors.EVENT_READ)
        else:
            self._send(conn, reply, close=True)

    def _read_control(self, conn: _Conn, data: bytes) -> None:
        assert conn.framer is not None
        try:
            frames = conn.framer.feed(data)
        except wire.ProtocolError as err:
            self._send(conn, wire.encode_error(wire.ErrorName.INVALID_FRAME, str(err)), close=True)
            return
        for frame in frames:
            if conn.busy or conn.closed:  # one call at a time: pipelining is not supported
                self._send(
                    conn, wire.encode_error(wire.ErrorName.INVALID_FRAME, "busy"), close=True
                )
                return
            self._dispatch(conn, frame)

    def _dispatch(self, conn: _Conn, frame: bytes) -> None:
        try:
            call = wire.decode_call(frame)
        except wire.ProtocolError as err:
            self._send(conn, wire.encode_error(wire.ErrorName.INVALID_FRAME, str(err)), close=True)
            return
        if call.method in ROOT_ONLY and conn.peer.uid != 0:
            self._handler.refused(Kind.CONTROL, conn.peer, f"{call.method} needs uid 0")
            error = wire.encode_error(wire.ErrorName.PERMISSION_DENIED, f"{call.method} needs root")
            self._send(conn, error)
            return
        conn.busy = True
        conn.deadline = self._clock() + self._handler.call_timeout(call)

        def respond(reply: bytes) -> None:
            if conn.closed:
                return
            conn.busy = False
            conn.deadline = self._clock() + CONTROL_IDLE_TIMEOUT_S
            self._send(conn, reply, close=conn.closing)

        self._handler.control(call, conn.peer, respond)

    def _send(self, conn: _Conn, data: bytes, *, close: bool = False) -> None:
        conn.outbuf += data
        conn.closing = conn.closing or close
        self._flush(conn)

    def _flush(self, conn: _Conn) -> None:
        try:
            while conn.outbuf:
                sent = conn.sock.send(conn.outbuf)
                del conn.outbuf[:sent]
        except (BlockingIOError, InterruptedError):
            reading = 0 if conn.closing else selectors.EVENT_READ
            self._watch(conn, reading | selectors.EVENT_WRITE)
            return
        except OSError:
            self._close(conn)
            return
        if conn.closing and not conn.busy:
            self._close(conn)
        else:
            self._watch(conn, 0 if conn.closing else selectors.EVENT_READ)

    def _watch(self, conn: _Conn, events: int) -> None:
        if events == conn.events:
            return
        if conn.events == 0:
            self._sel.register(conn.sock, events, conn)
        elif events == 0:
            self._sel.unregister(conn.sock)
        else:
            self._sel.modify(conn.sock, events, conn)
        conn.events = events

    def _close(self, conn: _Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._conns.discard(conn)
        self._open[conn.kind] -= 1
        if conn.events:
            self._sel.unregister(conn.sock)
            conn.events = 0
        conn.sock.close()
