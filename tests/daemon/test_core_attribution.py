"""The core with attribution: a kernel helper's request decided by who asked, the journal
record naming the requester, and every 'requester unknown' path.

The Attributor reads a FIFO standing in for trace_pipe and a /proc made of the real
/proc files of real processes (uid 0 and uid 65534 via setpriv), plus a decide.sock peer
whose parent is a kernel thread -- the one thing only a kernel can make.  The real
tracefs path runs in the VM (tests/vm/test_attribution.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kmodd.contract.journal import Record
from kmodd.daemon.attribution import Attributor
from kmodd.daemon.core import Core, Edges
from kmodd.daemon.generation import BuildOptions
from kmodd.daemon.journal import JournalSink
from kmodd.daemon.notify import Notifier
from kmodd.daemon.server import Peer, prepare_runtime_dir
from kmodd.paths import Paths
from tests.conftest import root_required
from tests.daemon.running import SystemRoot, make_root
from tests.daemon.test_attribution import _fake_tracefs
from tests.kerneltree import KernelTree

pytestmark = root_required

MODHARDEN = Path(__file__).resolve().parents[2] / "policies/20-modharden.yaml.example"
HELPER_PID, KWORKER_PID = 4_000_001, 4_000_002  # above any real pid_max default


@dataclass
class Rig:
    core: Core
    sent: list[Record]
    pipe: int  # write end of the fake trace_pipe
    proc: Path
    requesters: dict[str, int]  # "root"/"nobody" -> pid

    def event(self, who: str, name: str) -> None:
        pid = self.requesters[who]
        line = f"  sleep-{pid} [000] ..... 9.0: module_request: {name} wait=1 call_site=x\n"
        os.write(self.pipe, line.encode())

    def decide(self, name: str, peer: int = HELPER_PID) -> tuple[bytes, Record]:
        reply = self.core.decide_line(name.encode(), Peer(peer, 0, 0))
        assert self.core.sink.flush()
        return reply, self.sent[-1]


def _copy_proc(pid: int, proc: Path) -> None:
    (proc / str(pid)).mkdir(parents=True)
    for name in ("status", "comm", "cgroup", "uid_map"):
        shutil.copyfile(f"/proc/{pid}/{name}", proc / str(pid) / name)


def _fake_proc(proc: Path, requesters: dict[str, int]) -> None:
    for pid in requesters.values():
        _copy_proc(pid, proc)
    (proc / str(HELPER_PID)).mkdir()
    (proc / str(HELPER_PID) / "status").write_text(f"Name:\tpython3\nPPid:\t{KWORKER_PID}\n")
    (proc / str(KWORKER_PID)).mkdir()
    (proc / str(KWORKER_PID) / "cmdline").write_text("")  # a kernel thread


def _sleeper(*prefix: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([*prefix, "sleep", "120"])


def _pid_of_sleep(proc: subprocess.Popen[bytes]) -> int:
    deadline = time.monotonic() + 10
    while Path(f"/proc/{proc.pid}/comm").read_text().strip() != "sleep":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return proc.pid


@pytest.fixture(scope="module")
def root(kernel_tree: KernelTree) -> Iterator[SystemRoot]:
    sr = make_root(kernel_tree)
    (sr.policy_dir / "20-modharden.yaml").write_text(MODHARDEN.read_text())
    yield sr
    shutil.rmtree(sr.root.parent, ignore_errors=True)


@pytest.fixture
def rig(root: SystemRoot, tmp_path: Path) -> Iterator[Rig]:
    nobody = ("setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups")
    procs = [_sleeper(), _sleeper(*nobody)]
    requesters = {"root": _pid_of_sleep(procs[0]), "nobody": _pid_of_sleep(procs[1])}
    _fake_proc(tmp_path / "proc", requesters)
    instance = _fake_tracefs(tmp_path / "tracing")
    pipe = os.open(instance / "trace_pipe", os.O_RDWR)
    at = Attributor((tmp_path / "tracing",), proc=tmp_path / "proc", lockdown=tmp_path / "x")
    assert at.start().available
    sent: list[Record] = []
    sink = JournalSink(sent.append)
    sink.start()
    paths = Paths(root.root, root.release, root.runtime)
    prepare_runtime_dir(paths.runtime_dir)
    options = BuildOptions(modprobe=str(root.modprobe), cmdline=root.cmdline)
    core = Core(paths, options, sink, Edges(notifier=Notifier(env={}), attributor=at))
    core._build_now("start")  # the loop's first step, without a server
    assert sink.flush()
    assert core.generation is not None, [r.message for r in sent]
    yield Rig(core, sent, pipe, tmp_path / "proc", requesters)
    os.close(pipe)
    at.stop()
    sink.stop()
    core.close()
    for proc in procs:
        proc.kill()
        proc.wait()


def test_an_unprivileged_requester_is_denied_and_named(rig: Rig) -> None:
    rig.event("nobody", "net-pf-5")
    reply, record = rig.decide("net-pf-5")
    assert reply == b"deny modharden\n"
    pid = rig.requesters["nobody"]
    assert record.fields["OBJECT_PID"] == str(pid)
    assert record.fields["KMODD_REQUESTER_UID"] == "65534"
    assert record.fields["KMODD_REQUESTER_COMM"] == "sleep"
    assert record.fields["KMODD_RULE"] == "modharden"
    assert record.message.endswith(f"(requested by sleep[{pid}] uid 65534)")


def test_root_is_allowed_and_named(rig: Rig) -> None:
    rig.event("root", "net-pf-5")
    reply, record = rig.decide("net-pf-5")
    assert reply == b"allow default\n"
    assert record.fields["KMODD_REQUESTER_UID"] == "0"
    # One event, one request: the same name again has no requester, and says why.
    reply, record = rig.decide("net-pf-5")
    assert reply == b"allow default\n"
    assert record.fields["KMODD_REQUESTER"] == "unknown: no module_request event matched"
    assert "KMODD_REQUESTER_UID" not in record.fields


def test_a_helper_not_run_by_the_kernel_waits_for_nothing(rig: Rig) -> None:
    rig.event("nobody", "net-pf-5")
    reply, record = rig.decide("net-pf-5", peer=os.getpid())
    assert reply == b"allow default\n"
    assert record.fields["KMODD_REQUESTER"] == "unknown: the helper was not run by the kernel"
    assert rig.core.edges.attributor is not None
    assert rig.core.edges.attributor.counters()["matched"] == 0
