"""The real kmodd process against the real Debian kernel tree, with the helper run as the
kernel runs it.  Root only (CI is root): sockets owned by root, setpriv, namespaces."""

from __future__ import annotations

import json
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kmodd import helper, wire
from kmodd.cli import client
from kmodd.contract.status import LAYERS, StatusDocument
from kmodd.errors import KmoddError
from tests.conftest import root_required
from tests.daemon.running import BASE_POLICY, Daemon, SystemRoot, as_nobody, make_root, run_helper
from tests.kerneltree import KernelTree

pytestmark = [root_required, pytest.mark.root]

DENY_VFAT = (
    BASE_POLICY
    + """\
  - id: no-vfat
    action: deny
    match:
      module: [vfat]
    reason: "test: no FAT"
"""
)
KMODCTL = [sys.executable, "-m", "kmodd.cli.main"]


@pytest.fixture(scope="module")
def shared(kernel_tree: KernelTree) -> Iterator[tuple[SystemRoot, Daemon]]:
    """One daemon for the read-only tests of this module (start-up costs ~3 s)."""
    sr = make_root(kernel_tree)
    (sr.root / "proc").mkdir()
    (sr.root / "proc/modules").write_text(
        "algif_aead 20480 0 - Live 0x0000000000000000\nvfat 24576 1 - Live 0x0\n"
    )
    daemon = Daemon(sr, extra=["--status-group", "nogroup"]).start()
    yield sr, daemon
    assert daemon.stop() == 0
    shutil.rmtree(sr.root.parent, ignore_errors=True)


@pytest.fixture
def own(kernel_tree: KernelTree) -> Iterator[tuple[SystemRoot, Daemon]]:
    """A daemon per test, for tests that change the policy or stop the daemon."""
    sr = make_root(kernel_tree)
    daemon = Daemon(sr)
    yield sr, daemon
    if daemon.proc is not None:
        daemon.stop()
    shutil.rmtree(sr.root.parent, ignore_errors=True)


def kmodctl(sr: SystemRoot, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [*KMODCTL, "--root", str(sr.root), "--runtime-dir", str(sr.runtime), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=200, check=False)


# --- the helper against the live daemon -------------------------------------------------


def test_helper_denied_exits_1_allowed_execs_modprobe(shared: tuple[SystemRoot, Daemon]) -> None:
    sr, daemon = shared
    before = daemon.status()["decisions"]["rules"].get("copy-fail", 0)
    assert run_helper(sr, "-q", "--", "algif-aead") == (1, None)
    assert run_helper(sr, "-q", "--", "fs-vfat") == (0, ["-q", "--", "fs-vfat"])
    assert run_helper(sr, "-q", "--", "net-pf-38") == (0, ["-q", "--", "net-pf-38"])
    # The daemon decided (not the snapshot): its counters moved.
    assert daemon.status()["decisions"]["rules"]["copy-fail"] == before + 1


def test_published_files(shared: tuple[SystemRoot, Daemon]) -> None:
    sr, _daemon = shared
    text = sr.enforcement.read_text()
    assert f"install algif_aead {sr.root.parent}" not in text  # the stub is the helper
    assert f"install algif_aead {Path(helper.__file__)} --deny algif_aead" in text
    assert "blacklist algif_aead" in text
    snap = (sr.runtime / helper.SNAPSHOT_FILE).read_bytes()
    assert snap.startswith(helper.SNAPSHOT_MAGIC) and snap.endswith(helper.SNAPSHOT_END)
    assert helper.snapshot_lookup(snap, b"algif_aead") == (b"d", b"copy-fail")
    assert helper.snapshot_header(snap)[b"modprobe"] == str(sr.modprobe).encode()
    mode = (sr.runtime / helper.DECIDE_SOCKET).stat().st_mode
    assert stat.S_IMODE(mode) == 0o600
    ctl = (sr.runtime / helper.CONTROL_SOCKET).stat()
    assert stat.S_IMODE(ctl.st_mode) == 0o660 and ctl.st_gid == 65534
    assert stat.S_IMODE(sr.runtime.stat().st_mode) == 0o755


def test_status_document(shared: tuple[SystemRoot, Daemon]) -> None:
    sr, daemon = shared
    doc = daemon.status()
    assert doc["pid"] == daemon.proc.pid if daemon.proc else False
    gen = doc["generation"]
    assert gen["number"] >= 1 and len(gen["hash"]) == 64
    assert gen["mode"] == "enforce" and gen["mode_overridden"] is False
    assert gen["files"] == [str(sr.policy_dir / "10-test.yaml")]
    assert doc["last_reload"]["ok"] is True
    assert doc["enforcement_file"] == str(sr.enforcement)
    assert doc["module_dir"] == str(sr.root / "lib/modules" / sr.release)
    assert doc["module_dir_base"] == "lib/modules"
    assert doc["loaded_denied"] == [
        {
            "module": "algif_aead",
            "rule": "copy-fail",
            "reason": "algif_aead denied by rule copy-fail: CVE-2026-31431: AF_ALG AEAD",
        }
    ]
    assert doc["kernel_modprobe"]["managed"] is False  # --root is not /
    # Every key of the shared type, and what this daemon (--root, enforce) can say of layers.
    assert set(StatusDocument.__annotations__) - set(doc) == set()
    assert set(doc["layers"]) == set(LAYERS)
    assert doc["layers"]["modprobe_d"]["active"] is True
    assert doc["layers"]["helper"] == {
        "active": False,
        "reason": "kernel.modprobe is not managed by this daemon",
    }
    assert doc["layers"]["kernel"]["active"] is False
    assert doc["layers"]["udev"]["active"] is False  # --no-udev
    assert doc["watcher"] == {"running": True, "errors": 0}  # counted, shown, none yet
    assert doc["udev"] is None
    human = kmodctl(sr, "status")
    assert human.returncode == 0, human.stderr
    assert "generation:" in human.stdout and "algif_aead (rule copy-fail)" in human.stdout
    as_json = kmodctl(sr, "status", "--json")
    assert json.loads(as_json.stdout)["generation"]["number"] == gen["number"]


def test_explain_and_decide_methods(shared: tuple[SystemRoot, Daemon]) -> None:
    _sr, daemon = shared
    out = daemon.call(wire.Method.EXPLAIN, {"name": "algif-aead", "source": "kernel"})
    assert out["verdict"] == "deny" and out["rule"] == "copy-fail"
    assert out["load_set"] == ["af_alg", "algif_aead"]
    cli = daemon.call(wire.Method.DECIDE, {"name": "fs-vfat"})
    assert cli["source"] == "cli" and cli["verdict"] == "allow"
    with pytest.raises(wire.RemoteError) as err:
        daemon.call(wire.Method.EXPLAIN, {"name": 5})
    assert err.value.name == wire.ErrorName.INVALID_PARAMETER


# --- who may talk to the daemon ---------------------------------------------------------

_CONNECT = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("EACCES"); sys.exit(0)
s.settimeout(10)
data = b""
try:
    s.sendall(sys.argv[2].encode().replace(b"\\\\0", b"\\0"))
    while True:
        chunk = s.recv(65536)
        data += chunk
        if not chunk or data.endswith(b"\\0"):  # EOF, or one whole control reply
            break
except (BrokenPipeError, ConnectionResetError):
    pass
print(repr(data) if data else "CLOSED")
"""


def test_non_root_cannot_reach_decide_socket(shared: tuple[SystemRoot, Daemon]) -> None:
    sr, _daemon = shared
    out = as_nobody(_CONNECT, str(sr.runtime / helper.DECIDE_SOCKET), "decide algif_aead\n")
    assert out.stdout.strip() == "EACCES", out


def test_non_root_refused_by_peercred_on_decide_socket(shared: tuple[SystemRoot, Daemon]) -> None:
    sr, daemon = shared
    sock = sr.runtime / helper.DECIDE_SOCKET
    sock.chmod(0o666)  # a misconfigured mode: SO_PEERCRED still refuses
    try:
        out = as_nobody(_CONNECT, str(sock), "decide fs-vfat\n")
    finally:
        sock.chmod(0o600)
    assert out.stdout.strip() == "CLOSED", out  # closed without an answer
    assert run_helper(sr, "-q", "--", "fs-vfat")[0] == 0  # root still served
    assert daemon.proc is not None and daemon.proc.poll() is None


def test_status_group_reads_status_but_cannot_reload(shared: tuple[SystemRoot, Daemon]) -> None:
    sr, daemon = shared
    ctl = str(sr.runtime / helper.CONTROL_SOCKET)
    gen = daemon.generation()
    status = '{"method":"io.kmodd.Status","parameters":{}}\\0'
    reload = '{"method":"io.kmodd.Reload","parameters":{}}\\0'
    # --regid 65534 is nogroup, the --status-group of this daemon.
    out = as_nobody(_CONNECT, ctl, status)
    assert '"generation"' in out.stdout, out
    out = as_nobody(_CONNECT, ctl, reload)
    assert "io.kmodd.PermissionDenied" in out.stdout, out
    decide = '{"method":"io.kmodd.Decide","parameters":{"name":"x"}}\\0'
    assert "io.kmodd.PermissionDenied" in as_nobody(_CONNECT, ctl, decide).stdout
    assert daemon.generation() == gen


def test_non_member_is_refused_on_control_socket(shared: tuple[SystemRoot, Daemon]) -> None:
    sr, _daemon = shared
    ctl = sr.runtime / helper.CONTROL_SOCKET
    ctl.chmod(0o666)
    try:
        cmd = [
            "setpriv",
            "--reuid",
            "65534",
            "--regid",
            "1",
            "--clear-groups",
            "--",
            "/usr/bin/python3",
            "-I",
            "-c",
            _CONNECT,
            str(ctl),
            '{"method":"io.kmodd.Status","parameters":{}}\\0',
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    finally:
        ctl.chmod(0o660)
    assert out.stdout.strip() == "CLOSED", out


# --- hostile and slow clients -----------------------------------------------------------


def _raw(path: Path, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def test_decide_protocol_rejects_garbage(shared: tuple[SystemRoot, Daemon]) -> None:
    sr, _daemon = shared
    path = sr.runtime / helper.DECIDE_SOCKET
    assert _raw(path, b"hello\n").startswith(b"error ")
    assert _raw(path, b"x" * 600).startswith(b"error ")
    assert _raw(path, b"decide a/b\n") == b"deny invalid-name\n"
    assert _raw(path, b"decide algif-aead\n") == b"deny copy-fail\n"
    assert _raw(path, b"decide fs-vfat\n") == b"allow default\n"


def test_control_protocol_rejects_garbage(shared: tuple[SystemRoot, Daemon]) -> None:
    sr, _daemon = shared
    path = sr.runtime / helper.CONTROL_SOCKET
    for bad in (b"not json\0", b"[1]\0", b'{"method":"io.kmodd.Nope"}\0', b'{"method":7}\0'):
        with pytest.raises(wire.RemoteError) as err:
            wire.decode_reply(_raw(path, bad).rstrip(b"\0"))
        assert err.value.name == wire.ErrorName.INVALID_FRAME
    huge = b'{"method":"io.kmodd.Status","parameters":{"x":"' + b"a" * (helper.CONTROL_MAX + 10)
    reply = _raw(path, huge)
    assert b"io.kmodd.InvalidFrame" in reply


def test_idle_clients_do_not_stall_decisions(shared: tuple[SystemRoot, Daemon]) -> None:
    sr, daemon = shared
    idle = []
    for _ in range(40):  # connect and say nothing, on both sockets
        for name in (helper.DECIDE_SOCKET, helper.CONTROL_SOCKET):
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(sr.runtime / name))
            s.sendall(b"decide alg" if name == helper.DECIDE_SOCKET else b'{"meth')
            idle.append(s)
    try:
        before = daemon.status()["decisions"]["sources"].get("kernel", 0)
        assert run_helper(sr, "-q", "--", "algif-aead") == (1, None)
        assert run_helper(sr, "-q", "--", "fs-fat") == (0, ["-q", "--", "fs-fat"])
        # Answered by the daemon, not by the helper's snapshot fallback.
        assert daemon.status()["decisions"]["sources"]["kernel"] == before + 2
    finally:
        for s in idle:
            s.close()


def test_control_flood_cannot_starve_the_helper(shared: tuple[SystemRoot, Daemon]) -> None:
    sr, daemon = shared
    before = daemon.status()
    flood = []
    try:
        for _ in range(100):  # more than control.sock's 64 slots, all silent
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(sr.runtime / helper.CONTROL_SOCKET))
            flood.append(s)
        assert run_helper(sr, "-q", "--", "algif-aead") == (1, None)
    finally:
        for s in flood:
            s.close()
    doc = _status_once_slots_free(daemon)
    kernel = before["decisions"]["sources"].get("kernel", 0)
    assert doc["decisions"]["sources"]["kernel"] == kernel + 1  # the daemon answered
    refused = doc["server"]["refused_over_limit"] - before["server"]["refused_over_limit"]
    assert refused >= 100 - 64


def _status_once_slots_free(daemon: Daemon) -> dict[str, Any]:
    """The daemon may see our status connection before the flood's EOFs: retry."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return daemon.status()
        except KmoddError:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_concurrent_helpers_all_answered(shared: tuple[SystemRoot, Daemon]) -> None:
    """117 helpers at once: each gets the answer its own name gets alone (no reply
    crossed between connections, none lost), as the daemon's Explain predicts."""
    sr, daemon = shared
    names = [f"net-pf-{i}" for i in range(1, 40)] * 3 + ["algif-aead", "fs-vfat"]
    expected = {}
    for name in set(names):
        d = daemon.call(wire.Method.EXPLAIN, {"name": name, "source": "kernel"})
        expected[name] = f"{d['effective']} {d['rule']}".encode()
    assert expected["algif-aead"] == b"deny copy-fail"  # both verdicts are in the mix
    results: dict[int, bytes | None] = {}

    def ask(i: int, name: str) -> None:
        results[i] = helper.ask_daemon(str(sr.runtime / helper.DECIDE_SOCKET), name.encode(), 10)

    threads = [threading.Thread(target=ask, args=(i, n)) for i, n in enumerate(names)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert {i: results.get(i) for i in range(len(names))} == {
        i: expected[name] for i, name in enumerate(names)
    }


# --- generations ------------------------------------------------------------------------


def test_reload_ok_and_invalid_keeps_generation(own: tuple[SystemRoot, Daemon]) -> None:
    sr, daemon = own
    daemon.extra = ["--no-watch"]
    daemon.start()
    gen = daemon.generation()
    assert gen is not None
    sr.write_policy(DENY_VFAT)
    ok = kmodctl(sr, "reload")
    assert ok.returncode == 0, ok.stderr
    assert f"generation {gen + 1}" in ok.stdout
    assert run_helper(sr, "-q", "--", "fs-vfat") == (1, None)
    # A client may half-close after its call: the answer still comes when the build is done.
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(120)
        s.connect(str(sr.runtime / helper.CONTROL_SOCKET))
        s.sendall(wire.encode_call(wire.Method.RELOAD))
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
    assert wire.decode_reply(reply.rstrip(b"\0"))["generation"] == gen + 2
    gen += 1
    enforcement = sr.enforcement.read_text()
    sr.write_policy(DENY_VFAT + "  - id: broken\n    action: maybe\n    match: {module: [x]}\n")
    bad = kmodctl(sr, "reload")
    assert bad.returncode == 1
    assert f"{sr.policy_dir / '10-test.yaml'}:16:13: rules[2].action" in bad.stderr, bad.stderr
    assert f"keeping generation {gen + 1}" in bad.stderr
    doc = daemon.status()
    assert doc["generation"]["number"] == gen + 1
    assert doc["last_reload"]["ok"] is False
    assert any(":16:13:" in e for e in doc["last_reload"]["errors"])
    assert "FAILED" in kmodctl(sr, "status").stdout
    # The old generation still decides and its files are untouched.
    assert run_helper(sr, "-q", "--", "fs-vfat") == (1, None)
    assert sr.enforcement.read_text() == enforcement


def test_editing_a_policy_file_reloads(own: tuple[SystemRoot, Daemon]) -> None:
    sr, daemon = own
    daemon.start()
    gen = daemon.generation()
    assert gen is not None
    assert run_helper(sr, "-q", "--", "fs-vfat")[0] == 0
    sr.write_policy(DENY_VFAT)
    daemon.wait_status(lambda d: d["generation"]["number"] > gen and d["last_reload"]["ok"])
    assert run_helper(sr, "-q", "--", "fs-vfat") == (1, None)
    assert "install vfat " in sr.enforcement.read_text()
    # An invalid edit keeps the generation and shows the error.
    now = daemon.generation()
    sr.write_policy("kmodd: 1\nrules: [\n")
    doc = daemon.wait_status(lambda d: d["last_reload"]["ok"] is False)
    assert doc["generation"]["number"] == now
    assert any("10-test.yaml:" in e for e in doc["last_reload"]["errors"])


def test_enforcement_file_is_never_half_written(own: tuple[SystemRoot, Daemon]) -> None:
    sr, daemon = own
    daemon.extra = ["--no-watch"]
    daemon.start()
    seen: set[str] = set()
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            seen.add(sr.enforcement.read_text())

    thread = threading.Thread(target=reader)
    thread.start()
    complete = {sr.enforcement.read_text()}
    try:
        for policy in (DENY_VFAT, BASE_POLICY, DENY_VFAT, BASE_POLICY):
            sr.write_policy(policy)
            daemon.call(wire.Method.RELOAD)
            complete.add(sr.enforcement.read_text())
    finally:
        stop.set()
        thread.join(30)
    assert len(complete) == 2
    assert seen <= complete, [s[-200:] for s in seen - complete]


def test_kernel_cmdline_permissive_overrides_policy(own: tuple[SystemRoot, Daemon]) -> None:
    sr, daemon = own
    sr.cmdline.write_text("root=/dev/vda kmodd.mode=permissive quiet\n")
    daemon.start()
    gen = daemon.status()["generation"]
    assert gen["mode"] == "permissive" and gen["mode_overridden"] is True
    assert gen["policy_mode"] == "enforce"
    assert run_helper(sr, "-q", "--", "algif-aead") == (0, ["-q", "--", "algif-aead"])
    assert "install algif_aead" not in sr.enforcement.read_text()
    assert daemon.status()["decisions"]["verdicts"] == {"would_deny": 1}


def test_daemon_down_snapshot_still_decides(own: tuple[SystemRoot, Daemon]) -> None:
    sr, daemon = own
    daemon.start()
    assert daemon.stop() == 0
    assert not (sr.runtime / helper.DECIDE_SOCKET).exists()
    assert run_helper(sr, "-q", "--", "algif-aead") == (1, None)
    assert run_helper(sr, "-q", "--", "fs-vfat") == (0, ["-q", "--", "fs-vfat"])
    with pytest.raises(client.DaemonNotRunningError):
        daemon.status()
    out = kmodctl(sr, "status")
    assert out.returncode == 1 and "not running" in out.stderr


def test_conflicting_install_line_is_reported(own: tuple[SystemRoot, Daemon]) -> None:
    sr, daemon = own
    # 00-aaa.conf sorts before 00-kmodd.conf: kmod takes its install command first.
    (sr.root / "etc/modprobe.d/00-aaa.conf").write_text("install algif_aead /bin/true\n")
    (sr.root / "etc/modprobe.d/50-alias.conf").write_text("alias my-crypto algif_aead\n")
    daemon.start()
    conflicts = daemon.status()["conflicts"]
    kinds = {(c["kind"], c["module"]) for c in conflicts}
    assert ("install", "algif_aead") in kinds
    assert ("alias", "algif_aead") in kinds
    install = next(c["detail"] for c in conflicts if c["kind"] == "install")
    assert install.startswith(f"{sr.root}/etc/modprobe.d/00-aaa.conf:1: ")
    assert "install algif_aead /bin/true" in install
    alias = next(c["detail"] for c in conflicts if c["kind"] == "alias")
    assert alias.startswith(f"{sr.root}/etc/modprobe.d/50-alias.conf:1: ")


def test_runtime_dir_symlink_is_refused(kernel_tree: KernelTree, tmp_path: Path) -> None:
    sr = make_root(kernel_tree)
    try:
        target = tmp_path / "elsewhere"
        target.mkdir()
        sr.runtime.symlink_to(target)
        proc = subprocess.run(
            Daemon(sr).argv(), capture_output=True, text=True, timeout=60, check=False
        )
        assert proc.returncode == 1
        assert "symlink" in proc.stderr
        assert list(target.iterdir()) == []
    finally:
        shutil.rmtree(sr.root.parent, ignore_errors=True)


def test_daemon_usage_error_exits_2() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "kmodd.daemon.main", "--bogus"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2


def test_socket_files_are_removed_on_stop(own: tuple[SystemRoot, Daemon]) -> None:
    sr, daemon = own
    daemon.start()
    assert daemon.stop() == 0
    # `published` stays for the boot (kmodd-boot-wait.service): enforcement is in place.
    names = sorted(p.name for p in sr.runtime.iterdir())
    assert names == ["kmod-mask", "published", "snapshot"]


def test_concurrent_reloads_are_coalesced_and_all_answered(own: tuple[SystemRoot, Daemon]) -> None:
    sr, daemon = own
    daemon.extra = ["--no-watch"]
    daemon.start()
    gen = daemon.generation()
    assert gen is not None
    sr.write_policy(DENY_VFAT)
    replies: list[int] = []

    def reload() -> None:
        replies.append(int(daemon.call(wire.Method.RELOAD)["generation"]))

    threads = [threading.Thread(target=reload) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(200)
    assert len(replies) == 6
    # One build runs at a time; the requests that arrive meanwhile share the next one, so
    # six requests (arriving within one ~2 s build) never cause six builds.
    assert gen < min(replies) and len(set(replies)) < len(replies)
    assert daemon.generation() == max(replies)
    assert run_helper(sr, "-q", "--", "fs-vfat") == (1, None)
