"""Shared harness of the reliability suite: one real daemon over the real kernel tree (the
tests/daemon/running.py harness), raw socket clients, a parallel kernel-like helper runner,
/proc probes of the daemon (RSS, fds), and a tally of cases for docs/reliability.md.

Set KMODD_RELIABILITY_TALLY=FILE to get the case counts of a run as JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from kmodd import helper, wire
from tests.daemon.running import BASE_POLICY, HELPER, KERNEL_ENV, Daemon, SystemRoot, make_root
from tests.kerneltree import KernelTree

TALLY_ENV = "KMODD_RELIABILITY_TALLY"
CLIENT_TIMEOUT_S = 5.0  # no single answer may take longer: an "unbounded wait" fails here
HELPER_TIMEOUT_S = 10.0  # a kernel-like helper run, start-up included (~0.1 s normally)

POLICY = (
    BASE_POLICY
    + """\
  - id: no-vfat
    action: deny
    match:
      module: [vfat]
    reason: "reliability: no FAT"
  - id: no-cramfs-request
    action: deny
    match:
      request: ["fs-cramfs"]
    reason: "reliability: request glob"
"""
)

# The helper execs this on allow: it records its argv in a file named after its pid, which
# is the pid of the helper process (sh and python exec, they never fork), so many helpers
# can run at once.
RECORDING_MODPROBE = (
    '#!/bin/sh\nprintf "%s\\n" "$@" > {dir}/rec.$$.tmp\nmv {dir}/rec.$$.tmp {dir}/rec.$$\n'
)


def fuzz(examples: int) -> settings:
    """Hypothesis settings of the suite: deterministic (CI must not flake on a new random
    draw), no example database (no .hypothesis dir), no per-example deadline."""
    return settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@dataclass
class Tally:
    """Cases per attack/fault and their outcome, for docs/reliability.md (int outcomes
    are summed over calls, anything else is the last value)."""

    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, key: str, cases: int = 1, **outcome: Any) -> None:
        with self.lock:
            row = self.rows.setdefault(key, {"cases": 0})
            row["cases"] += cases
            for name, value in outcome.items():
                summed = isinstance(value, int) and not isinstance(value, bool)
                row[name] = row.get(name, 0) + value if summed else value


@pytest.fixture(scope="session")
def tally() -> Iterator[Tally]:
    t = Tally()
    yield t
    out = os.environ.get(TALLY_ENV)
    if out:
        Path(out).write_text(json.dumps(t.rows, indent=1, sort_keys=True) + "\n")


@dataclass
class Rel:
    """The shared daemon of the suite (policy POLICY, status group nogroup)."""

    sr: SystemRoot
    daemon: Daemon
    records: Path

    @property
    def decide_path(self) -> str:
        return str(self.sr.runtime / helper.DECIDE_SOCKET)

    @property
    def control_path(self) -> str:
        return str(self.sr.runtime / helper.CONTROL_SOCKET)

    @property
    def pid(self) -> int:
        assert self.daemon.proc is not None
        return self.daemon.proc.pid

    def alive(self) -> bool:
        return self.daemon.proc is not None and self.daemon.proc.poll() is None

    def expect(self, name: str) -> bytes:
        """The decide.sock answer NAME must get, from the control socket's Explain."""
        d = self.daemon.call(wire.Method.EXPLAIN, {"name": name, "source": "kernel"})
        return f"{d['effective']} {d['rule']}\n".encode()


def use_recording_modprobe(sr: SystemRoot, records: Path) -> None:
    records.mkdir(mode=0o755, exist_ok=True)
    sr.modprobe.write_text(RECORDING_MODPROBE.format(dir=records))


def start_daemon(sr: SystemRoot, *extra: str) -> Daemon:
    """A daemon logging to its log file (not this machine's journal: the suite makes
    >100,000 decisions)."""
    return Daemon(sr, extra=["--log-stderr", *extra]).start()


@pytest.fixture(scope="session")
def rel(kernel_tree: KernelTree) -> Iterator[Rel]:
    sr = make_root(kernel_tree)
    sr.write_policy(POLICY)
    records = sr.root.parent / "records"
    use_recording_modprobe(sr, records)
    daemon = start_daemon(sr, "--status-group", "nogroup", "--no-watch")
    yield Rel(sr, daemon, records)
    assert daemon.stop() == 0  # a clean exit after everything the suite threw at it
    shutil.rmtree(sr.root.parent, ignore_errors=True)


@pytest.fixture
def own_root(kernel_tree: KernelTree) -> Iterator[SystemRoot]:
    """A fresh system root for a test that runs its own daemon (stopped by the test)."""
    sr = make_root(kernel_tree)
    sr.write_policy(POLICY)
    yield sr
    shutil.rmtree(sr.root.parent, ignore_errors=True)


# --- clients ------------------------------------------------------------------------------


def raw_exchange(path: str, data: bytes, timeout: float = CLIENT_TIMEOUT_S) -> bytes:
    """Send DATA, read until the daemon closes; raises TimeoutError past TIMEOUT."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)  # EOF: a partial line or frame is all there is
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered and closed before we finished sending: read what it said
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except ConnectionResetError:
            pass
        return out


def decide_raw(rel: Rel, name: bytes) -> bytes:
    return raw_exchange(rel.decide_path, helper.DECIDE_PREFIX + name + b"\n")


def run_kernel_helper(
    rel_records: Path, runtime: Path, name: str, cwd: Path
) -> tuple[int, list[str] | None]:
    """The helper as the kernel runs it (fds 0-2 closed, kernel env, -IS), in CWD; returns
    its exit status and what the recording modprobe got (None: not exec'd)."""
    cmd = ["/bin/sh", "-c", 'exec "$@" 0<&- 1>&- 2>&-', "sh", "/usr/bin/python3", "-IS"]
    env = {**KERNEL_ENV, helper.RUNTIME_DIR_ENV: str(runtime)}
    proc = subprocess.Popen(
        [*cmd, str(HELPER), "-q", "--", name],
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        code = proc.wait(HELPER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    record = rel_records / f"rec.{proc.pid}"
    if not record.exists():
        return code, None
    lines = record.read_text().splitlines()
    record.unlink()
    return code, lines


# --- /proc probes -------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def fd_count(pid: int) -> int:
    return sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())


class Probe:
    """A well-behaved helper asking decide.sock every PERIOD seconds with the helper's own
    client and timeout (DECIDE_TIMEOUT_S) while an attack runs; `check()` asserts that
    every one of its questions got the right answer."""

    PERIOD_S = 0.02
    MINIMUM = 5

    def __init__(self, rel: Rel, name: bytes = b"algif-aead", want: bytes = b"deny copy-fail"):
        self._path = rel.decide_path
        self._name = name
        self._want = want
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.answers: list[bytes | None] = []
        self.worst_s = 0.0

    def _run(self) -> None:
        while not self._stop.wait(self.PERIOD_S):
            started = time.monotonic()
            self.answers.append(helper.ask_daemon(self._path, self._name))
            self.worst_s = max(self.worst_s, time.monotonic() - started)

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        deadline = time.monotonic() + 10.0  # a short attack still sees a few probes
        while len(self.answers) < self.MINIMUM and time.monotonic() < deadline:
            time.sleep(self.PERIOD_S)
        self._stop.set()
        self._thread.join(10)

    def check(self) -> int:
        assert len(self.answers) >= self.MINIMUM, f"only {len(self.answers)} probes ran"
        wrong = [a for a in self.answers if a != self._want]
        assert not wrong, f"{len(wrong)}/{len(self.answers)} probes unanswered/wrong: {wrong[:5]}"
        return len(self.answers)


@dataclass
class Hammered:
    asked: int
    wrong: list[tuple[bytes, bytes | None]]
    seconds: float

    @property
    def per_s(self) -> float:
        return self.asked / self.seconds if self.seconds else 0.0


def hammer(decide_path: str, expected: dict[bytes, bytes], total: int, clients: int) -> Hammered:
    """TOTAL decide.sock round trips from CLIENTS threads (the helper's own client, 5 s
    timeout), names cycling through EXPECTED; every answer is checked."""
    names = sorted(expected)
    wrong: list[tuple[bytes, bytes | None]] = []
    lock = threading.Lock()
    per = total // clients

    def client(offset: int) -> None:
        bad = []
        for i in range(per):
            name = names[(offset + i) % len(names)]
            got = helper.ask_daemon(decide_path, name, CLIENT_TIMEOUT_S)
            if got != expected[name]:
                bad.append((name, got))
        with lock:
            wrong.extend(bad)

    threads = [threading.Thread(target=client, args=(n * 7,)) for n in range(clients)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not any(t.is_alive() for t in threads), "a client hung"
    return Hammered(per * clients, wrong, time.monotonic() - started)


def expectations(rel_or_daemon: Daemon, names: list[str]) -> dict[bytes, bytes]:
    """name -> the decide.sock answer (without newline) the daemon's Explain predicts."""
    out = {}
    for name in names:
        d = rel_or_daemon.call(wire.Method.EXPLAIN, {"name": name, "source": "kernel"})
        out[name.encode()] = f"{d['effective']} {d['rule']}".encode()
    return out
