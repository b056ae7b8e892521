"""A real fleet collector for tests: systemd-journal-remote listening on loopback (plain
http) and systemd-journal-upload pushing a host's journal files to it, as a fleet does
(Debian's systemd-journal-remote package ships both).

The collector writes DIR/remote-<peer>.journal (--split-mode=host names the file after the
connection's peer: 127.0.0.1 for every test host); the hosts are told apart by the
_HOSTNAME/_MACHINE_ID their own journald stamped, which journal-remote keeps.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

REMOTE = "/lib/systemd/systemd-journal-remote"
UPLOAD = "/lib/systemd/systemd-journal-upload"
TIMEOUT = 30.0  # one upload of a few hundred records takes ~0.1 s


def available() -> str | None:
    for tool in (REMOTE, UPLOAD):
        if not Path(tool).exists():
            return f"{tool} is missing (Debian package systemd-journal-remote)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Collector:
    def __init__(self, output: Path) -> None:
        self.output = output
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.output.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()  # free a moment ago; a lost race fails start, loudly
        self._proc = subprocess.Popen(
            [
                REMOTE,
                f"--listen-http=127.0.0.1:{self.port}",
                "--split-mode=host",
                f"--output={self.output}/",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + TIMEOUT
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1),
            ):
                return
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"systemd-journal-remote did not listen on {self.port}")
            time.sleep(0.05)

    def upload(self, directory: Path) -> None:
        """Every record in DIRECTORY's journal files, sent once (no --follow)."""
        subprocess.run(
            [
                UPLOAD,
                f"--url=http://127.0.0.1:{self.port}",
                f"--directory={directory}",
                "--follow=no",
            ],
            check=True,
            timeout=TIMEOUT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        """Stops the collector: it closes (and syncs) its journal files on SIGTERM."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(TIMEOUT)


@contextlib.contextmanager
def collector(output: Path) -> Iterator[Collector]:
    c = Collector(output)
    try:
        c.start()
        yield c
    finally:
        c.stop()
