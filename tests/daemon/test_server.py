"""Runtime dir and socket setup (kmodd.daemon.server) and atomic publishing
(kmodd.atomic): the parts that must be safe against a hostile file system."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from kmodd import atomic
from kmodd.daemon import server
from tests.conftest import root_required


def test_runtime_dir_is_created_0755_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        server.prepare_runtime_dir(tmp_path / "rt")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "rt").stat().st_mode) == 0o755


def test_runtime_dir_symlink_is_refused_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir(mode=0o700)
    (tmp_path / "rt").symlink_to(target)
    with pytest.raises(server.ServerError, match="symlink"):
        server.prepare_runtime_dir(tmp_path / "rt")
    assert stat.S_IMODE(target.stat().st_mode) == 0o700


def test_group_writable_runtime_dir_is_refused(tmp_path: Path) -> None:
    rt = tmp_path / "rt"
    rt.mkdir()
    rt.chmod(0o775)
    with pytest.raises(server.ServerError, match="mode 775"):
        server.prepare_runtime_dir(rt)


@root_required
def test_foreign_runtime_dir_is_refused(tmp_path: Path) -> None:
    rt = tmp_path / "rt"
    rt.mkdir()
    os.chown(rt, 65534, 65534)
    with pytest.raises(server.ServerError, match="owned by uid 65534"):
        server.prepare_runtime_dir(rt)


def test_bind_replaces_a_stale_socket_and_sets_the_mode(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    sock = server.bind_unix(path, 0o600, None)
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert sorted(p.name for p in tmp_path.iterdir()) == ["s.sock"]  # no temp left
        client = socket.socket(socket.AF_UNIX)
        client.connect(str(path))
        client.close()
    finally:
        sock.close()


def test_bind_refuses_to_replace_a_non_socket(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    path.write_text("precious")
    with pytest.raises(server.ServerError, match="not a socket"):
        server.bind_unix(path, 0o600, None)
    assert path.read_text() == "precious"


def test_bind_never_follows_a_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("x")
    (tmp_path / "s.sock").symlink_to(victim)
    with pytest.raises(server.ServerError):
        server.bind_unix(tmp_path / "s.sock", 0o600, None)
    assert victim.read_text() == "x"


def test_activation_env_for_another_pid_is_ignored() -> None:
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"}
    assert server.activated_sockets(env) == {}


_ACTIVATE = """
import os, sys
decide, control = int(sys.argv[1]), int(sys.argv[2])
os.dup2(decide, 3); os.dup2(control, 4)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="2",
                  LISTEN_FDNAMES="decide:control")
os.execv(sys.executable, [sys.executable, "-c",
    "import os, sys; from kmodd.daemon.server import activated_sockets as a; "
    "found = a(); print(sorted(map(str, found)), sorted(k.getsockname() for k in found.values()), "
    "'LISTEN_PID' in os.environ)"])
"""


def test_socket_activation_by_fd_name(tmp_path: Path) -> None:
    socks = []
    for name in ("decide.sock", "control.sock"):
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(tmp_path / name))
        s.listen()
        socks.append(s)
    fds = [s.fileno() for s in socks]
    out = subprocess.run(
        [sys.executable, "-c", _ACTIVATE, *map(str, fds)],
        pass_fds=fds,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    expected = sorted(str(tmp_path / n) for n in ("control.sock", "decide.sock"))
    assert out.strip() == f"['control', 'decide'] {expected} False"
    for s in socks:
        s.close()


def test_atomic_write_replaces_and_skips_identical(tmp_path: Path) -> None:
    path = tmp_path / "f.conf"
    assert atomic.write_atomic(path, b"one\n") is True
    inode = path.stat().st_ino
    assert atomic.write_atomic(path, b"one\n") is False  # unchanged: not rewritten
    assert path.stat().st_ino == inode
    assert atomic.write_atomic(path, b"two\n") is True
    assert path.read_bytes() == b"two\n" and path.stat().st_ino != inode
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["f.conf"]


def test_atomic_write_refuses_a_symlinked_directory(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(atomic.UnsafePathError):
        atomic.write_atomic(tmp_path / "link/f.conf", b"x")
    assert list(real.iterdir()) == []


def test_atomic_write_replaces_a_planted_symlink_without_following(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / "f.conf").symlink_to(victim)
    atomic.write_atomic(tmp_path / "f.conf", b"new")
    assert victim.read_text() == "keep"
    assert not (tmp_path / "f.conf").is_symlink()
    assert (tmp_path / "f.conf").read_bytes() == b"new"


# --- decide connections through a real Server loop ---------------------------------------


class _Decider:
    def __init__(self) -> None:
        self.names: list[bytes] = []
        self.parked: list[Callable[[bytes], None]] = []

    def decide_line(
        self, name: bytes, peer: server.Peer, respond: Callable[[bytes], None]
    ) -> bytes | None:
        self.names.append(name)
        if name.startswith(b"parked-"):  # answered later, as the core does for attribution
            self.parked.append(respond)
            return None
        return b"deny test-rule\n"

    def control(self, call: object, peer: server.Peer, respond: object) -> None:
        raise AssertionError("no control calls here")

    def call_timeout(self, call: object) -> float:
        return server.CONTROL_CALL_TIMEOUT_S

    def refused(self, kind: server.Kind, peer: server.Peer, what: str) -> None:
        raise AssertionError(f"refused: {what}")


def _serve_until(srv: server.Server, done: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not done():
        assert time.monotonic() < deadline, "the server never got there"
        srv.poll(0.05)


@root_required
def test_decide_line_sent_whole_or_in_pieces_is_answered(tmp_path: Path) -> None:
    """A line already there at accept is answered without the selector; a line that
    arrives in pieces, or a client that sends nothing, is left to it."""
    path = tmp_path / "decide.sock"
    handler = _Decider()
    srv = server.Server({server.Kind.DECIDE: server.bind_unix(path, 0o600, None)}, handler)
    try:
        whole = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        whole.connect(str(path))
        whole.sendall(b"decide fs-whole\n")
        pieces = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        pieces.connect(str(path))
        pieces.sendall(b"decide fs-pi")
        idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        idle.connect(str(path))
        _serve_until(
            srv, lambda: handler.names == [b"fs-whole"] and srv.next_deadline() is not None
        )
        assert whole.recv(100) == b"deny test-rule\n"
        pieces.sendall(b"eces\n")
        _serve_until(srv, lambda: len(handler.names) == 2)
        assert pieces.recv(100) == b"deny test-rule\n"
        assert pieces.recv(100) == b""  # answered and closed
        _serve_until(srv, lambda: srv.next_deadline() is None)  # the idle one timed out
        assert idle.recv(100) == b""
        assert handler.names == [b"fs-whole", b"fs-pieces"]
    finally:
        srv.close()


@root_required
def test_a_parked_decision_holds_only_its_own_connection(tmp_path: Path) -> None:
    """decide_line may answer later (the core parks a request waiting for its requester):
    the connection stays open without a reply, others are served meanwhile, and the late
    answer arrives and closes it; extra bytes on the parked connection change nothing."""
    path = tmp_path / "decide.sock"
    handler = _Decider()
    srv = server.Server({server.Kind.DECIDE: server.bind_unix(path, 0o600, None)}, handler)
    try:
        parked = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        parked.connect(str(path))
        parked.sendall(b"decide parked-1\n")
        _serve_until(srv, lambda: len(handler.parked) == 1)
        parked.sendall(b"decide fs-again\n")  # ignored: one request per connection
        other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        other.connect(str(path))
        other.sendall(b"decide fs-other\n")
        _serve_until(srv, lambda: b"fs-other" in handler.names)
        assert other.recv(100) == b"deny test-rule\n"
        parked.setblocking(False)
        with pytest.raises(BlockingIOError):
            parked.recv(100)  # nothing yet
        handler.parked[0](b"allow late\n")
        parked.setblocking(True)
        assert parked.recv(100) == b"allow late\n"
        assert parked.recv(100) == b""
        assert handler.names == [b"parked-1", b"fs-other"]
    finally:
        srv.close()
