"""Attribution: the trace_pipe line parser, the /proc reader against real processes (real
users via setpriv, real user and pid namespaces via unshare), and the reader thread on a
real FIFO standing in for trace_pipe.  The kernel side (tracefs instance, the
module_request event) needs a kernel with modules: tests/vm/test_attribution.py."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmodd.contract.journal import MessageId, Priority, Record, requester_facts
from kmodd.daemon import attribution, records
from kmodd.daemon.attribution import Attributor, parse_event_line
from kmodd.host import tracefs
from kmodd.host.proc import read_requester, spawned_by_kernel, unit_of
from tests.conftest import root_required

# Lines in the format trace_pipe prints (kernel 6.1: 5 flag characters; older: 4;
# with the record-tgid option a "(tgid)" column).
LINE = (
    "          python-4242    [001] .....  1234.567890: module_request: net-pf-5 wait=1"
    " call_site=__sock_create+0x1b5/0x260"
)


def test_parses_a_module_request_line() -> None:
    event = parse_event_line(LINE)
    assert event is not None
    assert (event.name, event.pid, event.comm, event.wait, event.cpu) == (
        "net-pf-5",
        4242,
        "python",
        True,
        1,
    )
    assert event.timestamp == pytest.approx(1234.56789)


@pytest.mark.parametrize(
    ("line", "name", "pid", "comm", "wait"),
    [
        (
            "   my-tool v2-17 [000] d..1. 5.000001: module_request: fs-cramfs wait=1 call_site=x",
            "fs-cramfs",
            17,
            "my-tool v2",
            True,
        ),
        (
            "  <...>-99 (   99) [003] ....  7.5: module_request: algif-aead wait=0 call_site=y",
            "algif-aead",
            99,
            "<...>",
            False,
        ),
        (
            "kworker/u4:1-8 [002] 12.000000: module_request: char-major-10-200 wait=1 call_site=z",
            "char-major-10-200",
            8,
            "kworker/u4:1",
            True,
        ),
    ],
)
def test_parses_variants(line: str, name: str, pid: int, comm: str, wait: bool) -> None:
    event = parse_event_line(line)
    assert event is not None
    assert (event.name, event.pid, event.comm, event.wait) == (name, pid, comm, wait)


@pytest.mark.parametrize(
    "line",
    [
        "",
        "# tracer: nop",
        "  bash-1 [000] ..... 1.0: tracing_mark_write: kmodd-attribution-stop",
        "  bash-1 [000] ..... 1.0: module_load: appletalk",
        "  bash-1 [000] ..... 1.0: module_request: wait=1 call_site=x",
        "  bash-1 [000] ..... 1.0: module_request: net-pf-5",
        "garbage",
    ],
)
def test_ignores_other_lines(line: str) -> None:
    assert parse_event_line(line) is None


def test_reads_this_process() -> None:
    me = read_requester(os.getpid())
    assert me is not None
    assert (me.pid, me.tgid, me.uid, me.euid) == (os.getpid(), os.getpid(), os.getuid(), 0)
    assert me.gid == os.getgid()
    assert me.comm == Path("/proc/self/comm").read_text().strip()
    assert me.exe == os.path.realpath(sys.executable)
    assert me.unprivileged is (os.getuid() != 0)
    assert me.as_dict()["pid"] == os.getpid()
    fields = records.requester(me)
    assert fields["OBJECT_PID"] == str(os.getpid())
    assert fields["KMODD_REQUESTER_UID"] == str(os.getuid())
    assert requester_facts(fields) == me.facts()


def test_a_vanished_task_is_none() -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert read_requester(proc.pid) is None
    assert read_requester(2**22 + 1) is None  # above pid_max


@pytest.fixture
def spawn() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        proc.kill()
        proc.wait()


def _started(proc: subprocess.Popen[bytes], comm: str) -> int:
    """PID of the process named COMM: PROC itself or its first child (deadline 10 s)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for pid in (proc.pid, *_children(proc.pid)):
            path = Path(f"/proc/{pid}/comm")
            if path.exists() and path.read_text().strip() == comm:
                return pid
        time.sleep(0.01)
    raise AssertionError(f"no {comm} under {proc.pid}")


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text()
        found += [int(p) for p in text.split()]
    return found


@root_required
def test_reads_an_unprivileged_user(spawn: list[subprocess.Popen[bytes]]) -> None:
    argv = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
    spawn.append(subprocess.Popen([*argv, "sleep", "60"]))
    pid = _started(spawn[-1], "sleep")
    who = read_requester(pid)
    assert who is not None
    assert (who.uid, who.euid, who.gid, who.groups, who.comm) == (65534, 65534, 65534, (), "sleep")
    assert who.unprivileged
    assert not who.container


@root_required
def test_reads_a_user_namespace(spawn: list[subprocess.Popen[bytes]]) -> None:
    argv = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
    spawn.append(subprocess.Popen([*argv, "unshare", "--user", "--map-root-user", "sleep", "60"]))
    pid = _started(spawn[-1], "sleep")
    who = read_requester(pid)
    assert who is not None
    # root inside its namespace is still uid 65534 here, and marked as contained.
    assert (who.uid, who.euid) == (65534, 65534)
    assert who.userns
    assert who.container
    assert who.unprivileged


@root_required
def test_reads_a_pid_namespace(spawn: list[subprocess.Popen[bytes]]) -> None:
    spawn.append(subprocess.Popen(["unshare", "--pid", "--fork", "sleep", "60"]))
    pid = _started(spawn[-1], "sleep")
    who = read_requester(pid)
    assert who is not None
    assert who.pidns
    assert not who.userns
    assert who.container


@pytest.mark.parametrize(
    ("cgroup", "unit"),
    [
        ("/system.slice/cron.service", "cron.service"),
        ("/user.slice/user-1000.slice/session-3.scope", "session-3.scope"),
        ("/system.slice/docker-abc.scope/init", "docker-abc.scope"),
        ("/system.slice", "system.slice"),
        ("/", None),
        (None, None),
    ],
)
def test_unit_of(cgroup: str | None, unit: str | None) -> None:
    assert unit_of(cgroup) == unit


def test_lockdown_level(tmp_path: Path) -> None:
    path = tmp_path / "lockdown"
    path.write_text("none [integrity] confidentiality\n")
    assert tracefs.lockdown_level(path) == "integrity"
    assert tracefs.lockdown_level(tmp_path / "absent") is None


def test_no_tracefs_degrades_honestly(tmp_path: Path) -> None:
    lockdown = tmp_path / "lockdown"
    lockdown.write_text("none integrity [confidentiality]\n")
    at = Attributor((tmp_path / "sys-kernel-tracing",), lockdown=lockdown)
    found = at.start()
    assert not found.available
    assert found.tracefs is None
    assert found.lockdown == "confidentiality"
    assert found.reason is not None
    assert "lockdown" in found.reason
    assert at.lookup("net-pf-5", timeout_s=5.0) is None  # nothing to wait for: at once


def test_a_kernel_without_the_event(tmp_path: Path) -> None:
    root = tmp_path / "tracing"
    (root / "instances").mkdir(parents=True)
    (root / "events").mkdir()
    found = Attributor((root,), lockdown=tmp_path / "none").start()
    assert found.tracefs == str(root)
    assert not found.event
    assert not found.available
    assert found.reason is not None
    assert "module_request" in found.reason


def _fake_tracefs(root: Path) -> Path:
    """The files our instance touches, with a FIFO as its trace_pipe."""
    (root / "instances").mkdir(parents=True)
    (root / tracefs.EVENT_DIR).mkdir(parents=True)
    (root / tracefs.EVENT_DIR / "enable").write_text("0\n")
    instance = root / "instances" / attribution.INSTANCE
    (instance / tracefs.EVENT_DIR).mkdir(parents=True)
    for name in (f"{tracefs.EVENT_DIR}/enable", "trace", "buffer_size_kb", "tracing_on"):
        (instance / name).write_text("")
    (instance / "trace_marker").write_text("")
    os.mkfifo(instance / "trace_pipe")
    return instance


def test_reader_matches_events_to_live_tasks(
    tmp_path: Path, spawn: list[subprocess.Popen[bytes]]
) -> None:
    instance = _fake_tracefs(tmp_path / "tracing")
    writer = os.open(instance / "trace_pipe", os.O_RDWR)  # so the reader's open returns
    at = Attributor((tmp_path / "tracing",), lockdown=tmp_path / "none")
    try:
        assert at.start().available
        assert (instance / tracefs.EVENT_DIR / "enable").read_text() == "1"
        spawn.append(subprocess.Popen(["sleep", "60"]))
        pid = _started(spawn[-1], "sleep")
        line = f"  sleep-{pid} [000] ..... 10.0: module_request: net-pf-5 wait=1 call_site=x\n"
        os.write(writer, b"  junk line\n" + line.encode())
        who = at.lookup("net-pf-5", timeout_s=30)
        assert who is not None
        assert (who.pid, who.comm) == (pid, "sleep")
        # One event answers one request: a second lookup finds nothing.
        assert at.lookup("net-pf-5", timeout_s=0.05) is None
        assert at.counters() == {"events": 1, "matched": 1, "unmatched": 1, "gone": 0}
    finally:
        os.close(writer)  # EOF ends the reader
        at.stop()
    assert (instance / tracefs.EVENT_DIR / "enable").read_text() == "0"


def test_stale_events_are_not_matched(tmp_path: Path) -> None:
    now = [100.0]
    at = Attributor((tmp_path / "none",), clock=lambda: now[0])
    at.feed_lines([f"  x-{os.getpid()} [000] 1.0: module_request: fs-foo wait=1 call_site=x"])
    now[0] += attribution.MATCH_WINDOW_S + 1
    assert at.lookup("fs-foo", timeout_s=0) is None
    at.feed_lines([f"  x-{os.getpid()} [000] 2.0: module_request: fs-foo wait=1 call_site=x"])
    who = at.lookup("fs-foo", timeout_s=0)
    assert who is not None
    assert who.pid == os.getpid()


def test_events_of_a_name_match_oldest_first(tmp_path: Path) -> None:
    at = Attributor((tmp_path / "none",))
    me, parent = os.getpid(), os.getppid()
    at.feed_lines(
        [
            f"  a-{me} [000] 1.0: module_request: net-pf-5 wait=1 call_site=x",
            f"  b-{parent} [000] 1.1: module_request: net-pf-5 wait=1 call_site=x",
        ]
    )
    first, second = at.lookup("net-pf-5", 0), at.lookup("net-pf-5", 0)
    assert first is not None
    assert second is not None
    assert (first.pid, second.pid) == (me, parent)


def test_spawned_by_kernel(tmp_path: Path) -> None:
    assert not spawned_by_kernel(os.getpid())  # pytest's parent is a program
    proc = tmp_path / "proc"
    for pid, ppid, cmdline in ((10, 2, ""), (2, 0, ""), (12, 1, "x\0"), (11, 12, "y\0")):
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "status").write_text(f"Name:\tx\nPPid:\t{ppid}\n")
        (proc / str(pid) / "cmdline").write_text(cmdline)
    assert spawned_by_kernel(10, proc)  # parent kthreadd: the kernel ran it
    assert not spawned_by_kernel(11, proc)  # parent 12 has a command line
    assert not spawned_by_kernel(2, proc)
    assert not spawned_by_kernel(99, proc)


def test_status_has_availability_counters_and_timings(tmp_path: Path) -> None:
    at = Attributor((tmp_path / "none",))
    at.feed_lines([f"  x-{os.getpid()} [000] 1.0: module_request: fs-foo wait=1 call_site=x"])
    assert at.lookup("fs-foo", 0) is not None
    doc = at.status()
    assert doc["available"] is False
    assert (doc["events"], doc["matched"]) == (1, 1)
    assert doc["margin_ms_min"] is not None
    assert doc["margin_ms_min"] >= 0
    assert records.unknown_requester(at.availability())["KMODD_REQUESTER"].startswith(
        "unknown: tracefs is not mounted"
    )


def test_annotate_adds_fields_and_names_the_requester() -> None:
    record = Record(MessageId.DENY, Priority.WARNING, "denied net-pf-5: x", {"KMODD_RULE": "r"})
    assert records.annotate(record, None, {}) is record
    me = read_requester(os.getpid())
    assert me is not None
    out = records.annotate(record, me, records.requester(me))
    assert out.message == f"denied net-pf-5: x (requested by {me.comm}[{me.pid}] uid {me.uid})"
    assert out.fields["KMODD_RULE"] == "r"
    assert out.fields["OBJECT_PID"] == str(me.pid)
    unknown = records.annotate(record, None, {"KMODD_REQUESTER": "unknown: why"})
    assert unknown.message == record.message
    assert unknown.fields["KMODD_REQUESTER"] == "unknown: why"
