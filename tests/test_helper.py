"""The modprobe_path helper, run the way the kernel runs it: `/usr/bin/python3 -IS HELPER -q --
NAME` with only HOME/TERM/PATH in the environment and fds 0-2 closed.  The daemon side is a
real unix socket served by a thread; the fallback side is a real snapshot file."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import random
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kmodd import helper
from tests.daemon.running import kernel_like_argv

HELPER = Path(helper.__file__)
KERNEL_ENV = {"HOME": "/", "TERM": "linux", "PATH": "/sbin:/usr/sbin:/bin:/usr/bin"}
# Never imported by the helper: each costs milliseconds the kernel waits for.
HEAVY = (
    "pydantic",
    "yaml",
    "typing",
    "logging",
    "argparse",
    "dataclasses",
    "socket",
    "json",
    "re",
    "enum",
    "kmodd",
)


@dataclass
class Kernel:
    """Runs the helper like kernel/module/kmod.c does and records what it exec'd."""

    tmp: Path
    runtime: Path
    modprobe: Path
    record: Path
    traces: int = 0

    def run(self, *args: str, env: dict[str, str] | None = None) -> tuple[int, list[str] | None]:
        """Exit status and the fake modprobe's argv (None if it was not exec'd)."""
        self.record.unlink(missing_ok=True)
        self.traces += 1
        trace = self.tmp / f"trace{self.traces}"
        full_env = {
            **KERNEL_ENV,
            helper.RUNTIME_DIR_ENV: str(self.runtime),
            helper.TRACE_ENV: str(trace),
            **(env or {}),
        }
        # sh closes 0-2 and execs: the helper starts exactly as the kernel starts it.
        cmd = kernel_like_argv(*args)
        proc = subprocess.run(
            cmd,
            env=full_env,
            timeout=30,
            check=False,
            stdin=subprocess.DEVNULL,
            capture_output=True,
        )
        assert proc.stdout == b"" and proc.stderr == b""
        modules = set(trace.read_text().split())
        assert not modules & set(HEAVY), f"helper imported {modules & set(HEAVY)}"
        assert not any(m.startswith("kmodd.") for m in modules)
        if not self.record.exists():
            return proc.returncode, None
        lines = self.record.read_text().splitlines()
        # The exec'd modprobe got /dev/null on 0-2, not our socket or snapshot.
        assert lines[:3] == ["/dev/null"] * 3, lines
        return proc.returncode, lines[3:]

    def snapshot(
        self,
        entries: str,
        *,
        mode: str = "enforce",
        modprobe: str | None = None,
        trailer: bool = True,
    ) -> None:
        text = (
            f"generation 7\nmode {mode}\n"
            f"modprobe {modprobe or self.modprobe}\nhash 00ff\n\n{entries}"
        )
        data = helper.SNAPSHOT_MAGIC + text.encode() + (b"end\n" if trailer else b"")
        (self.runtime / helper.SNAPSHOT_FILE).write_bytes(data)


@pytest.fixture
def kernel(tmp_path: Path) -> Kernel:
    runtime = tmp_path / "run"
    runtime.mkdir()
    record = tmp_path / "record"
    modprobe = tmp_path / "fake-modprobe"
    modprobe.write_text(
        "#!/bin/sh\n"
        "fds=$(for fd in 0 1 2; do readlink /proc/$$/fd/$fd; done)\n"
        f'printf "%s\\n" "$fds" "$@" > {record}.tmp\n'
        f"mv {record}.tmp {record}\n"
    )
    modprobe.chmod(0o755)
    return Kernel(tmp_path, runtime, modprobe, record)


class FakeDaemon:
    """A real decide.sock: answers each `decide NAME` line with answer(NAME)."""

    def __init__(self, path: Path, answer: Callable[[bytes], bytes | None]) -> None:
        self.answer = answer
        self.requests: list[bytes] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                line = conn.recv(helper.DECIDE_MAX)
                self.requests.append(line)
                reply = self.answer(line.removeprefix(helper.DECIDE_PREFIX).rstrip(b"\n"))
                if reply is not None:
                    with contextlib.suppress(OSError):  # the helper may have given up
                        conn.sendall(reply)

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)


@pytest.fixture
def daemon(kernel: Kernel) -> Iterator[Callable[[Callable[[bytes], bytes | None]], FakeDaemon]]:
    made: list[FakeDaemon] = []

    def start(answer: Callable[[bytes], bytes | None]) -> FakeDaemon:
        made.append(FakeDaemon(kernel.runtime / helper.DECIDE_SOCKET, answer))
        return made[-1]

    yield start
    for d in made:
        d.close()


def by_prefix(name: bytes) -> bytes:
    return b"deny no-net\n" if name.startswith(b"net-pf") else b"allow default\n"


def test_daemon_allow_execs_modprobe_from_snapshot_header(
    kernel: Kernel, daemon: Callable[..., FakeDaemon]
) -> None:
    fake = daemon(by_prefix)
    kernel.snapshot("")
    assert kernel.run("-q", "--", "fs-vfat") == (0, ["-q", "--", "fs-vfat"])
    assert fake.requests == [b"decide fs-vfat\n"]


def test_daemon_deny_exits_1_without_exec(
    kernel: Kernel, daemon: Callable[..., FakeDaemon]
) -> None:
    daemon(by_prefix)
    kernel.snapshot("net_pf_38 a default\n")  # the daemon wins over the snapshot
    assert kernel.run("-q", "--", "net-pf-38") == (1, None)


def test_daemon_allow_without_snapshot_uses_default_modprobe(
    kernel: Kernel, daemon: Callable[..., FakeDaemon]
) -> None:
    daemon(by_prefix)
    # No snapshot: the default /sbin/modprobe runs (kmod's, harmless under -q for a bogus name).
    code, record = kernel.run("-q", "--", "kmodd-no-such-module-xyz")
    assert record is None and code != 0


@pytest.mark.parametrize("answer", [None, b"garbage\n", b"error policy broken\n", b"allow"])
def test_unusable_daemon_falls_back_to_snapshot(
    kernel: Kernel, daemon: Callable[..., FakeDaemon], answer: bytes | None
) -> None:
    daemon(lambda _name: answer)
    kernel.snapshot("algif_aead d copy-fail\nfs_vfat a fat\n")
    assert kernel.run("-q", "--", "algif-aead") == (1, None)
    assert kernel.run("-q", "--", "fs-vfat") == (0, ["-q", "--", "fs-vfat"])


def test_silent_daemon_times_out(kernel: Kernel, daemon: Callable[..., FakeDaemon]) -> None:
    gate = threading.Event()

    def hang(_name: bytes) -> bytes:
        gate.wait(30)  # longer than DECIDE_TIMEOUT_S: the helper must give up on its own
        return b"allow default\n"

    daemon(hang)
    kernel.snapshot("algif_aead d copy-fail\n")
    try:
        assert kernel.run("-q", "--", "algif-aead") == (1, None)
    finally:
        gate.set()


def test_no_daemon_snapshot_decides(kernel: Kernel) -> None:
    kernel.snapshot("algif_aead d copy-fail\nfs_vfat a fat\nmode d evil\n")
    assert kernel.run("-q", "--", "algif_aead") == (1, None)
    assert kernel.run("-q", "--", "fs-vfat") == (0, ["-q", "--", "fs-vfat"])
    # Not covered -> the real modprobe (the rendered modprobe.d still blocks denied modules).
    assert kernel.run("-q", "--", "snd-dummy") == (0, ["-q", "--", "snd-dummy"])
    # Header keys are not entries ("mode enforce" is not a verdict for the name "mode")
    # but an entry named like a header key is found in the table.
    assert kernel.run("-q", "--", "mode") == (1, None)
    assert kernel.run("-q", "--", "hash") == (0, ["-q", "--", "hash"])


def test_permissive_snapshot_allows_would_deny(kernel: Kernel) -> None:
    kernel.snapshot("algif_aead d copy-fail\n", mode="permissive")
    assert kernel.run("-q", "--", "algif-aead") == (0, ["-q", "--", "algif-aead"])


def test_torn_snapshot_is_not_trusted(kernel: Kernel) -> None:
    kernel.snapshot("algif_aead d copy-fail\n", trailer=False)
    assert helper.read_snapshot(str(kernel.runtime / helper.SNAPSHOT_FILE)) is None
    # A torn snapshot decides nothing, not even which modprobe: the default one runs (and
    # layer 2, the rendered modprobe.d, blocks denied modules).
    code, record = kernel.run("-q", "--", "algif-aead")
    assert record is None and code != 0


def test_foreign_snapshot_and_relative_modprobe_are_ignored(kernel: Kernel) -> None:
    (kernel.runtime / helper.SNAPSHOT_FILE).write_bytes(b"algif_aead d x\nend\n")
    code, record = kernel.run("-q", "--", "kmodd-no-such-module-xyz")
    assert record is None and code != 0  # /sbin/modprobe ran and failed
    kernel.snapshot("", modprobe="fake-modprobe")  # relative: never exec'd from a cwd
    code, record = kernel.run("-q", "--", "kmodd-no-such-module-xyz")
    assert record is None


def test_symlinked_snapshot_is_not_followed(kernel: Kernel) -> None:
    kernel.snapshot("algif_aead d copy-fail\n")
    real = kernel.runtime / helper.SNAPSHOT_FILE
    moved = kernel.tmp / "elsewhere"
    real.rename(moved)
    real.symlink_to(moved)
    code, record = kernel.run("-q", "--", "algif-aead")
    assert record is None and code != 0  # default /sbin/modprobe, not the snapshot's


@pytest.mark.parametrize(
    "name",
    ["", "a/b", "../x", "x" * 56, "sp ace", "tab\there", "new\nline", "\x7f", "é"],
)
def test_hostile_names_are_denied_and_never_passed_on(
    kernel: Kernel, daemon: Callable[..., FakeDaemon], name: str
) -> None:
    fake = daemon(lambda _name: b"allow default\n")
    kernel.snapshot("")
    assert kernel.run("-q", "--", name) == (1, None)
    assert fake.requests == []


def test_longest_valid_name_is_passed_on(kernel: Kernel, daemon: Callable[..., FakeDaemon]) -> None:
    daemon(lambda _name: b"allow default\n")
    kernel.snapshot("")
    name = "x" * helper.NAME_MAX
    assert kernel.run("-q", "--", name) == (0, ["-q", "--", name])


@pytest.mark.parametrize(
    "args",
    [
        (),
        ("fs-vfat",),
        ("--", "fs-vfat"),
        ("-q", "fs-vfat"),
        ("-q", "--", "a", "b"),
        ("-v", "--", "fs-vfat"),
        ("--deny",),
        ("--deny", "a", "b"),
    ],
)
def test_other_argv_is_a_usage_error(kernel: Kernel, args: tuple[str, ...]) -> None:
    kernel.snapshot("")
    assert kernel.run(*args) == (2, None)


def test_deny_stub_for_rendered_modprobe_d(kernel: Kernel) -> None:
    assert kernel.run("--deny", "algif_aead") == (1, None)


def test_valid_name_and_normalize() -> None:
    assert helper.valid_name(b"net-pf-38")
    assert helper.valid_name(b"char-major-10-*")
    assert not helper.valid_name(b"")
    assert not helper.valid_name(b"a/b")
    assert not helper.valid_name(b"x" * 56)
    assert helper.normalize("snd-hda-intel") == "snd_hda_intel"
    assert helper.normalize("pci:v[0-9]-x") == "pci:v[0-9]_x"


def test_importing_helper_constants_stays_cheap() -> None:
    code = "import sys, kmodd.helper; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout.split()
    assert "kmodd.helper" in out
    assert "pydantic" not in out and "yaml" not in out


def test_snapshot_glob_rows_after_an_exact_miss(
    kernel: Kernel, daemon: Callable[..., FakeDaemon]
) -> None:
    """With the daemon gone, a name that is no key but matches a glob row is denied
    (char-major-67-0 via alias char-major-67-* -> coda); exact keys still win."""
    kernel.snapshot(
        "char_major_67_1 a default\n"
        + helper.SNAPSHOT_GLOBS.decode()
        + "char_major_67_* d no-coda\n"
    )
    assert kernel.run("-q", "--", "char-major-67-0") == (1, None)
    assert kernel.run("-q", "--", "char-major-67-1") == (0, ["-q", "--", "char-major-67-1"])
    assert kernel.run("-q", "--", "char-major-68-0") == (0, ["-q", "--", "char-major-68-0"])


def _libc_fnmatch() -> Callable[[bytes, bytes], bool]:
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    return lambda pattern, name: libc.fnmatch(pattern, name, 0) == 0


def test_glob_match_is_glibc_fnmatch() -> None:
    """The helper's hand-written matcher against glibc fnmatch(3) with flags 0 (what kmod
    uses for aliases): 40,000 random patterns and names over the metacharacters (no
    backslash: the compiler never writes one into a snapshot)."""
    fnmatch = _libc_fnmatch()
    rnd = random.Random(10)  # noqa: S311 - reproducible test data, not secrets
    fixed = [b"char_major_67_*", b"a?c", b"[0-9]x", b"[!a]b", b"*", b"", b"ab[", b"*[]]*"]
    for i in range(40_000):
        if i % 2:
            pattern = rnd.choice(fixed)
        else:
            pattern = bytes(rnd.choice(b"abc019_-[]!^*?:x") for _ in range(rnd.randint(0, 8)))
        name = bytes(rnd.choice(b"abc019_x]:-^!") for _ in range(rnd.randint(0, 9)))
        assert helper.glob_match(pattern, name) == fnmatch(pattern, name), (pattern, name)
