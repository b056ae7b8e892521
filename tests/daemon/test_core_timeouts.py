"""How long a control call may take: a reload's deadline follows the builds the core has
seen (issue 14's real boot: under TCG a reload queued behind a watched edit's build needed
two builds, 146 s, and the fixed 120 s dropped it although its generation was built)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kmodd import wire
from kmodd.contract.journal import Record
from kmodd.daemon.core import RELOAD_MARGIN_S, Core, _Built
from kmodd.daemon.events import ReloadCause
from kmodd.daemon.generation import BuildOptions
from kmodd.daemon.journal import JournalSink
from kmodd.daemon.notify import Notifier
from kmodd.daemon.ports import Edges
from kmodd.daemon.server import CONTROL_CALL_TIMEOUT_S
from kmodd.paths import Paths

RELOAD = wire.Call(wire.Method.RELOAD)
STATUS = wire.Call(wire.Method.STATUS)


@pytest.fixture
def core(tmp_path: Path) -> Iterator[Core]:
    sent: list[Record] = []
    sink = JournalSink(sent.append)
    sink.start()
    paths = Paths(tmp_path / "root", "6.1.0-test-amd64", tmp_path / "run")
    edges = Edges(notifier=Notifier(env={}), sys_module=tmp_path / "sys-module")
    c = Core(paths, BuildOptions(modprobe="/sbin/modprobe"), sink, edges)
    yield c
    sink.stop()
    c.close()


def failed_build(seconds: float) -> _Built:
    return _Built(ReloadCause.WATCH, "", None, ("x.yaml:1:1: bad",), seconds)


def test_a_reload_gets_two_of_the_slowest_builds_seen(core: Core) -> None:
    assert core.call_timeout(RELOAD) == CONTROL_CALL_TIMEOUT_S  # fast builds: the floor
    core._built(failed_build(200.0))  # a TCG-sized build (failed ones count too)
    assert core.call_timeout(RELOAD) == 2 * 200.0 + RELOAD_MARGIN_S
    core._built(failed_build(1.0))  # a fast one does not shrink it
    assert core.call_timeout(RELOAD) == 2 * 200.0 + RELOAD_MARGIN_S
    assert core.call_timeout(STATUS) == CONTROL_CALL_TIMEOUT_S  # other calls build nothing
