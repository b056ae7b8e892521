"""sd_notify against a real AF_UNIX datagram socket standing in for the service manager."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmodd.daemon.notify import STATUS_MAX, Notifier, watchdog_config


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(5)
        yield sock, path


def fields(sock: socket.socket) -> list[str]:
    return sock.recv(8192).decode().split("\n")


def test_ready_status_and_stopping_are_exact_datagrams(
    manager: tuple[socket.socket, str],
) -> None:
    sock, path = manager
    notifier = Notifier({"NOTIFY_SOCKET": path}, pid=4242)
    assert notifier.ready("generation 1, enforce")
    assert fields(sock) == ["READY=1", "STATUS=generation 1, enforce", "MAINPID=4242"]
    assert notifier.status("generation 2")
    assert fields(sock) == ["STATUS=generation 2"]
    assert notifier.stopping()
    assert fields(sock) == ["STOPPING=1"]
    assert notifier.stopping("bye")
    assert fields(sock) == ["STOPPING=1", "STATUS=bye"]


def test_reloading_carries_monotonic_usec(manager: tuple[socket.socket, str]) -> None:
    sock, path = manager
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert Notifier({"NOTIFY_SOCKET": path}).reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    reloading, monotonic = fields(sock)
    assert reloading == "RELOADING=1"
    key, value = monotonic.split("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_status_cannot_inject_assignments(manager: tuple[socket.socket, str]) -> None:
    sock, path = manager
    Notifier({"NOTIFY_SOCKET": path}).status("evil.yaml\nREADY=1\x00" + "x" * 5000)
    (line,) = fields(sock)
    assert line.startswith("STATUS=evil.yaml READY=1 x")
    assert len(line) == len("STATUS=") + STATUS_MAX


def test_abstract_socket(tmp_path: Path) -> None:
    name = f"kmodd-test-{os.getpid()}-{tmp_path.name}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).status("hi")
        assert fields(sock) == ["STATUS=hi"]


def test_watchdog_only_when_enabled_for_our_pid(manager: tuple[socket.socket, str]) -> None:
    sock, path = manager
    off = Notifier({"NOTIFY_SOCKET": path})
    assert off.watchdog_ping_interval_s is None
    assert not off.watchdog()
    other = Notifier(
        {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, pid=2
    )
    assert not other.watchdog()
    on = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, pid=7)
    assert on.watchdog_ping_interval_s == 15.0
    assert on.watchdog()
    assert fields(sock) == ["WATCHDOG=1"]


@pytest.mark.parametrize("usec", ["", "0", "-5", "abc", "1e6"])
def test_bad_watchdog_usec_disables_it(usec: str) -> None:
    assert watchdog_config({"WATCHDOG_USEC": usec}, 1) is None


def test_without_notify_socket_everything_is_a_noop() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert not notifier.ready("x")
    assert not notifier.reloading()
    assert not notifier.stopping()
    assert notifier.failures == 0


def test_dead_manager_is_counted_not_raised(tmp_path: Path) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert not notifier.ready("x")
    assert notifier.failures == 1
