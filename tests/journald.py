"""A real, private journald for tests (research python-ecosystem.md §1.7 B).

`systemd-journald NAMESPACE` runs an isolated instance with its sockets in
/run/systemd/journal.NAMESPACE; libsystemd (and syslog's /dev/log) always talk to the fixed
/run/systemd/journal, so code under test runs inside `unshare -m` with that directory
bind-mounted over the fixed path (a private tmpfs on /run/systemd and /dev keeps the host
untouched).  Records are read back with `journalctl --namespace`.

Traps handled here: journald takes no options (`--help` would start a namespace named
"--help"), it exits after 30 s without clients (we keep a stdout-stream client connected),
and it leaves its socket dir and journal files behind (removed on stop).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

JOURNALD = "/lib/systemd/systemd-journald"
# Runs "$@" with the namespace's socket dir at /run/systemd/journal and /dev/log.
_WRAP = r"""
set -e
mount --make-rprivate /
mount --bind "$1" "$2"
mount -t tmpfs -o mode=755 tmpfs /run/systemd
mkdir /run/systemd/journal
mount --bind "$2" /run/systemd/journal
mount -t tmpfs -o mode=755 tmpfs /dev
mknod -m 666 /dev/null c 1 3
mknod -m 666 /dev/zero c 1 5
mknod -m 666 /dev/random c 1 8
mknod -m 666 /dev/urandom c 1 9
ln -s /run/systemd/journal/dev-log /dev/log
shift 2
exec "$@"
"""

# Starts journald as another host: its own hostname (UTS namespace) and machine id (bind
# mount over /etc/machine-id), which it stamps as _HOSTNAME/_MACHINE_ID on every record.
_AS_HOST = r"""
set -e
mount --make-rprivate /
mount --bind "$1" /etc/machine-id
hostname "$2"
shift 2
exec "$@"
"""

Record = dict[str, str]


class Journald:
    def __init__(self, scratch: Path, hostname: str | None = None) -> None:
        """HOSTNAME: run as another host (its own hostname and a fresh machine id)."""
        self.namespace = f"kmoddtest{secrets.token_hex(4)}"
        self.socket_dir = Path(f"/run/systemd/journal.{self.namespace}")
        self.hostname = hostname
        self.machine_id = secrets.token_hex(16) if hostname else None
        self._scratch = scratch
        self._proc: subprocess.Popen[bytes] | None = None
        self._keepalive: socket.socket | None = None

    def start(self, timeout: float = 10.0) -> None:
        argv = [JOURNALD, self.namespace]
        if self.hostname is not None and self.machine_id is not None:
            mid = self._scratch / f"machine-id-{self.namespace}"
            mid.write_text(self.machine_id + "\n")
            argv = ["unshare", "-mu", "--", "sh", "-c", _AS_HOST, "sh", str(mid), self.hostname]
            argv += [JOURNALD, self.namespace]
        self._proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not (self.socket_dir / "stdout").exists():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"journald {self.namespace} did not start")
            time.sleep(0.02)
        # A connected stdout-stream client keeps the instance from exiting when idle.
        self._keepalive = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._keepalive.connect(str(self.socket_dir / "stdout"))
        self._keepalive.sendall(b"kmodd-test-keepalive\n\n6\n0\n0\n0\n0\n")

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """ARGV run in a mount namespace whose journal (and /dev/log) is this instance."""
        mnt = self._scratch / f"journal-mnt-{secrets.token_hex(3)}"
        mnt.mkdir()
        return [
            "unshare",
            "-m",
            "--",
            "sh",
            "-c",
            _WRAP,
            "sh",
            str(self.socket_dir),
            str(mnt),
            *argv,
        ]

    def journal_dir(self) -> Path:
        """Where this instance stores its files (persistent if /var/log/journal exists)."""
        mid = self.machine_id or Path("/etc/machine-id").read_text().strip()
        for base in ("/var/log/journal", "/run/log/journal"):
            if (found := Path(base) / f"{mid}.{self.namespace}").is_dir():
                return found
        raise RuntimeError(f"journald {self.namespace} has no journal directory")

    def records(self, *matches: str) -> list[Record]:
        """Every record (journalctl FIELD=VALUE matches), oldest first."""
        # --namespace finds the files by the local machine id: not another host's.
        where = f"--namespace={self.namespace}"
        if self.machine_id is not None:
            where = f"--directory={self.journal_dir()}"
        proc = subprocess.run(
            [
                "journalctl",
                where,
                "-o",
                "json",
                "--no-pager",
                *matches,
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        out = []
        for line in proc.stdout.splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def wait_for(
        self,
        predicate: Callable[[Record], bool],
        *matches: str,
        count: int = 1,
        timeout: float = 15.0,
    ) -> list[Record]:
        """Records matching PREDICATE once there are COUNT of them (deadline: TIMEOUT)."""
        deadline = time.monotonic() + timeout
        while True:
            found = [r for r in self.records(*matches) if predicate(r)]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.1)

    def stop(self) -> None:
        if self._keepalive is not None:
            self._keepalive.close()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
        shutil.rmtree(self.socket_dir, ignore_errors=True)
        for base in ("/var/log/journal", "/run/log/journal"):
            for stored in Path(base).glob(f"*.{self.namespace}"):
                shutil.rmtree(stored, ignore_errors=True)


@contextlib.contextmanager
def running_journald(scratch: Path, hostname: str | None = None) -> Iterator[Journald]:
    jd = Journald(scratch, hostname)
    try:
        jd.start()
        yield jd
    finally:
        jd.stop()


def available() -> str | None:
    """None if a namespaced journald can run here, else why not."""
    if os.geteuid() != 0:
        return "needs root (mount namespace, journald)"
    for tool in (JOURNALD, "/usr/bin/journalctl", "/usr/bin/unshare"):
        if not Path(tool).exists():
            return f"{tool} is missing"
    return None
