"""The kernel layer's daemon edge without a kernel: what its events become in the journal,
and what status says when it is not there."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmodd.bpf.detect import Support
from kmodd.bpf.layout import USER_NS_INIT_INO, Action, KernelEvent, Kind, Mode, Verdict
from kmodd.contract.journal import Field, MessageId, Priority
from kmodd.daemon.events import KernelEvents
from kmodd.daemon.generation import BuildOptions, Generation, build_generation
from kmodd.daemon.kernel_layer import KernelEdge, facts_of
from kmodd.paths import make_paths
from tests.daemon.running import BASE_POLICY, SystemRoot, make_root
from tests.kerneltree import KernelTree

REPO = Path(__file__).resolve().parents[2]
MODHARDEN = (REPO / "policies/20-modharden.yaml.example").read_text()


def event(kind: Kind, action: Action, name: str, **kw: int | str) -> KernelEvent:
    base: dict[str, object] = {
        "kind": kind,
        "action": action,
        "verdict": Verdict.DENY,
        "rule": 2,
        "generation": 1,
        "name": name,
        "pid": 41,
        "tgid": 40,
        "uid": 65534,
        "euid": 65534,
        "gid": 65534,
        "loginuid": None,
        "sessionid": None,
        "userns_inum": USER_NS_INIT_INO,
        "cgroup_id": 1,
        "comm": "x\n",
        "mode": Mode.ENFORCE,
        "dev": 0,
        "ino": 0,
        "ktime_ns": 1,
    }
    base.update(kw)
    return KernelEvent(**base)  # type: ignore[arg-type]


@pytest.fixture
def gen(kernel_tree: KernelTree) -> Iterator[Generation]:
    sr: SystemRoot = make_root(kernel_tree)
    sr.write_policy(BASE_POLICY, "10-test.yaml")
    sr.write_policy(MODHARDEN, "20-modharden.yaml")
    paths = make_paths(str(sr.root), sr.release, str(sr.runtime))
    paths.runtime_dir.mkdir(exist_ok=True)
    g = build_generation(1, paths, BuildOptions(cmdline=sr.cmdline))
    yield g
    g.close()
    shutil.rmtree(sr.root.parent, ignore_errors=True)


def test_a_request_denied_in_kernel_is_journaled_with_the_exact_requester(
    gen: Generation,
) -> None:
    edge = KernelEdge(Support(True, "test"))
    batch = KernelEvents((event(Kind.REQUEST, Action.DENIED, "net-pf-5"),))
    (rec,) = edge.records(batch, gen)
    assert rec.message_id is MessageId.DENY
    assert rec.message.startswith("in-kernel: denied net-pf-5")
    f = rec.fields
    assert (f[Field.RULE], f[Field.REQUESTER_UID], f[Field.OBJECT_PID]) == (
        "modharden",
        "65534",
        "40",
    )
    assert f[Field.REQUESTER_COMM] == "x\n"  # kept as is: journald fields are binary-safe
    assert (f[Field.LAYERS], f[Field.ENFORCED], f[Field.REQUESTER_CONTAINER]) == (
        "kernel",
        "yes",
        "no",
    )


def test_every_request_event_is_journaled_with_the_exact_requester(gen: Generation) -> None:
    edge = KernelEdge(Support(True, "test"))
    edge._layer = object()  # type: ignore[assignment]  # attached
    edge._domain = (gen.number, frozenset({"net_pf_5"}))  # as apply() leaves it
    root = event(Kind.REQUEST, Action.ALLOWED, "net-pf-5", uid=0, euid=0, gid=0)
    userns = event(Kind.REQUEST, Action.DENIED, "net-pf-5", userns_inum=4026532000)
    passed = event(Kind.REQUEST, Action.PASSED, "pci:v00008086d*", loginuid=1000, sessionid=3)
    allowed, denied, notice = edge.records(KernelEvents((root, userns, passed)), gen)
    assert allowed.message_id is MessageId.ALLOW
    assert (allowed.fields[Field.DECIDED_BY], allowed.fields[Field.REQUESTER_UID]) == (
        "kernel",
        "0",
    )
    assert Field.ENFORCED not in allowed.fields
    assert denied.message_id is MessageId.DENY
    assert (denied.fields[Field.RULE], denied.fields[Field.REQUESTER_USERNS]) == (
        "modharden",
        "4026532000",
    )
    assert denied.fields[Field.REQUESTER_CONTAINER] == "yes"
    assert (notice.message_id, notice.priority) == (MessageId.NOTICE, Priority.DEBUG)
    assert "passed to the helper" in notice.message
    assert (notice.fields[Field.REQUESTER_LOGINUID], notice.fields[Field.REQUESTER_SESSIONID]) == (
        "1000",
        "3",
    )
    assert (notice.fields[Field.REQUESTER_TID], notice.fields[Field.OBJECT_PID]) == ("41", "40")


def test_without_requester_rules_the_helpers_record_is_the_decision(
    kernel_tree: KernelTree,
) -> None:
    sr = make_root(kernel_tree)
    sr.write_policy(BASE_POLICY, "10-test.yaml")
    paths = make_paths(str(sr.root), sr.release, str(sr.runtime))
    paths.runtime_dir.mkdir(exist_ok=True)
    g = build_generation(1, paths, BuildOptions(cmdline=sr.cmdline))
    try:
        edge = KernelEdge(Support(True, "test"))
        edge._layer = object()  # type: ignore[assignment]
        edge._domain = (g.number, frozenset({"net_pf_5", "algif_aead"}))
        passed = event(Kind.REQUEST, Action.PASSED, "net-pf-5")  # the helper decides
        denied = event(Kind.REQUEST, Action.DENIED, "algif-aead")  # no helper runs
        notice, deny = edge.records(KernelEvents((passed, denied)), g)
        assert (notice.message_id, notice.priority) == (MessageId.NOTICE, Priority.DEBUG)
        assert deny.message_id is MessageId.DENY
        assert deny.fields[Field.DECIDED_BY] == "kernel"
    finally:
        g.close()
        shutil.rmtree(sr.root.parent, ignore_errors=True)


def test_only_the_applied_generations_domain_is_decided_in_kernel(gen: Generation) -> None:
    edge = KernelEdge(Support(True, "test"))
    edge._layer = object()  # type: ignore[assignment]  # attached, for decided_in_kernel
    edge._domain = (gen.number, frozenset({"net_pf_5"}))
    assert edge.decided_in_kernel("net-pf-5", gen.number)  # normalized as the program
    assert not edge.decided_in_kernel("net-pf-5", gen.number + 1)  # tables of another one
    assert not edge.decided_in_kernel("net-pf-9", gen.number)
    assert "no in-kernel verdict" in edge.unknown_why("net-pf-9")


def test_a_refused_module_file_is_a_warning_naming_file_loader_and_rule(gen: Generation) -> None:
    edge = KernelEdge(Support(True, "test"))
    ev = event(Kind.READ_FILE, Action.DENIED, "dummy.ko", dev=(0 << 20) | 23, ino=77, comm="insmod")
    (rec,) = edge.records(KernelEvents((ev,)), None)
    assert "refused loading dummy.ko (dev 0:23 inode 77) by 'insmod'[40] uid 65534" in rec.message


def test_a_user_namespace_is_a_container_to_the_policy() -> None:
    assert facts_of(event(Kind.REQUEST, Action.DENIED, "x", userns_inum=4026532000)).container


def test_an_inactive_layer_says_why_and_applies_nothing(gen: Generation) -> None:
    edge = KernelEdge(Support(False, "bpf is not an active LSM (…)"))
    edge.apply(gen)
    assert not edge.active
    assert edge.state() == {"active": False, "reason": "bpf is not an active LSM (…)"}
    edge.stop()
