"""The daemon as systemd sees it: sd_notify READY/RELOADING/STATUS/WATCHDOG/STOPPING on a
real notify socket, signals, and kernel.modprobe management with tamper detection."""

from __future__ import annotations

import shutil
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmodd import wire
from kmodd.host.modprobe_path import PREVIOUS_FILE
from tests.conftest import root_required
from tests.daemon.running import HELPER, Daemon, SystemRoot, make_root, run_helper
from tests.kerneltree import KernelTree

pytestmark = [root_required, pytest.mark.root]


class Manager:
    """The service manager's end of NOTIFY_SOCKET.  Like PID 1 it reads continuously: a
    unix datagram socket queues only net.unix.max_dgram_qlen (10) messages, and the
    daemon's sends block when the reader stops reading."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.path = path
        self.messages: list[dict[str, str]] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096).decode()
            except OSError:
                return
            with self._cond:
                self.messages.append(dict(line.split("=", 1) for line in data.splitlines()))
                self._cond.notify_all()

    def wait_for(self, key: str, value: str | None = None, timeout: float = 60.0) -> dict[str, str]:
        """The first not-yet-consumed message carrying KEY (=VALUE); earlier ones are
        consumed with it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i, msg in enumerate(self.messages):
                    if key in msg and (value is None or msg[key] == value):
                        del self.messages[: i + 1]
                        return msg
                left = deadline - time.monotonic()
                assert left > 0, f"no {key}={value} from the daemon"
                self._cond.wait(left)

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(10)


@pytest.fixture
def sr(kernel_tree: KernelTree) -> Iterator[SystemRoot]:
    root = make_root(kernel_tree)
    yield root
    shutil.rmtree(root.root.parent, ignore_errors=True)


def test_notify_ready_reloading_watchdog_stopping(sr: SystemRoot) -> None:
    mgr = Manager(sr.root.parent / "notify.sock")
    daemon = Daemon(
        sr,
        extra=["--no-watch"],
        env={"NOTIFY_SOCKET": str(mgr.path), "WATCHDOG_USEC": "400000"},
    )
    try:
        daemon.start()
        assert daemon.proc is not None
        ready = mgr.wait_for("READY", "1")
        assert ready["MAINPID"] == str(daemon.proc.pid)
        assert ready["STATUS"].startswith("generation 1 (enforce)")
        mgr.wait_for("WATCHDOG", "1")  # pinged every WATCHDOG_USEC/2
        mgr.wait_for("WATCHDOG", "1")
        daemon.call(wire.Method.RELOAD)
        reloading = mgr.wait_for("RELOADING", "1")
        assert int(reloading["MONOTONIC_USEC"]) > 0
        assert mgr.wait_for("READY", "1")["STATUS"].startswith("generation 2 ")
        daemon.proc.send_signal(signal.SIGHUP)  # systemctl reload without ExecReload
        mgr.wait_for("RELOADING", "1")
        assert mgr.wait_for("READY", "1")["STATUS"].startswith("generation 3 ")
        assert daemon.stop() == 0
        assert mgr.wait_for("STOPPING", "1")["STATUS"] == "stopping: SIGTERM"
    finally:
        daemon.stop()
        mgr.close()


def installed_helper(sr: SystemRoot) -> Path:
    """The helper as `kmodctl install` leaves it: an executable file (the daemon refuses
    to point kernel.modprobe at anything else)."""
    path = sr.root.parent / "kmodd-modprobe"
    shutil.copyfile(HELPER, path)
    path.chmod(0o755)
    return path


def managing_daemon(sr: SystemRoot, sysctl: Path, helper_path: Path, *, reassert: bool) -> Daemon:
    """A daemon that manages SYSCTL (standing in for kernel.modprobe), ticking (checking
    for tampering) every 0.2 s."""
    extra = ["--no-watch", "--modprobe-sysctl", str(sysctl), "--helper-path", str(helper_path)]
    return Daemon(
        sr,
        extra=[*extra, "--reassert"] if reassert else extra,
        env={"WATCHDOG_USEC": "400000"},
    )


def test_kernel_modprobe_is_pointed_at_the_helper_and_tamper_is_seen(sr: SystemRoot) -> None:
    sysctl = sr.root.parent / "kernel.modprobe"
    sysctl.write_text("/sbin/modprobe\n")
    helper_path = installed_helper(sr)
    daemon = managing_daemon(sr, sysctl, helper_path, reassert=True)
    try:
        daemon.start()
        assert sysctl.read_text().strip() == str(helper_path)
        assert (sr.runtime / PREVIOUS_FILE).read_text().strip() == "/sbin/modprobe"
        km = daemon.wait_status(lambda d: d["kernel_modprobe"]["managed"])["kernel_modprobe"]
        assert km == {
            "managed": True,
            "points_at_helper": True,
            "current": str(helper_path),
            "expected": str(helper_path),
        }
        sysctl.write_text("/tmp/evil\n")
        # --reassert: the daemon notices (journal TAMPER record) and points it back.
        deadline = time.monotonic() + 30
        while sysctl.read_text().strip() != str(helper_path):
            assert time.monotonic() < deadline, "kernel.modprobe was not re-asserted"
            time.sleep(0.05)
        assert daemon.stop() == 0
        # Stopping leaves the helper in place: it keeps enforcing from the snapshot.
        assert sysctl.read_text().strip() == str(helper_path)
    finally:
        daemon.stop()


def test_tamper_without_reassert_shows_in_status(sr: SystemRoot) -> None:
    sysctl = sr.root.parent / "kernel.modprobe"
    sysctl.write_text("/sbin/modprobe\n")
    daemon = managing_daemon(sr, sysctl, installed_helper(sr), reassert=False)
    try:
        daemon.start()
        sysctl.write_text("/tmp/evil\n")
        doc = daemon.wait_status(lambda d: d["kernel_modprobe"]["points_at_helper"] is False)
        assert doc["kernel_modprobe"]["current"] == "/tmp/evil"
        assert sysctl.read_text() == "/tmp/evil\n"
    finally:
        daemon.stop()


def test_a_manager_that_stops_reading_never_stalls_the_daemon(sr: SystemRoot) -> None:
    deaf = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    deaf.bind(str(sr.root.parent / "deaf.sock"))  # bound, never read: 10 datagrams fill it
    daemon = Daemon(
        sr,
        extra=["--no-watch"],
        env={"NOTIFY_SOCKET": str(sr.root.parent / "deaf.sock"), "WATCHDOG_USEC": "100000"},
    )
    try:
        daemon.start()
        # The relay fills up behind the deaf socket (pings every 50 ms) and drops.
        daemon.wait_status(lambda d: d["notify"]["dropped"] > 0)
        gen = daemon.generation()
        assert gen is not None
        assert daemon.call(wire.Method.RELOAD)["generation"] == gen + 1
        assert run_helper(sr, "-q", "--", "algif-aead") == (1, None)
        assert daemon.status()["decisions"]["sources"] == {"kernel": 1}
        assert daemon.stop() == 0
    finally:
        daemon.stop()
        deaf.close()


def test_failed_reassert_is_reported_and_the_daemon_keeps_running(sr: SystemRoot) -> None:
    sysctl = sr.root.parent / "kernel.modprobe"
    sysctl.write_text("/sbin/modprobe\n")
    helper_path = installed_helper(sr)
    daemon = managing_daemon(sr, sysctl, helper_path, reassert=True)
    try:
        daemon.start()
        assert sysctl.read_text().strip() == str(helper_path)
        helper_path.unlink()  # re-asserting now fails: the helper is gone
        sysctl.write_text("/tmp/evil\n")
        doc = daemon.wait_status(lambda d: d["kernel_modprobe"]["points_at_helper"] is False)
        assert doc["kernel_modprobe"]["current"] == "/tmp/evil"
        # Still serving: a later status shows the same tamper state, the process is alive.
        deadline = time.monotonic() + 30
        while "cannot re-assert kernel.modprobe" not in daemon.log.read_text():
            assert time.monotonic() < deadline, "the failed re-assert was not logged"
            time.sleep(0.05)
        daemon.wait_status(lambda d: d["kernel_modprobe"]["current"] == "/tmp/evil")
        assert daemon.proc is not None and daemon.proc.poll() is None
    finally:
        daemon.stop()
