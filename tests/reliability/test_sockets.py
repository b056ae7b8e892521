"""Hostile socket clients: random and oversized frames, half-open, very slow and idle
clients, many connections at once.  Throughout, a well-behaved helper (Probe: the helper's
own client with its real 0.5 s timeout) must get every answer right, and the daemon's
RSS and fd count must come back to where they were."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kmodd import helper, wire
from tests.conftest import root_required
from tests.daemon.running import as_nobody
from tests.reliability.conftest import (
    CLIENT_TIMEOUT_S,
    Probe,
    Rel,
    Tally,
    fd_count,
    fuzz,
    raw_exchange,
    rss_kib,
)

pytestmark = [pytest.mark.reliability, root_required, pytest.mark.root]
SETTLE_S = 15.0  # deadline for the daemon's fds to come back after clients went away


def _wait_fds(rel: Rel, want: int) -> int:
    deadline = time.monotonic() + SETTLE_S
    while (now := fd_count(rel.pid)) > want and time.monotonic() < deadline:
        time.sleep(0.05)
    return now


def _frames(reply: bytes) -> list[bytes]:
    assert reply == b"" or reply.endswith(b"\0"), reply[-200:]
    return [f for f in reply.split(b"\0") if f]


methods = st.sampled_from(
    [m.value for m in wire.Method if m is not wire.Method.RELOAD]  # a reload costs ~2 s
    + ["io.kmodd.Nope", "", "io.kmodd.Status\0", "io.kmodd.Reload "]
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
calls = st.fixed_dictionaries(
    {"method": methods | json_values},
    optional={
        "parameters": st.fixed_dictionaries(
            {}, optional={"name": json_values, "source": json_values}
        )
        | json_values
    },
).map(lambda d: json.dumps(d).encode())
control_frames = st.lists(
    calls | st.binary(max_size=200) | st.just(b"{") | st.just(b'{"method":'), min_size=1, max_size=4
).map(lambda parts: b"\0".join(parts) + b"\0")


@fuzz(400)
@given(control_frames)
def test_random_control_frames(rel: Rel, tally: Tally, data: bytes) -> None:
    """Every reply is a well-formed frame (a reply or a typed error) and the connection
    always ends: no frame makes the daemon hang, crash or answer garbage."""
    frames = _frames(raw_exchange(rel.control_path, data))
    calls = data.count(b"\0")
    assert 1 <= len(frames) <= calls  # the first frame is always answered
    errors: list[str | None] = []
    for frame in frames:
        try:
            wire.decode_reply(frame)
            errors.append(None)
        except wire.RemoteError as err:
            assert err.name in set(wire.ErrorName), err.name
            errors.append(err.name)
    if len(frames) < calls:  # the daemon stopped answering: only after a closing error
        assert wire.ErrorName.INVALID_FRAME in errors, errors
    assert rel.alive()
    tally.add("sockets.control_random_frames", 1, calls=data.count(b"\0"))


@fuzz(400)
@given(st.binary(max_size=600))
def test_random_decide_frames(rel: Rel, tally: Tally, data: bytes) -> None:
    """Anything on decide.sock gets at most one line back: a verdict or an error."""
    reply = raw_exchange(rel.decide_path, data)
    assert reply == _expected_decide(rel, data), data
    assert rel.alive()
    tally.add("sockets.decide_random_frames", 1)


def _expected_decide(rel: Rel, data: bytes) -> bytes:
    """The one right answer to DATA sent whole, then EOF (docs/protocol.md)."""
    end = data.find(b"\n")
    if end < 0:  # no line: too long is an error, a partial line is closed unanswered
        return b"error request too long\n" if len(data) > helper.DECIDE_MAX else b""
    line = data[:end]
    if not line.startswith(helper.DECIDE_PREFIX):
        return b"error expected: decide NAME\n"
    name = line[len(helper.DECIDE_PREFIX) :]
    if not helper.valid_name(name):
        return b"deny invalid-name\n"
    return rel.expect(name.decode("ascii"))


def test_oversized_frames(rel: Rel, tally: Tally) -> None:
    """16 MiB without a frame end on each socket: refused with an error, memory bounded."""
    before = rss_kib(rel.pid)
    with Probe(rel) as probe:
        for path, blob in (
            (rel.decide_path, b"decide " + b"A" * (16 << 20)),
            (rel.control_path, b'{"method":"io.kmodd.Status","x":"' + b"A" * (16 << 20)),
        ):
            reply = raw_exchange(path, blob, timeout=30)
            assert b"error" in reply or b"InvalidFrame" in reply, reply[:200]
    probe.check()
    growth = rss_kib(rel.pid) - before
    # One 1 MiB frame buffer may be kept by the allocator, 16 MiB must never be.
    assert growth < 8 * 1024, f"RSS grew by {growth} KiB"
    tally.add(
        "sockets.oversized",
        2,
        rss_growth_kib=growth,
        probes=len(probe.answers),
        worst_ms=round(probe.worst_s * 1000, 1),
    )


def _hold(path: str, count: int, send: bytes, half_close: bool) -> list[socket.socket]:
    held = []
    for _ in range(count):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        if send:
            s.sendall(send)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        held.append(s)
    return held


def test_half_open_and_idle_clients(rel: Rel, tally: Tally) -> None:
    """200 idle and half-open clients on both sockets, never reading: the probe is still
    answered, and every slot is given back by the deadlines."""
    fds = _wait_fds(rel, fd_count(rel.pid))
    held: list[socket.socket] = []
    with Probe(rel) as probe:
        try:
            held += _hold(rel.decide_path, 50, b"", half_close=False)
            held += _hold(rel.decide_path, 50, b"decide alg", half_close=True)
            held += _hold(rel.control_path, 50, b'{"method":"io.k', half_close=True)
            held += _hold(rel.control_path, 50, b"", half_close=False)
            time.sleep(1.5)  # past the decide deadline (1 s): those slots must be freed
        finally:
            for s in held:
                s.close()
    probe.check()
    assert _wait_fds(rel, fds) == fds
    tally.add(
        "sockets.half_open_idle",
        len(held),
        probes=len(probe.answers),
        worst_ms=round(probe.worst_s * 1000, 1),
    )


def test_very_slow_clients(rel: Rel, tally: Tally) -> None:
    """20 clients dribbling one byte every 50 ms (slowloris) on both sockets."""
    stop = threading.Event()
    answers: list[bytes] = []

    def dribble(path: str, data: bytes) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(CLIENT_TIMEOUT_S)
            s.connect(path)
            with contextlib.suppress(OSError):
                for byte in data:
                    if stop.wait(0.05):
                        return
                    s.send(bytes([byte]))
            with contextlib.suppress(OSError):
                answers.append(s.recv(4096))

    jobs = [(rel.decide_path, b"decide algif-aead-but-very-slowly-sent\n")] * 10
    jobs += [(rel.control_path, b'{"method":"io.kmodd.Status","parameters":{}}\0')] * 10
    threads = [threading.Thread(target=dribble, args=job) for job in jobs]
    with Probe(rel) as probe:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        stop.set()
    probe.check()
    assert not any(t.is_alive() for t in threads)
    # decide: cut at the 1 s deadline, before the line is complete (39 bytes x 50 ms);
    # control: 44 bytes x 50 ms = 2.2 s, well inside 30 s: answered.
    assert sum(a.startswith(b'{"parameters"') for a in answers) == 10, answers
    tally.add(
        "sockets.slow_clients",
        len(jobs),
        probes=len(probe.answers),
        worst_ms=round(probe.worst_s * 1000, 1),
    )


def test_many_connections_at_once(rel: Rel, tally: Tally) -> None:
    """400 decide connections from 8 threads at once, each asking a real question."""
    results: list[bytes | None] = []
    lock = threading.Lock()

    def burst() -> None:
        for _ in range(50):
            got = helper.ask_daemon(rel.decide_path, b"fs-vfat", 5.0)
            with lock:
                results.append(got)

    threads = [threading.Thread(target=burst) for _ in range(8)]
    held = _hold(rel.decide_path, 300, b"", half_close=False)  # and 300 silent ones
    try:
        with Probe(rel) as probe:
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
    finally:
        for s in held:
            s.close()
    probe.check()
    assert results == [b"deny no-vfat"] * 400
    tally.add(
        "sockets.many_connections",
        700,
        answered=len(results),
        probes=len(probe.answers),
        worst_ms=round(probe.worst_s * 1000, 1),
    )


_HOG = """
import socket, sys, time
held = []
for _ in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    held.append(s)
print("holding", len(held), flush=True)
time.sleep(float(sys.argv[3]))
"""


def test_status_group_cannot_starve_decisions(rel: Rel, tally: Tally) -> None:
    """A non-root member of the status group may open control connections, but holding
    more of them than the daemon's connection limit must not cost the kernel's helpers
    their answers: decide.sock keeps slots of its own."""
    hog = threading.Thread(target=as_nobody, args=(_HOG, rel.control_path, "600", "4"))
    with Probe(rel) as probe:
        hog.start()
        time.sleep(2.0)  # the hog holds its connections for 4 s
        hog.join(30)
    probe.check()
    tally.add(
        "sockets.status_group_hog",
        600,
        probes=len(probe.answers),
        worst_ms=round(probe.worst_s * 1000, 1),
    )
