"""Harness for daemon tests: a temp system root over the real kernel tree, the real `kmodd`
process, and the helper run the way the kernel runs it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kmodd import helper, wire
from kmodd.cli import client
from tests.kerneltree import KernelTree

REPO = Path(__file__).resolve().parents[2]
HELPER = REPO / "kmodd/helper.py"
KERNEL_ENV = {"HOME": "/", "TERM": "linux", "PATH": "/sbin:/usr/sbin:/bin:/usr/bin"}
START_TIMEOUT_S = 90.0  # the first generation resolves ~6,000 names (~2 s here)

BASE_POLICY = """\
kmodd: 1
mode: enforce
default: allow
rules:
  - id: copy-fail
    action: deny
    match:
      module: [algif_aead]
    reason: "CVE-2026-31431: AF_ALG AEAD"
"""


@dataclass
class SystemRoot:
    """ROOT with lib/modules/REL -> the cached tree (a symlink, not a 400 MB copy)."""

    root: Path
    release: str
    runtime: Path
    modprobe: Path  # the fake modprobe the helper execs on allow
    record: Path  # where the fake modprobe writes its argv
    cmdline: Path

    @property
    def policy_dir(self) -> Path:
        return self.root / "etc/kmodd/policy.d"

    @property
    def enforcement(self) -> Path:
        return self.root / "run/modprobe.d/00-kmodd.conf"

    def write_policy(self, text: str, name: str = "10-test.yaml") -> None:
        """Replace a policy file atomically (an editor's rename-over save)."""
        tmp = self.policy_dir / f".{name}.new"
        tmp.write_text(text)
        tmp.rename(self.policy_dir / name)


def make_root(tree: KernelTree, base: Path | None = None) -> SystemRoot:
    # Under /tmp with 0755 dirs (not pytest's 0700 tmp_path), so that uid 65534 can reach
    # the sockets and be refused by the daemon rather than by the file system.
    top = Path(tempfile.mkdtemp(prefix="kmodd-root-", dir=base))
    top.chmod(0o755)
    root = top / "root"
    (root / "lib/modules").mkdir(parents=True)
    (root / "lib/modules" / tree.release).symlink_to(tree.module_dir)
    (root / "etc/kmodd/policy.d").mkdir(parents=True)
    (root / "etc/modprobe.d").mkdir(parents=True)
    (root / "run").mkdir()
    record = top / "modprobe.record"
    modprobe = top / "fake-modprobe"
    modprobe.write_text(
        f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}.tmp\nmv {record}.tmp {record}\n'
    )
    modprobe.chmod(0o755)
    cmdline = top / "cmdline"
    cmdline.write_text("BOOT_IMAGE=/vmlinuz root=/dev/vda quiet\n")
    sr = SystemRoot(root, tree.release, top / "run-kmodd", modprobe, record, cmdline)
    sr.write_policy(BASE_POLICY)
    return sr


@dataclass
class Daemon:
    sr: SystemRoot
    extra: Sequence[str] = ()
    wrap: Callable[[list[str]], list[str]] | None = None
    udev: bool = False  # listen to this machine's uevents (tests of the udev path)
    env: dict[str, str] = field(default_factory=dict)  # e.g. NOTIFY_SOCKET, WATCHDOG_USEC
    proc: subprocess.Popen[bytes] | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.sr.root.parent / "kmodd.log"

    def argv(self) -> list[str]:
        sr = self.sr
        cmd = [
            sys.executable,
            "-m",
            "kmodd.daemon.main",
            "--root",
            str(sr.root),
            "--kernel",
            sr.release,
            "--runtime-dir",
            str(sr.runtime),
            "--modprobe",
            str(sr.modprobe),
            "--cmdline",
            str(sr.cmdline),
            "--helper-path",
            str(HELPER),
            *(() if self.udev else ("--no-udev",)),
            *self.extra,
        ]
        return self.wrap(cmd) if self.wrap else cmd

    def start(self) -> Daemon:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "LISTEN_"))}
        env.update(self.env)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=log, cwd=REPO, env=env)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert self.proc.poll() is None, f"kmodd exited: {self.log.read_text()[-3000:]}"
            try:
                if self.status().get("last_reload") is not None:
                    return self
            except client.DaemonNotRunningError:
                pass
            assert time.monotonic() < deadline, "kmodd did not come up"
            time.sleep(0.05)

    def call(self, method: wire.Method, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return client.call(self.sr.runtime / helper.CONTROL_SOCKET, method, params, timeout=150)

    def status(self) -> dict[str, Any]:
        return self.call(wire.Method.STATUS)

    def generation(self) -> int | None:
        gen = self.status()["generation"]
        return None if gen is None else int(gen["number"])

    def wait_status(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 30.0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            doc = self.status()
            if predicate(doc):
                return doc
            assert time.monotonic() < deadline, f"status never matched: {doc}"
            time.sleep(0.05)

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def kernel_like_argv(*args: str) -> list[str]:
    """The helper started as the kernel starts it: sh closes fds 0-2 and execs
    `/usr/bin/python3 -IS HELPER ARGS` (the shebang's interpreter and flags)."""
    return ["/bin/sh", "-c", 'exec "$@" 0<&- 1>&- 2>&-', "sh", "/usr/bin/python3", "-IS",
            str(HELPER), *args]  # fmt: skip


def run_helper(
    sr: SystemRoot, *args: str, wrap: Callable[[list[str]], list[str]] | None = None
) -> tuple[int, list[str] | None]:
    """The helper as the kernel runs it: -IS, kernel env only, fds 0-2 closed.
    Returns the exit status and the argv the fake modprobe got (None: not exec'd)."""
    sr.record.unlink(missing_ok=True)
    cmd = kernel_like_argv(*args)
    env = {**KERNEL_ENV, helper.RUNTIME_DIR_ENV: str(sr.runtime)}
    proc = subprocess.run(
        wrap(cmd) if wrap else cmd,
        env=env,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
        capture_output=True,
    )
    if not sr.record.exists():
        return proc.returncode, None
    return proc.returncode, sr.record.read_text().splitlines()


def as_nobody(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run stdlib-only Python CODE as uid/gid 65534 without supplementary groups."""
    cmd = [
        "setpriv",
        "--reuid",
        "65534",
        "--regid",
        "65534",
        "--clear-groups",
        "--",
        "/usr/bin/python3",
        "-I",
        "-c",
        code,
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
