"""udev: hostile uevent properties through the parsing function into a real daemon core
(over tests/kmod's tiny tree), and a real monitor overflow (ENOBUFS) recovered by the core
with a re-coldplug from sysfs."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kmodd.contract.journal import Record
from kmodd.daemon import status
from kmodd.daemon.core import Core, Edges
from kmodd.daemon.events import Event, UdevDevice, UdevLost
from kmodd.daemon.generation import BuildOptions, build_generation, publish
from kmodd.daemon.journal import JournalSink
from kmodd.daemon.notify import Notifier
from kmodd.daemon.udev import FIELD_MAX, MODALIAS_MAX, UdevSource, device_from_properties
from kmodd.paths import Paths
from tests.conftest import root_required
from tests.daemon.test_udev import SysDevice, _harmless_device
from tests.kmod.conftest import TinyTree, tiny_tree  # noqa: F401 -- the fixture, reused
from tests.reliability.conftest import POLICY, Tally, fuzz

pytestmark = pytest.mark.reliability
DEADLINE_S = 10.0


@pytest.fixture(scope="module")
def core(
    tiny_tree: TinyTree,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Core]:
    """A real core with a real generation over the tiny tree; records go to a list."""
    root = tmp_path_factory.mktemp("udev") / "root"
    (root / "lib/modules").mkdir(parents=True)
    (root / "lib/modules" / tiny_tree.release).symlink_to(tiny_tree.module_dir)
    (root / "etc/kmodd/policy.d").mkdir(parents=True)
    (root / "etc/kmodd/policy.d/10-test.yaml").write_text(POLICY)
    (root / "run").mkdir()
    paths = Paths(root, tiny_tree.release, root.parent / "runtime")
    paths.runtime_dir.mkdir()
    options = BuildOptions(cmdline=root.parent / "cmdline")
    sent: list[Record] = []
    sink = JournalSink(sent.append)
    sink.start()
    c = Core(paths, options, sink, Edges(notifier=Notifier(env={})))
    c.generation = publish(build_generation(1, paths, options))
    yield c
    sink.stop()
    c.close()
    shutil.rmtree(root.parent, ignore_errors=True)


hostile = st.one_of(
    st.text(max_size=80),
    st.text(min_size=MODALIAS_MAX - 5, max_size=MODALIAS_MAX + 5),
    st.text(min_size=FIELD_MAX, max_size=FIELD_MAX + 10),
    st.sampled_from(
        [
            "", "*", "?", "[", "]", "[!a]", "../../etc/passwd", "fs-vfat", "vfat", "algif-aead",
            "pci:v*d*sv*sd*bc*sc*i*", "usb:v1D6Bp0002d0606dc09dsc00dp03ic09isc00ip00in00",
            "platform:" + "x" * 5000, "acpi:PNP0A03:", "of:N*T*Cfoo\x00bar", "é\u202e\ufeff",
            "$(reboot)", "`id`", "a\nb", "\x7f\x1b[2J",
        ]
    ),
)  # fmt: skip
properties = st.fixed_dictionaries(
    {"MODALIAS": hostile},
    optional={"DEVPATH": hostile, "SUBSYSTEM": hostile, "SEQNUM": hostile},
)
actions = st.sampled_from(["add", "add", "add", "add", "change", "remove", None, "add\x00"])


@fuzz(500)
@given(actions, properties)
def test_hostile_uevent_properties(
    core: Core, tally: Tally, action: str | None, props: dict[str, str]
) -> None:
    device = device_from_properties(action, props)
    if device is None:
        tally.add("udev.hostile_properties", 1, ignored=1)
        return
    assert len(device.modalias) <= MODALIAS_MAX and device.modalias.isprintable()
    assert device.modalias.isascii() and len(device.devpath) <= FIELD_MAX
    core.handle(device)
    if device.action == "remove":  # the core forgets the device, whatever it was
        assert device.devpath not in core.devices
    else:
        assert core.devices[device.devpath] == device
    status.devices_denied(core)  # what `kmodctl status` shows: must not trip on it
    tally.add("udev.hostile_properties", 1, decided=1)


@pytest.fixture(scope="module")
def sys_device() -> SysDevice:
    found = _harmless_device()
    if found is None:
        pytest.skip("no device with a modalias under /sys/bus on this machine")
    return found


@root_required
def test_monitor_overflow_recovered_by_recoldplug(
    core: Core, sys_device: SysDevice, tally: Tally
) -> None:
    """The reader is held while 300 uevents arrive on a 4 KiB receive buffer: ENOBUFS.  The
    source posts UdevLost, the core re-coldplugs from sysfs (the device is back in its
    table), and the next real uevent is decided again."""
    events: list[Event] = []
    arrived = threading.Condition()
    held, release = threading.Event(), threading.Event()

    def post(event: Event) -> None:
        if isinstance(event, UdevDevice) and not held.is_set():
            held.set()
            release.wait(DEADLINE_S)
        with arrived:
            events.append(event)
            arrived.notify_all()

    def wait_for(predicate: object) -> Event:
        assert callable(predicate)
        with arrived:
            assert arrived.wait_for(lambda: any(predicate(e) for e in events), DEADLINE_S)
            return next(e for e in events if predicate(e))

    source = UdevSource(post, source="kernel", receive_buffer=4096)
    recoldplugs: list[int] = []

    def recoldplug() -> None:
        found = source.coldplug()
        recoldplugs.append(len(found))
        for device in found:
            core.handle(device)

    core.edges.recoldplug = recoldplug
    source.start()
    try:
        sys_device.trigger()
        assert held.wait(DEADLINE_S)
        for _ in range(300):
            sys_device.trigger()
        core.devices.pop(sys_device.devpath, None)  # only the re-coldplug can bring it back
        release.set()
        lost = wait_for(lambda e: isinstance(e, UdevLost))
        assert isinstance(lost, UdevLost) and "ENOBUFS" in lost.reason
        core.handle(lost)
        assert recoldplugs and recoldplugs[0] > 0
        assert core.devices[sys_device.devpath].action == "coldplug"
        with arrived:
            events.clear()
        sys_device.trigger()
        fresh = wait_for(lambda e: isinstance(e, UdevDevice) and e.devpath == sys_device.devpath)
        assert isinstance(fresh, UdevDevice)
        core.handle(fresh)
        assert core.devices[sys_device.devpath].action == "add"
    finally:
        release.set()
        source.stop()
        core.edges.recoldplug = None
    tally.add(
        "udev.enobufs", 1, uevents=301, lost=source.counters.lost, recoldplugged=recoldplugs[0]
    )
