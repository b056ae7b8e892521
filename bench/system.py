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

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> float:
        notify = self.r.top / "notify.sock"
        notify.unlink(missing_ok=True)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.bind(str(notify))
            env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "LISTEN_"))}
            env["NOTIFY_SOCKET"] = str(notify)
            with self.log.open("ab") as log:
                started = time.perf_counter()
                self.proc = subprocess.Popen(
                    self.argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env
                )
            self._wait_ready(sock)
            return time.perf_counter() - started

    def _wait_ready(self, sock: socket.socket) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"kmodd exited: {self.log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("kmodd sent no READY=1")
            sock.settimeout(0.2)
            try:
                data = sock.recv(4096)
            except TimeoutError:
                continue
            if b"READY=1" in data.split(b"\n"):
                return

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
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@contextlib.contextmanager
def running(d: Daemon) -> Iterator[float]:
    try:
        yield d.start()
    finally:
        d.stop()
