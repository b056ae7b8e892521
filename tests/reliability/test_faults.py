"""Faults: the daemon killed mid-storm, journald stalled or never read, a full runtime file
system, directories deleted and re-created, depmod rewriting the index, a corrupted
snapshot, a udev monitor overflow.  Each must be detected, reported and recovered, and the
kernel's helpers must keep getting the right verdict in time."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kmodd import helper, wire
from kmodd.cli import client
from tests import journald
from tests.conftest import root_required
from tests.daemon.running import HELPER, KERNEL_ENV, Daemon, SystemRoot
from tests.kerneltree import KernelTree
from tests.kmod.conftest import COPIED_INDEXES, TINY_MODULES, copy_modules
from tests.reliability.conftest import (
    HELPER_TIMEOUT_S,
    POLICY,
    Rel,
    Tally,
    expectations,
    hammer,
    run_kernel_helper,
    start_daemon,
    use_recording_modprobe,
)

pytestmark = [pytest.mark.reliability, root_required, pytest.mark.root]

# Names whose verdict the snapshot knows (modules and request aliases): the daemon and the
# snapshot fallback must agree on each.
STORM = {"algif-aead": 1, "vfat": 1, "algif_aead": 1, "msdos": 0, "dummy": 0, "loop": 0}


@pytest.fixture
def recording(own_root: SystemRoot) -> Path:
    records = own_root.root.parent / "records"
    use_recording_modprobe(own_root, records)
    return records


def test_sigkill_during_a_storm_of_50_helpers(
    own_root: SystemRoot, recording: Path, tally: Tally, tmp_path: Path
) -> None:
    sr = own_root
    daemon = start_daemon(sr, "--no-watch")
    snapshot = (sr.runtime / helper.SNAPSHOT_FILE).read_bytes()
    for name, code in STORM.items():  # the snapshot agrees with the policy on every name
        want = b"d" if code else b"a"
        found = helper.snapshot_lookup(snapshot, helper.normalize(name).encode())
        assert found is not None and found[0] == want, name
    results: list[tuple[str, int, list[str] | None, bool]] = []
    killed = threading.Event()
    lock = threading.Lock()
    names = sorted(STORM)

    def storm(n: int) -> None:
        for i in range(4):
            name = names[(n + i) % len(names)]
            code, record = run_kernel_helper(recording, sr.runtime, name, tmp_path)
            with lock:
                results.append((name, code, record, killed.is_set()))

    threads = [threading.Thread(target=storm, args=(n,)) for n in range(50)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 120
        while len(results) < 50:  # the daemon answers part of the storm, then dies
            assert time.monotonic() < deadline, "the storm never got going"
            time.sleep(0.01)
        assert daemon.proc is not None
        os.kill(daemon.proc.pid, signal.SIGKILL)
        killed.set()
        for t in threads:
            t.join(120)
    finally:
        daemon.stop()
    assert not any(t.is_alive() for t in threads), "a helper hung"
    assert len(results) == 200
    for name, code, record, _after in results:
        if STORM[name]:
            assert (code, record) == (1, None), name
        else:
            assert (code, record) == (0, ["-q", "--", name]), name
    after = sum(r[3] for r in results)
    assert after > 0
    tally.add("faults.sigkill_storm", 200, after_kill=after, wrong=0, hangs=0)


def test_stopped_daemon_costs_each_helper_only_its_timeout(
    own_root: SystemRoot, recording: Path, tally: Tally, tmp_path: Path
) -> None:
    """SIGSTOPped (hung, not dead: its sockets still accept): 50 concurrent helpers each
    give up after DECIDE_TIMEOUT_S and take the snapshot's verdict; none hangs."""
    sr = own_root
    daemon = start_daemon(sr, "--no-watch")
    assert daemon.proc is not None
    names = sorted(STORM)
    results: list[tuple[str, int, list[str] | None]] = []
    lock = threading.Lock()

    def one(n: int) -> None:
        name = names[n % len(names)]
        code, record = run_kernel_helper(recording, sr.runtime, name, tmp_path)
        with lock:
            results.append((name, code, record))

    os.kill(daemon.proc.pid, signal.SIGSTOP)
    try:
        threads = [threading.Thread(target=one, args=(n,)) for n in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)
        daemon.stop()
    assert not any(t.is_alive() for t in threads), "a helper hung"
    assert len(results) == 50
    for name, code, record in results:
        assert (code, record) == ((1, None) if STORM[name] else (0, ["-q", "--", name])), name
    tally.add("faults.sigstop_daemon", 50, wrong=0, hangs=0)


# --- the journal ------------------------------------------------------------------------

NAMES = ["algif-aead", "fs-vfat", "fs-msdos", "net-pf-38", "fs-cramfs", "kmodd-no-such-x"]


@pytest.fixture(scope="module")
def jd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[journald.Journald]:
    why = journald.available()
    if why is not None:
        pytest.skip(why)
    with journald.running_journald(tmp_path_factory.mktemp("journald")) as instance:
        yield instance


def test_stalled_journald(own_root: SystemRoot, jd: journald.Journald, tally: Tally) -> None:
    """journald SIGSTOPped: 9,500 decisions are all answered right, the records that fit
    neither the queue (8,192) nor journald's socket (net.unix.max_dgram_qlen: 10 here,
    512 by default) are counted as dropped and shown in status; after SIGCONT the journal
    works again.  (Fewer records than journald's RateLimitBurst of 10,000 per 30 s reach
    it, so that its rate limit does not hide the records that follow.)"""
    daemon = Daemon(own_root, extra=["--no-watch"], wrap=jd.wrap).start()
    try:
        expected = expectations(daemon, NAMES)
        free = hammer(str(own_root.runtime / helper.DECIDE_SOCKET), expected, 500, 10)
        assert free.wrong == []
        assert jd._proc is not None
        os.kill(jd._proc.pid, signal.SIGSTOP)
        try:
            stalled = hammer(str(own_root.runtime / helper.DECIDE_SOCKET), expected, 9500, 10)
            doc = daemon.status()
        finally:
            os.kill(jd._proc.pid, signal.SIGCONT)
        assert stalled.wrong == []
        lost = doc["journal"]["dropped"] + doc["journal"]["failed"]
        assert lost > 0, doc["journal"]
        assert journal_works_again(daemon, jd), "journald never got records again"
    finally:
        daemon.stop()
    tally.add(
        "faults.journald_stalled",
        10000,
        wrong=0,
        dropped=doc["journal"]["dropped"],
        failed=doc["journal"]["failed"],
        free_per_s=round(free.per_s),
        stalled_per_s=round(stalled.per_s),
    )


def journald_has(request: str) -> Callable[[journald.Record], bool]:
    return lambda r: r.get("KMODD_REQUEST") == request


def journal_works_again(daemon: Daemon, jd: journald.Journald) -> bool:
    """A cli decision reaches journald (retried: the first ones may meet a full queue)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        marker = f"kmodd-after-sigcont-{int(time.monotonic() * 1000)}"
        daemon.call(wire.Method.DECIDE, {"name": marker})
        if jd.wait_for(journald_has(marker), timeout=3):
            return True
    return False


def test_log_stream_nobody_reads(own_root: SystemRoot, tally: Tally) -> None:
    """No journald, and the log stream is a pipe nobody reads (it fills after 64 KiB):
    decisions go on, drops are counted."""
    daemon = Daemon(own_root, extra=["--no-watch", "--log-stderr"])
    read_end, write_end = os.pipe()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "LISTEN_"))}
    daemon.proc = subprocess.Popen(daemon.argv(), stdout=write_end, stderr=write_end, env=env)
    os.close(write_end)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if daemon.status().get("last_reload") is not None:
                    break
            except Exception:  # not listening yet
                assert time.monotonic() < deadline and daemon.proc.poll() is None
                time.sleep(0.05)
        expected = expectations(daemon, NAMES)
        result = hammer(str(own_root.runtime / helper.DECIDE_SOCKET), expected, 20000, 10)
        doc = daemon.status()
    finally:
        daemon.proc.kill()
        daemon.proc.wait(30)
        os.close(read_end)
    assert result.wrong == []
    assert doc["journal"]["dropped"] > 0, doc["journal"]
    tally.add(
        "faults.log_pipe_unread",
        20000,
        wrong=0,
        dropped=doc["journal"]["dropped"],
        per_s=round(result.per_s),
    )


def test_helpers_with_stalled_journald_and_no_daemon(
    own_root: SystemRoot, recording: Path, jd: journald.Journald, tally: Tally
) -> None:
    """The daemon down AND journald stalled: every helper logs its fallback to syslog
    (/dev/log -> the stalled journald).  None may block on that: each one must finish with
    the snapshot's verdict."""
    sr = own_root
    daemon = start_daemon(sr, "--no-watch")
    daemon.stop()  # leaves the snapshot; decide.sock is gone
    assert jd._proc is not None
    os.kill(jd._proc.pid, signal.SIGSTOP)
    results = []
    try:
        for i in range(30):  # /dev/log's queue holds ~10 datagrams: 30 overfill it
            name = sorted(STORM)[i % len(STORM)]
            cmd = ["/bin/sh", "-c", 'exec "$@" 0<&- 1>&- 2>&-', "sh", "/usr/bin/python3", "-IS"]
            env = {**KERNEL_ENV, helper.RUNTIME_DIR_ENV: str(sr.runtime)}
            proc = subprocess.Popen(jd.wrap([*cmd, str(HELPER), "-q", "--", name]), env=env)
            try:
                code = proc.wait(HELPER_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                code = None
            results.append((name, code))
    finally:
        os.kill(jd._proc.pid, signal.SIGCONT)
    hung = [r for r in results if r[1] is None]
    assert not hung, f"{len(hung)}/{len(results)} helpers blocked on a stalled journald"
    assert [code for _n, code in results] == [STORM[n] for n, _c in results]
    tally.add("faults.helper_stalled_syslog", len(results), hangs=0)


# --- a full runtime file system ---------------------------------------------------------

_TINY_FS = r"""
set -e
mount --make-rprivate /
mount -t tmpfs -o size=1m,mode=755 tmpfs "$1"
mount -t tmpfs -o size=256k,mode=755 tmpfs "$2"
shift 2
exec "$@"
"""
DENY_MSDOS = POLICY + "  - id: no-msdos\n    action: deny\n    match: {module: [msdos]}\n"
DENY_LOOP = POLICY + "  - id: no-loop\n    action: deny\n    match: {module: [loop]}\n"


def start_in_mount_namespace(sr: SystemRoot) -> Daemon:
    """The daemon in a private mount namespace with a 1 MiB tmpfs on its runtime dir and a
    256 KiB one on ROOT/run/modprobe.d; the test reaches both through /proc/PID/root."""
    sr.runtime.mkdir(mode=0o755)
    modprobe_d = sr.root / "run/modprobe.d"
    modprobe_d.mkdir(parents=True, exist_ok=True)
    daemon = Daemon(sr, extra=["--no-watch", "--log-stderr"])
    argv = ["unshare", "-m", "--", "sh", "-c", _TINY_FS, "sh", str(sr.runtime), str(modprobe_d)]
    with daemon.log.open("ab") as log:
        daemon.proc = subprocess.Popen([*argv, *daemon.argv()], stdout=log, stderr=log)
    inside = Path(f"/proc/{daemon.proc.pid}/root")
    sr.runtime = inside / str(sr.runtime).lstrip("/")
    sr.root = inside / str(sr.root).lstrip("/")  # enforcement file seen from inside
    deadline = time.monotonic() + 90
    while True:
        assert daemon.proc.poll() is None, daemon.log.read_text()[-2000:]
        with contextlib.suppress(client.DaemonNotRunningError):
            if daemon.status()["last_reload"] is not None:
                return daemon
        assert time.monotonic() < deadline, "kmodd did not come up"
        time.sleep(0.05)


def fill(directory: Path) -> Path:
    """Fill DIRECTORY's file system to the last byte."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for size in (1 << 16, 1 << 10, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    return filler


def _reload_error(daemon: Daemon) -> list[str]:
    try:
        daemon.call(wire.Method.RELOAD)
    except wire.RemoteError as err:
        return [str(e) for e in err.parameters["errors"]]
    return []


@pytest.mark.parametrize("full", ["runtime dir", "run/modprobe.d"])
def test_full_file_system_keeps_the_previous_generation(
    own_root: SystemRoot, tally: Tally, full: str
) -> None:
    sr = own_root
    daemon = start_in_mount_namespace(sr)
    try:
        assert daemon.generation() == 1
        snapshot_path = sr.runtime / helper.SNAPSHOT_FILE
        before = (snapshot_path.read_bytes(), sr.enforcement.read_bytes())
        filler = fill(sr.runtime if full == "runtime dir" else sr.enforcement.parent)
        sr.write_policy(DENY_MSDOS)
        errors = _reload_error(daemon)
        assert any("No space left" in e for e in errors), errors
        assert daemon.generation() == 1
        # Nothing half-written, nothing torn, nothing left behind, and the published files
        # still describe the generation that decides.
        assert (snapshot_path.read_bytes(), sr.enforcement.read_bytes()) == before
        leftovers = [p.name for d in (sr.runtime, sr.enforcement.parent) for p in d.iterdir()]
        assert not [n for n in leftovers if n.endswith(".tmp")], leftovers
        decide = str(sr.runtime / helper.DECIDE_SOCKET)
        assert helper.ask_daemon(decide, b"msdos", 5.0) == b"allow default"
        filler.unlink()
        assert _reload_error(daemon) == []
        assert daemon.generation() == 2
        assert helper.ask_daemon(decide, b"msdos", 5.0) == b"deny no-msdos"
        assert b"install msdos " in sr.enforcement.read_bytes()
    finally:
        daemon.stop()
    tally.add("faults.full_fs", 1, kept_generation=1, torn=0)


# --- files changing under the daemon ----------------------------------------------------


def wait_answer(decide: str, name: bytes, want: bytes, timeout: float = 30.0) -> None:
    """NAME gets WANT from decide.sock (the watcher may need more than one generation to
    see a burst of changes: a directory first, then its files)."""
    deadline = time.monotonic() + timeout
    while (got := helper.ask_daemon(decide, name, 5.0)) != want:
        assert time.monotonic() < deadline, (name, got, want)
        time.sleep(0.05)


def wait_generation(daemon: Daemon, after: int) -> dict[str, Any]:
    """The status once a generation newer than AFTER is live (the watcher noticed)."""
    return daemon.wait_status(
        lambda d: d["generation"] is not None and d["generation"]["number"] > after, timeout=30
    )


def test_dirs_deleted_and_recreated(own_root: SystemRoot, tally: Tally) -> None:
    """A modprobe.d dir deleted is a real change (its aliases go); a policy dir deleted is
    refused (issue 10 item 6: the last good generation stays until `--accept-removed`).
    Both recover when the dir comes back."""
    sr = own_root
    conf_dir = sr.root / "etc/modprobe.d"
    (conf_dir / "50-alias.conf").write_text("alias kmodd-test-alias vfat\n")
    daemon = start_daemon(sr)  # watching
    decide = str(sr.runtime / helper.DECIDE_SOCKET)
    steps = 0
    try:
        assert helper.ask_daemon(decide, b"kmodd-test-alias", 5.0) == b"deny no-vfat"
        # (dir, probe, the answer once the dir is gone: None = unchanged, the dir is kept)
        cases: tuple[tuple[Path, bytes, bytes | None], ...] = (
            (conf_dir, b"kmodd-test-alias", b"allow default"),
            (sr.policy_dir, b"algif-aead", None),
        )
        for directory, probe, without in cases:
            saved = {p.name: p.read_bytes() for p in directory.iterdir()}
            gen = daemon.generation()
            assert gen is not None
            with_it = helper.ask_daemon(decide, probe, 5.0)
            assert with_it is not None
            shutil.rmtree(directory)
            if without is None:
                doc = daemon.wait_status(
                    lambda d: d["last_reload"]["ok"] is False and d["last_reload"]["errors"]
                )
                assert any("policy dir is gone" in e for e in doc["last_reload"]["errors"]), doc
                assert doc["generation"]["number"] == gen
                assert helper.ask_daemon(decide, probe, 5.0) == with_it
            else:
                doc = wait_generation(daemon, gen)
                assert doc["last_reload"]["cause"].startswith("watch"), doc["last_reload"]
                wait_answer(decide, probe, without)
            directory.mkdir()
            for name, data in saved.items():
                (directory / name).write_bytes(data)
            wait_answer(decide, probe, with_it)
            steps += 2
    finally:
        daemon.stop()
    tally.add("faults.dirs_deleted_recreated", steps, recovered=steps)


def tiny_module_dir(sr: SystemRoot, tree: KernelTree, modules: tuple[str, ...]) -> Path:
    """ROOT/lib/modules/REL as a real directory with MODULES (tests/kmod's tiny tree)."""
    moddir = sr.root / "lib/modules" / tree.release
    moddir.unlink()  # make_root's symlink to the shared tree: never depmod that one
    for name in COPIED_INDEXES:
        moddir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tree.module_dir / name, moddir / name)
    depmod(sr, tree, modules)
    return moddir


def depmod(sr: SystemRoot, tree: KernelTree, modules: tuple[str, ...]) -> None:
    """Copy MODULES' real files (the tree's own suffix) and re-index ROOT with them."""
    copy_modules(tree, sr.root / "lib/modules" / tree.release, modules)
    subprocess.run(["depmod", "-b", str(sr.root), tree.release], check=True, timeout=60)


def test_depmod_while_running(own_root: SystemRoot, kernel_tree: KernelTree, tally: Tally) -> None:
    sr = own_root
    without_vfat = tuple(m for m in TINY_MODULES if m != "fs/fat/vfat")
    moddir = tiny_module_dir(sr, kernel_tree, without_vfat)
    daemon = start_daemon(sr)
    decide = str(sr.runtime / helper.DECIDE_SOCKET)
    try:
        assert helper.ask_daemon(decide, b"fs-vfat", 5.0) == b"allow default"  # no vfat.ko*
        gen = daemon.generation()
        assert gen is not None
        dep_inode = (moddir / "modules.dep").stat().st_ino
        depmod(sr, kernel_tree, TINY_MODULES)  # copies vfat in; rewrites modules.* by rename
        assert (moddir / "modules.dep").stat().st_ino != dep_inode
        doc = wait_generation(daemon, gen)
        assert "modules." in doc["last_reload"]["cause"], doc["last_reload"]
        wait_answer(decide, b"fs-vfat", b"deny no-vfat")
    finally:
        daemon.stop()
    tally.add("faults.depmod_while_running", 1, recovered=1)


def test_corrupted_snapshot_is_detected_and_rewritten(rel: Rel, tally: Tally) -> None:
    """Torn, truncated or foreign snapshots are never trusted by the helper, and the daemon
    notices within a tick or two, says so, and writes its generation's snapshot back."""
    path = rel.sr.runtime / helper.SNAPSHOT_FILE
    good = path.read_bytes()
    corruptions = {
        "truncated": good[: len(good) // 2],
        "garbage": b"\x00\xff" * 1000,
    }
    for what, data in corruptions.items():
        path.write_bytes(data)  # in place, not atomic: a real corruption
        assert helper.read_snapshot(str(path)) is None, what
        deadline = time.monotonic() + 20  # TICK_S is 5 s
        while path.read_bytes() != good:
            assert time.monotonic() < deadline, f"{what}: snapshot never rewritten"
            time.sleep(0.1)
    assert "snapshot" in rel.daemon.log.read_text()
    tally.add("faults.corrupted_snapshot", len(corruptions), recovered=len(corruptions))
