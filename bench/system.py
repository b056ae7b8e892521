"""A temp system root over the real kernel tree, and the real `kmodd` process on it.

The daemon is started the way systemd starts it (Type=notify): a NOTIFY_SOCKET datagram
socket of our own tells us when READY=1 is sent, which is the start-up figure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kmodd import helper, wire
from kmodd.cli import client
from tests.kerneltree import KernelTree

REPO = Path(__file__).resolve().parents[1]
KMODD = REPO / ".venv/bin/kmodd"
KMODCTL = REPO / ".venv/bin/kmodctl"
BASELINE = REPO / "policies/10-baseline.yaml"
READY_TIMEOUT_S = 60.0

SITE_POLICY = """\
kmodd: 1
default: allow
rules:
  - id: bench-deny
    action: deny
    match:
      request: ["bench-deny-*"]
    reason: "benchmark rule"
"""


@dataclass(frozen=True, slots=True)
class Root:
    """TOP/root with lib/modules/REL -> the cached tree, the shipped baseline installed
    where `kmodctl install` puts it, one site policy, and a runtime dir outside it."""

    top: Path
    release: str

    @property
    def root(self) -> Path:
        return self.top / "root"

    @property
    def runtime(self) -> Path:
        return self.top / "run-kmodd"

    @property
    def site_policy(self) -> Path:
        return self.root / "etc/kmodd/policy.d/50-site.yaml"

    @property
    def modprobe_d(self) -> Path:
        return self.root / "etc/modprobe.d"


@contextlib.contextmanager
def temp_root(tree: KernelTree) -> Iterator[Root]:
    top = Path(tempfile.mkdtemp(prefix="kmodd-bench-"))
    try:
        r = Root(top, tree.release)
        (r.root / "lib/modules").mkdir(parents=True)
        (r.root / "lib/modules" / tree.release).symlink_to(tree.module_dir)
        for sub in ("etc/kmodd/policy.d", "usr/lib/kmodd/policy.d", "etc/modprobe.d", "run"):
            (r.root / sub).mkdir(parents=True)
        shutil.copy(BASELINE, r.root / "usr/lib/kmodd/policy.d" / BASELINE.name)
        r.site_policy.write_text(SITE_POLICY)
        (top / "cmdline").write_text("BOOT_IMAGE=/vmlinuz root=/dev/vda quiet\n")
        yield r
    finally:
        shutil.rmtree(top, ignore_errors=True)


class Daemon:
    """`kmodd` on ROOT; `start()` returns the seconds from exec to READY=1."""

    def __init__(self, r: Root, helper_path: Path, modprobe: str, extra: Sequence[str] = ()):
        self.r = r
        self.argv = [
            str(KMODD),
            "--root",
            str(r.root),
            "--kernel",
            r.release,
            "--runtime-dir",
            str(r.runtime),
            "--modprobe",
            modprobe,
            "--helper-path",
            str(helper_path),
            "--cmdline",
            str(r.top / "cmdline"),
            "--no-modprobe-path",
            "--no-udev",  # uevents of this machine would add noise, not load
            *extra,
        ]
        self.log = r.top / "kmodd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.notify: NotifyListener | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> float:
        """Exec the daemon; the seconds until its first READY=1."""
        self.notify = NotifyListener(self.r.top / "notify.sock")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "LISTEN_"))}
        env["NOTIFY_SOCKET"] = str(self.notify.path)
        with self.log.open("ab") as log:
            started = time.perf_counter()
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env
            )
        return self.wait_ready(started) - started

    def wait_ready(self, after: float) -> float:
        """The perf_counter time of the first READY=1 received after AFTER."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            assert self.proc is not None and self.notify is not None
            found = self.notify.ready_after(after, timeout=0.2)
            if found is not None:
                return found
            if self.proc.poll() is not None:
                raise RuntimeError(f"kmodd exited: {self.log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("kmodd sent no READY=1")

    def status(self) -> dict[str, Any]:
        return client.call(self.r.runtime / helper.CONTROL_SOCKET, wire.Method.STATUS)

    def generation(self) -> int:
        gen = self.status()["generation"]
        return -1 if gen is None else int(gen["number"])

    def rss_mb(self) -> float:
        """Resident set of the daemon (VmRSS), MiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def stop(self) -> None:
        try:
            if self.proc is None or self.proc.poll() is not None:
                return
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        finally:
            if self.notify is not None:
                self.notify.close()
                self.notify = None


class NotifyListener:
    """Our NOTIFY_SOCKET, read continuously like PID 1 does: a unix datagram queue holds
    net.unix.max_dgram_qlen (10) messages, and a reader that stops would make the
    daemon's notify sends fail.  READY=1 arrives at start and after every reload (once
    the new generation is swapped in), so its arrival time is the figure, no polling."""

    def __init__(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.bind(str(path))
        self._sock.settimeout(0.2)
        self._ready: list[float] = []  # perf_counter times of READY=1
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="notify", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closed:
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            if b"READY=1" in data.split(b"\n"):
                with self._cond:
                    self._ready.append(time.perf_counter())
                    self._cond.notify_all()

    def ready_after(self, after: float, timeout: float) -> float | None:
        with self._cond:
            self._cond.wait_for(lambda: any(t > after for t in self._ready), timeout)
            return next((t for t in self._ready if t > after), None)

    def close(self) -> None:
        self._closed = True
        self._thread.join(2)
        self._sock.close()
        self.path.unlink(missing_ok=True)


@contextlib.contextmanager
def running(d: Daemon) -> Iterator[float]:
    try:
        yield d.start()
    finally:
        d.stop()
