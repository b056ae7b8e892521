"""A slow first build as systemd sees it (issue 14): the real daemon on a build held open
(tests/daemon/slowbuild.py), a real notify socket, real signals.  It asks for more time
while building, stops at once on SIGTERM without publishing anything, and gives up (exit
75, the stored generation published) after --start-cap."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmodd.daemon.startup import (
    EXIT_START_GAVE_UP,
    IMPORT_EXTEND_S,
    BuildCancelled,
    CommitGate,
    StartLimits,
    StartOutcome,
    wait_for_first,
)
from tests.conftest import root_required
from tests.daemon.running import REPO, Daemon, SystemRoot, make_root
from tests.daemon.slowbuild import GATE_ENV, STARTED_ENV
from tests.daemon.test_lifecycle import Manager
from tests.kerneltree import KernelTree

STORE = "var/lib/kmodd/last-good"


@pytest.fixture
def sr(kernel_tree: KernelTree) -> Iterator[SystemRoot]:
    root = make_root(kernel_tree)
    yield root
    shutil.rmtree(root.root.parent, ignore_errors=True)


class Held:
    """kmodd with its builds held until release() (or forever)."""

    def __init__(self, sr: SystemRoot, *extra: str) -> None:
        top = sr.root.parent
        self.gate, self.started = top / "build.go", top / "build.started"
        self.mgr = Manager(top / "notify.sock")
        env = {"NOTIFY_SOCKET": str(self.mgr.path), GATE_ENV: str(self.gate)}
        env[STARTED_ENV] = str(self.started)
        self.daemon = Daemon(sr, extra=["--no-watch", *extra], env=env, wrap=_slow)
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self) -> Held:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NOTIFY_")}
        env.update(self.daemon.env)
        with self.daemon.log.open("ab") as log:
            self.proc = subprocess.Popen(
                self.daemon.argv(), stdout=log, stderr=log, env=env, cwd=Path(__file__).parents[2]
            )
        deadline = time.monotonic() + 90
        while not self.started.exists():
            assert self.proc.poll() is None, self.daemon.log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the build never started"
            time.sleep(0.02)
        return self

    def release(self) -> None:
        self.gate.touch()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.mgr.close()


def _slow(cmd: list[str]) -> list[str]:
    return [part if part != "kmodd.daemon.main" else "tests.daemon.slowbuild" for part in cmd]


def published(sr: SystemRoot) -> list[Path]:
    """Everything a generation publishes or persists."""
    found = [sr.enforcement, sr.runtime / "snapshot", sr.root / STORE / "manifest"]
    return [p for p in found if p.exists()]


@root_required
@pytest.mark.root
def test_a_slow_first_build_extends_the_start_timeout(sr: SystemRoot) -> None:
    held = Held(sr).spawn()
    try:
        first = held.mgr.wait_for("EXTEND_TIMEOUT_USEC")  # before the setup steps
        assert first["EXTEND_TIMEOUT_USEC"] == "15000000"
        for _ in range(3):  # then every 5 s while building, with a progress STATUS
            msg = held.mgr.wait_for("EXTEND_TIMEOUT_USEC", timeout=30)
            assert msg["EXTEND_TIMEOUT_USEC"] == "15000000"
            assert msg["STATUS"].startswith("building the first policy generation (")
        assert not any("READY" in m for m in held.mgr.messages)
        assert published(sr) == []
        held.release()
        ready = held.mgr.wait_for("READY", "1", timeout=90)
        assert ready["STATUS"].startswith("generation 1 (enforce)")
        assert len(published(sr)) == 3
        assert held.proc is not None
        held.proc.send_signal(signal.SIGTERM)
        assert held.proc.wait(30) == 0
    finally:
        held.close()


@root_required
@pytest.mark.root
def test_sigterm_mid_build_exits_at_once_and_publishes_nothing(sr: SystemRoot) -> None:
    held = Held(sr).spawn()
    try:
        held.mgr.wait_for("EXTEND_TIMEOUT_USEC")
        assert held.proc is not None
        start = time.monotonic()
        held.proc.send_signal(signal.SIGTERM)
        code = held.proc.wait(30)  # before issue 14: never, the build held the main thread
        took = time.monotonic() - start
        print(f"SIGTERM to exit during the first build: {took * 1e3:.0f} ms")
        assert code == 0
        stopping = held.mgr.wait_for("STOPPING", "1")
        assert stopping["STATUS"] == "stopping: SIGTERM during the first build (nothing published)"
        assert published(sr) == []
        # kmodd-boot-wait (slow path) lets udev go now rather than after its 90 s
        marker = (sr.runtime / "published").read_text()
        assert marker.startswith("none: kmodd stopped (SIGTERM) before its first generation")
        held.release()  # the builder is gone with the process: still nothing appears
        time.sleep(0.5)
        assert published(sr) == []
        assert "Traceback" not in held.daemon.log.read_text()
    finally:
        held.close()


@root_required
@pytest.mark.root
def test_giving_up_after_the_cap_publishes_the_stored_generation(sr: SystemRoot) -> None:
    first = Daemon(sr, extra=["--no-watch"]).start()  # generation 1, persisted
    assert first.stop() == 0
    stored_snapshot = (sr.runtime / "snapshot").read_bytes()
    for path in (sr.enforcement, sr.runtime / "snapshot", sr.runtime / "published"):
        path.unlink()  # a new boot whose boot step did not publish (inputs changed)
    held = Held(sr, "--start-cap", "6").spawn()
    try:
        assert held.proc is not None
        assert held.proc.wait(60) == EXIT_START_GAVE_UP  # never READY, never restarted
        assert not any("READY" in m for m in held.mgr.messages)
        log = held.daemon.log.read_text()
        assert "the first policy generation was not built within 6 s: giving up, exit 75" in log
        assert "enforcing the last good generation 1" in log
        assert (sr.runtime / "snapshot").read_bytes() == stored_snapshot
        assert (sr.runtime / "published").read_text().startswith("daemon last-good generation 1")
    finally:
        held.close()


def test_the_kmodd_command_asks_for_time_before_importing_the_daemon(tmp_path: Path) -> None:
    """The entry point sends its EXTEND_TIMEOUT_USEC= before the daemon's imports and
    argument parsing: a bad option still exits 2, after the message."""
    mgr = Manager(tmp_path / "notify.sock")
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NOTIFY_")}
        env["NOTIFY_SOCKET"] = str(mgr.path)
        cmd = [sys.executable, "-m", "kmodd.daemon.entry", "--bogus"]
        proc = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=120, check=False
        )
        assert proc.returncode == 2 and "--bogus" in proc.stderr
        msg = mgr.wait_for("EXTEND_TIMEOUT_USEC")
        assert msg["EXTEND_TIMEOUT_USEC"] == str(int(IMPORT_EXTEND_S * 1_000_000))
    finally:
        mgr.close()


def test_the_kmodd_script_is_the_entry_module() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["kmodd"] == "kmodd.daemon.entry:main"


# --- the pieces, without processes ---------------------------------------------------------


def test_wait_for_first_extends_until_built_and_gives_up_at_the_cap() -> None:
    now = [0.0]
    sent: list[int] = []

    def wait(timeout: float) -> StartOutcome | None:
        now[0] += timeout
        return StartOutcome.BUILT if now[0] >= 12 else None

    limits = StartLimits(every_s=5, extend_s=15, cap_s=100)
    assert wait_for_first(limits, lambda: now[0], wait, sent.append) is StartOutcome.BUILT
    assert sent == [15_000_000] * 3  # at 0, 5 and 10 s


def test_wait_for_first_stops_extending_at_the_cap() -> None:
    now = [0.0]
    sent: list[int] = []

    def never(timeout: float) -> StartOutcome | None:
        now[0] += timeout
        return None

    limits = StartLimits(every_s=5, extend_s=15, cap_s=12)
    assert wait_for_first(limits, lambda: now[0], never, sent.append) is StartOutcome.GAVE_UP
    assert now[0] == 12  # the last wait is cut at the cap, not a whole interval later
    assert len(sent) == 3


def test_a_closed_gate_refuses_commits_and_close_waits_for_one_in_progress() -> None:
    gate = CommitGate()
    inside, leave = threading.Event(), threading.Event()

    def commit() -> None:
        with gate.commit():
            inside.set()
            leave.wait(10)

    worker = threading.Thread(target=commit)
    worker.start()
    inside.wait(10)
    assert not gate.close(timeout=0.05)  # the commit holds it
    leave.set()
    worker.join(10)
    assert gate.committed == 1
    assert gate.close()
    with pytest.raises(BuildCancelled), gate.commit():
        pytest.fail("a closed gate let a commit in")
