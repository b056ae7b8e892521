"""The Decider on a real generation over the real Debian tree: the one decision cache keeps
real names through a flood of made-up ones, counts what it decides and journals it."""

from __future__ import annotations

import shutil
import tracemalloc
from collections.abc import Iterator

import pytest

from kmodd.contract.journal import Field, MessageId, Record
from kmodd.daemon.decider import DECISION_CACHE_MAX, Decider
from kmodd.daemon.journal import JournalSink
from kmodd.policy.types import Outcome, Source, Verdict
from tests.daemon.running import SystemRoot, make_root
from tests.daemon.test_generation import build
from tests.kerneltree import KernelTree

REAL = ("vfat", "fs-vfat", "algif-aead", "net-pf-5", "crypto-sha256", "ext4")
FLOOD = DECISION_CACHE_MAX + 1000  # more than the cache holds: a cache of every name
# would have pushed every real one out by then


@pytest.fixture(scope="module")
def decider(kernel_tree: KernelTree) -> Iterator[tuple[Decider, list[Record]]]:
    sr: SystemRoot = make_root(kernel_tree)
    gen = build(sr, 1)
    sent: list[Record] = []
    sink = JournalSink(sent.append)
    sink.start()
    d = Decider(sink)
    d.use(gen)
    yield d, sent
    sink.stop()
    gen.close()
    shutil.rmtree(sr.root.parent, ignore_errors=True)


def test_a_flood_of_made_up_names_changes_neither_memory_nor_real_hits(
    decider: tuple[Decider, list[Record]],
) -> None:
    d, _sent = decider
    for name in REAL:
        found = d.answer(name, Source.KERNEL)
        assert found is not None
        assert found.decision.modules, name  # real: each resolves to a module
    cached = d.cached
    assert cached == len(REAL)
    hits = d.hits
    for name in REAL:
        d.answer(name, Source.KERNEL)
    assert d.hits - hits == len(REAL)  # warm: every real name is a hit

    tracemalloc.start()
    before, _ = tracemalloc.get_traced_memory()
    for i in range(FLOOD):
        made_up = d.answer(f"fs-made-up-{i}", Source.KERNEL)
        assert made_up is not None
        assert made_up.decision.verdict is Verdict.ALLOW
        assert not made_up.decision.modules
    after, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert d.cached == cached  # not one made-up name kept
    # Python memory the flood left behind (4,096 kept decisions with records were ~7 MB);
    # the bound is generous for allocator noise, far below one cached flood.
    assert after - before < 256 << 10, after - before
    print(f"flood of {FLOOD} made-up names: {d.cached} cached, {after - before} B of heap left")

    hits, misses = d.hits, d.misses
    for name in REAL:
        d.answer(name, Source.KERNEL)
    assert (d.hits - hits, d.misses - misses) == (len(REAL), 0)  # hit rate unchanged: 100%


def test_kernel_requests_are_counted_and_journaled_once_each(
    decider: tuple[Decider, list[Record]],
) -> None:
    d, sent = decider
    before = d.stats.verdicts.copy()
    assert d.kernel(b"algif-aead", {}) == b"deny copy-fail\n"
    assert d.kernel(b"fs-vfat", {Field.REQUESTER: "unknown: test"}) == b"allow default\n"
    assert d.sink.flush()
    deny, allow = sent[-2], sent[-1]
    assert (deny.message_id, deny.fields[Field.REQUEST]) == (MessageId.DENY, "algif-aead")
    assert allow.fields[Field.REQUESTER] == "unknown: test"
    assert Field.REQUESTER not in deny.fields  # the cached record itself is never changed
    assert d.stats.verdicts[Outcome.DENY] - before[Outcome.DENY] == 1
    assert d.stats.verdicts[Outcome.ALLOW] - before[Outcome.ALLOW] == 1


def test_coldplug_logs_only_denials(decider: tuple[Decider, list[Record]]) -> None:
    d, sent = decider
    assert d.sink.flush()
    count = len(sent)
    allowed = d.logged("fs-vfat", Source.UDEV, only_denied=True)
    assert allowed is not None
    assert allowed.verdict is Verdict.ALLOW
    denied = d.logged("algif-aead", Source.UDEV, only_denied=True)
    assert denied is not None
    assert denied.verdict is Verdict.DENY
    assert d.sink.flush()
    assert [r.fields[Field.REQUEST] for r in sent[count:]] == ["algif-aead"]
