"""Privilege, with real unprivileged users (setpriv uid/gid 65534, no supplementary groups):
no decision, no reload, no snapshot, no say in the enforcement file; unsafe policy files and
dirs refused, clearly and in the log; the published files created safely."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kmodd import helper, wire
from tests.conftest import root_required
from tests.daemon.running import REPO, Daemon, SystemRoot, as_nobody, make_root
from tests.kerneltree import KernelTree
from tests.reliability.conftest import POLICY, Rel, Tally, start_daemon

pytestmark = [pytest.mark.reliability, root_required, pytest.mark.root]

_TRY = r"""
import os, signal, socket, sys
what, path = sys.argv[1], sys.argv[2]
def report(fn):
    try:
        out = fn()
        print("OK", repr(out)[:200])
    except OSError as err:
        print("ERR", err.errno)
def talk(data):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(path)
    s.sendall(data)
    out = b""
    while chunk := s.recv(65536):
        out += chunk
        if out.endswith(b"\0"):
            break
    return out
if what == "decide":
    report(lambda: talk(b"decide fs-vfat\n"))
elif what == "control":
    report(lambda: talk(sys.argv[3].encode() + b"\0"))
elif what == "read":
    report(lambda: open(path, "rb").read(10))
elif what == "write":
    report(lambda: open(path, "ab").write(b"install vfat /bin/true\n"))
elif what == "create":
    report(lambda: open(path, "xb").write(b"x"))
elif what == "unlink":
    report(lambda: os.unlink(path))
elif what == "rename":
    report(lambda: os.rename(sys.argv[3], path))
elif what == "signal":
    report(lambda: os.kill(int(path), signal.SIGHUP))
"""


def nobody(*args: str, groups: str = "65534") -> str:
    """Run one _TRY action as uid 65534 (gid GROUPS) and return its OK/ERR line."""
    if groups == "65534":
        out = as_nobody(_TRY, *args)
    else:
        cmd = ["setpriv", "--reuid", "65534", "--regid", groups, "--clear-groups", "--"]
        cmd += ["/usr/bin/python3", "-I", "-c", _TRY, *args]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


EACCES = f"ERR {errno.EACCES}"
EPERM = f"ERR {errno.EPERM}"
STATUS = '{"method":"io.kmodd.Status","parameters":{}}'
RELOAD = '{"method":"io.kmodd.Reload","parameters":{}}'
DECIDE = '{"method":"io.kmodd.Decide","parameters":{"name":"fs-vfat"}}'


def test_non_root_gets_no_decision_and_no_reload(rel: Rel, tally: Tally) -> None:
    gen = rel.daemon.generation()
    counted = rel.daemon.status()["decisions"]["sources"]
    decide_sock, control_sock = rel.decide_path, rel.control_path
    # decide.sock is 0600 root: the file system refuses the connect.
    assert nobody("decide", decide_sock) == EACCES
    # Not in the status group (gid 1): the control socket (0660 root:nogroup) refuses too.
    assert nobody("control", control_sock, STATUS, groups="1") == EACCES
    # In the status group: read-only methods only.
    assert "io.kmodd.PermissionDenied" in nobody("control", control_sock, RELOAD)
    assert "io.kmodd.PermissionDenied" in nobody("control", control_sock, DECIDE)
    # A signal is not a way around it, nor is editing the policy.
    assert nobody("signal", str(rel.pid)) == EPERM
    assert nobody("create", str(rel.sr.policy_dir / "99-evil.yaml")) == EACCES
    # Even with the socket modes loosened by mistake, SO_PEERCRED refuses.
    for path in (decide_sock, control_sock):
        os.chmod(path, 0o666)  # noqa: PTH101, S103 -- the misconfiguration under test
    try:
        closed = ("OK b''", f"ERR {errno.ECONNRESET}", f"ERR {errno.EPIPE}")  # not a word
        assert nobody("decide", decide_sock) in closed
        assert nobody("control", control_sock, STATUS, groups="1") in closed
    finally:
        os.chmod(decide_sock, 0o600)  # noqa: PTH101
        os.chmod(control_sock, 0o660)  # noqa: PTH101
    assert rel.daemon.generation() == gen
    assert rel.daemon.status()["decisions"]["sources"] == counted
    tally.add("privilege.decide_reload", 10, answered=0, reloads=0)


def test_non_root_cannot_read_or_replace_the_snapshot(rel: Rel, tally: Tally) -> None:
    snapshot = str(rel.sr.runtime / helper.SNAPSHOT_FILE)
    before = Path(snapshot).read_bytes()
    st = Path(snapshot).stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600), oct(st.st_mode)
    assert nobody("read", snapshot) == EACCES
    assert nobody("write", snapshot) == EACCES
    assert nobody("unlink", snapshot) == EACCES
    assert nobody("create", str(rel.sr.runtime / "snapshot.new")) == EACCES
    assert nobody("rename", snapshot, "/tmp/whatever") in (EACCES, "ERR 2")
    assert Path(snapshot).read_bytes() == before
    tally.add("privilege.snapshot", 5, succeeded=0)


def test_non_root_cannot_touch_the_enforcement_file(rel: Rel, tally: Tally) -> None:
    conf = rel.sr.enforcement
    before = conf.read_bytes()
    st = conf.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o644)
    assert nobody("write", str(conf)) == EACCES
    assert nobody("unlink", str(conf)) == EACCES
    for d in ("run/modprobe.d", "etc/modprobe.d", "lib/modprobe.d"):
        target = rel.sr.root / d / "00-aaa.conf"
        assert nobody("create", str(target)) in (EACCES, "ERR 2"), d
    mask = rel.sr.runtime / "kmod-mask"
    assert nobody("create", str(mask / "00-kmodd.conf.new")) == EACCES
    assert conf.read_bytes() == before
    tally.add("privilege.enforcement", 6, succeeded=0)


# --- unsafe policy files and directories ------------------------------------------------


@pytest.fixture(scope="module")
def policy_daemon(kernel_tree: KernelTree) -> Iterator[tuple[SystemRoot, Daemon]]:
    sr = make_root(kernel_tree)
    sr.write_policy(POLICY)
    daemon = start_daemon(sr, "--no-watch")
    yield sr, daemon
    daemon.stop()
    shutil.rmtree(sr.root.parent, ignore_errors=True)


def wait_log(daemon: Daemon, text: str, timeout: float = 15.0) -> bool:
    """TEXT appears in the daemon's log (records are written by its journal thread)."""
    deadline = time.monotonic() + timeout
    while text not in daemon.log.read_text(errors="replace"):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _reload(daemon: Daemon) -> list[str]:
    """Errors of a control reload ([] on success)."""
    try:
        daemon.call(wire.Method.RELOAD)
    except wire.RemoteError as err:
        assert err.name == wire.ErrorName.RELOAD_FAILED
        return [str(e) for e in err.parameters["errors"]]
    return []


def _group_writable(path: Path, mode: int) -> None:
    os.chown(path, 0, 65534)
    path.chmod(mode)


Spoil = Callable[[Path], None]
UNSAFE: dict[str, tuple[str, Spoil, str]] = {
    "file owned by nobody": ("file", lambda p: os.chown(p, 65534, 0), "owned by uid 65534"),
    "file world-writable": ("file", lambda p: p.chmod(0o666), "writable by every user"),
    "file group-writable (nogroup)": (
        "file",
        lambda p: _group_writable(p, 0o664),
        "writable by group 65534",
    ),
    "dir world-writable": ("dir", lambda p: p.chmod(0o777), "writable by every user"),
    "dir owned by nobody": ("dir", lambda p: os.chown(p, 65534, 65534), "owned by uid 65534"),
    "dir group-writable (nogroup)": (
        "dir",
        lambda p: _group_writable(p, 0o775),
        "writable by group 65534",
    ),
}


@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_unsafe_policy_is_refused_and_logged(
    policy_daemon: tuple[SystemRoot, Daemon], tally: Tally, case: str
) -> None:
    sr, daemon = policy_daemon
    kind, spoil, message = UNSAFE[case]
    gen = daemon.generation()
    target = sr.policy_dir / "10-test.yaml" if kind == "file" else sr.policy_dir
    spoil(target)
    try:
        errors = _reload(daemon)
        assert any(message in e and str(target) in e for e in errors), errors
        assert daemon.generation() == gen  # the previous generation stays
        doc = daemon.status()
        assert doc["last_reload"]["ok"] is False
        # Logged: the daemon's record of the failed reload names the file and the reason.
        assert wait_log(daemon, message), message
    finally:
        os.chown(target, 0, 0)
        target.chmod(0o644 if kind == "file" else 0o755)
    assert _reload(daemon) == []
    tally.add("privilege.unsafe_policy", 1, refused=1)


# --- files created safely ---------------------------------------------------------------


def test_published_files_never_follow_planted_symlinks(
    own_root: SystemRoot, tmp_path: Path, tally: Tally
) -> None:
    """Symlinks planted where the enforcement file and the snapshot go are replaced, never
    written through; the results are root-owned regular files with the right modes."""
    sr = own_root
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (sr.root / "run/modprobe.d").mkdir(parents=True, exist_ok=True)
    sr.enforcement.symlink_to(victim)
    sr.runtime.mkdir(mode=0o755)
    (sr.runtime / helper.SNAPSHOT_FILE).symlink_to(victim)
    daemon = start_daemon(sr, "--no-watch")
    try:
        assert daemon.status()["last_reload"]["ok"] is True
        assert victim.read_text() == "precious\n"
        for path, mode in ((sr.enforcement, 0o644), (sr.runtime / helper.SNAPSHOT_FILE, 0o600)):
            st = path.lstat()
            assert stat.S_ISREG(st.st_mode) and st.st_uid == 0, path
            assert stat.S_IMODE(st.st_mode) == mode, (path, oct(st.st_mode))
        assert sorted(p.name for p in sr.runtime.iterdir() if p.name.startswith(".")) == []
    finally:
        daemon.stop()
    tally.add("privilege.planted_symlinks", 2, followed=0)


def test_symlinked_publish_dirs_are_refused(
    own_root: SystemRoot, tmp_path: Path, tally: Tally
) -> None:
    """run/modprobe.d as a symlink to another dir: refused with a reason, nothing written
    there.  With no last good generation to fall back to there is nothing to enforce, so
    the daemon says so and exits 78 (RestartPreventExitStatus: no restart loop)."""
    sr = own_root
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (sr.root / "run/modprobe.d").symlink_to(elsewhere)
    daemon = Daemon(sr, extra=["--log-stderr", "--no-watch"])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "LISTEN_"))}
    proc = subprocess.run(
        daemon.argv(), capture_output=True, text=True, timeout=90, cwd=REPO, env=env, check=False
    )
    assert proc.returncode == 78, proc.stderr[-3000:]
    assert "modprobe.d" in proc.stderr, proc.stderr[-3000:]
    assert "no enforcement" in proc.stderr, proc.stderr[-3000:]
    assert list(elsewhere.iterdir()) == []
    tally.add("privilege.symlinked_dir", 1, followed=0)


def test_snapshot_replaced_atomically(rel: Rel, tally: Tally) -> None:
    """A reader hammering the snapshot across reloads only ever sees complete files."""
    path = str(rel.sr.runtime / helper.SNAPSHOT_FILE)
    seen = {"reads": 0, "torn": 0}
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            seen["reads"] += 1
            if helper.read_snapshot(path) is None:
                seen["torn"] += 1
            time.sleep(0.0005)  # thousands of reads per reload, without starving the build

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        policy = rel.sr.policy_dir / "10-test.yaml"
        for text in (
            POLICY.replace("vfat", "msdos"),
            POLICY,
            POLICY.replace("vfat", "msdos"),
            POLICY,
        ):
            rel.sr.write_policy(text)
            rel.daemon.call(wire.Method.RELOAD)
        assert policy.read_text() == POLICY
    finally:
        stop.set()
        thread.join(30)
    assert seen["reads"] > 0 and seen["torn"] == 0, seen
    tally.add("privilege.atomic_snapshot", seen["reads"], torn=0, reloads=2)
