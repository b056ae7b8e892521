"""decide.sock with requester rules: the core never waits for who asked.

The daemon never knows the requester of a helper request.  With the kernel layer deciding
the name (its tables' domain), the helper runs only because the kernel allowed this
exact requester: the answer is `allow kernel`, and the journal record is the kernel's
event's (tests/daemon/test_kernel_layer.py).  Otherwise `unknown_requester` decides the
requester rule, and the record says requester unknown and why.  A real core on the real
Debian tree with the shipped MODHARDEN example."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kmodd.contract.journal import Field, MessageId, Record
from kmodd.contract.status import LayerState
from kmodd.daemon.core import Core
from kmodd.daemon.events import KernelEvents, ReloadCause
from kmodd.daemon.generation import BuildOptions, Generation
from kmodd.daemon.journal import JournalSink
from kmodd.daemon.notify import Notifier
from kmodd.daemon.ports import Edges
from kmodd.daemon.server import Peer, prepare_runtime_dir
from kmodd.helper import normalize
from kmodd.paths import Paths
from tests.conftest import root_required
from tests.daemon.running import SystemRoot, make_root
from tests.kerneltree import KernelTree

pytestmark = root_required

REPO = Path(__file__).resolve().parents[2]
MODHARDEN = (REPO / "policies/20-modharden.yaml.example").read_text()


@dataclass
class FakeKernel:
    """The kernel layer's port: which names its tables decide (KernelEdge.apply)."""

    domain: frozenset[str]
    generation: int = 0

    def apply(self, gen: Generation) -> None:
        self.generation = gen.number

    def records(self, batch: KernelEvents, gen: Generation | None) -> list[Record]:
        return []

    def state(self) -> LayerState:
        return LayerState(active=True, reason="fake")

    def decided_in_kernel(self, name: str, generation: int) -> bool:
        return generation == self.generation and normalize(name) in self.domain

    def unknown_why(self, name: str) -> str:
        return f"{name} has no in-kernel verdict (fake)"


@dataclass
class Rig:
    core: Core
    sent: list[Record]

    def ask(self, name: str) -> tuple[bytes | None, list[Record]]:
        before = len(self.sent)
        replies: list[bytes] = []
        reply = self.core.decide_line(name.encode(), Peer(1, 0, 0), replies.append)
        assert self.core.sink.flush()
        assert replies == []  # answered at once, never later
        return reply, self.sent[before:]


def _rig(sr: SystemRoot, kernel: FakeKernel | None) -> Iterator[Rig]:
    sent: list[Record] = []
    sink = JournalSink(sent.append)
    sink.start()
    paths = Paths(sr.root, sr.release, sr.runtime)
    prepare_runtime_dir(paths.runtime_dir)
    edges = Edges(notifier=Notifier(env={}), kernel=kernel)
    core = Core(paths, BuildOptions(modprobe=str(sr.modprobe), cmdline=sr.cmdline), sink, edges)
    core._build_now(ReloadCause.START)
    assert sink.flush()
    assert core.generation is not None, [r.message for r in sent]
    yield Rig(core, sent)
    sink.stop()
    core.close()


@pytest.fixture(scope="module")
def root(kernel_tree: KernelTree) -> Iterator[SystemRoot]:
    sr = make_root(kernel_tree)
    sr.write_policy(MODHARDEN, "20-modharden.yaml")
    yield sr
    shutil.rmtree(sr.root.parent, ignore_errors=True)


def test_without_the_kernel_layer_unknown_requester_denies(root: SystemRoot) -> None:
    for rig in _rig(root, None):
        reply, (record,) = rig.ask("net-pf-5")
        assert reply == b"deny modharden\n"  # root's request too: fail closed
        assert record.message_id is MessageId.DENY
        f = record.fields
        assert f[Field.REQUESTER] == "unknown: no kernel layer"
        assert f[Field.DECIDED_BY] == "daemon"
        why = "requester unknown; unknown_requester: deny"
        assert f[Field.REASON] == f"llc denied by rule modharden: {why}"  # llc: first loaded


def test_a_name_the_kernel_decided_keeps_the_kernels_verdict(root: SystemRoot) -> None:
    for rig in _rig(root, FakeKernel(frozenset({"net_pf_5"}))):
        reply, records = rig.ask("net-pf-5")
        assert reply == b"allow kernel\n"
        assert records == []  # journaled from the ring buffer, with the exact requester
        assert rig.core.decider.kernel_passed == 1
        reply, (record,) = rig.ask("net-pf-9")  # outside the domain: layer 1 decides
        assert reply == b"deny modharden\n"
        assert record.fields[Field.REQUESTER] == "unknown: net-pf-9 has no in-kernel verdict (fake)"


def test_stale_tables_do_not_count_as_a_kernel_verdict(root: SystemRoot) -> None:
    kernel = FakeKernel(frozenset({"net_pf_5"}))
    for rig in _rig(root, kernel):
        kernel.generation += 1  # the kernel holds another generation's tables
        reply, _ = rig.ask("net-pf-5")
        assert reply == b"deny modharden\n"


def test_unknown_requester_allow_lets_the_rule_allow(kernel_tree: KernelTree) -> None:
    sr = make_root(kernel_tree)
    try:
        sr.write_policy(MODHARDEN, "20-modharden.yaml")
        sr.write_policy("kmodd: 1\nunknown_requester: allow\n", "90-open.yaml")
        for rig in _rig(sr, None):
            reply, (record,) = rig.ask("net-pf-5")
            assert reply == b"allow modharden\n"
            assert record.fields[Field.VERDICT] == "allow"
            reply, _ = rig.ask("algif-aead")  # the baseline's deny does not test who asked
            assert reply == b"deny copy-fail\n"
    finally:
        shutil.rmtree(sr.root.parent, ignore_errors=True)
