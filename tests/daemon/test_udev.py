"""udev source: real kernel uevents (root writes `add UUID` to a harmless device's uevent
file), real coldplug from sysfs, recovery from a real receive-buffer overflow."""

from __future__ import annotations

import queue
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kmodd.daemon.events import Event, UdevAction, UdevDevice, UdevLost
from kmodd.daemon.udev import (
    MODALIAS_MAX,
    UdevSource,
    device_from_properties,
    printable,
    udevd_running,
)
from tests.conftest import root_required

DEADLINE_S = 10.0


@dataclass(frozen=True)
class SysDevice:
    sys_path: Path  # /sys/devices/...
    devpath: str  # DEVPATH: sys_path without /sys
    subsystem: str
    modalias: str

    def trigger(self, action: str = "add") -> str:
        """Send a synthetic uevent (`add`, or `remove`: only a message, the kernel keeps
        the device); returns its UUID."""
        tag = str(uuid.uuid4())
        (self.sys_path / "uevent").write_text(f"{action} {tag}\n")
        return tag


def _harmless_device() -> SysDevice | None:
    """A device with a MODALIAS and, preferably, no driver bound: with udevd running, an
    `add` re-runs its rules, which then have nothing to load or rename."""
    candidates = sorted(Path("/sys/bus").glob("*/devices/*/modalias"))
    candidates.sort(key=lambda p: ((p.parent / "driver").exists(), p.parts[3] != "platform"))
    for modalias_file in candidates:
        try:
            modalias = modalias_file.read_text().strip()
        except OSError:
            continue
        real = modalias_file.parent.resolve()
        if modalias and (real / "uevent").is_file():
            subsystem = (real / "subsystem").resolve().name
            return SysDevice(real, str(real)[len("/sys") :], subsystem, modalias)
    return None


@pytest.fixture(scope="module")
def device() -> SysDevice:
    found = _harmless_device()
    if found is None:
        pytest.skip("no device with a modalias under /sys/bus on this machine")
    return found


class Inbox:
    def __init__(self) -> None:
        self.events: queue.Queue[Event] = queue.Queue()

    def post(self, event: Event) -> None:
        self.events.put(event)

    def wait_for(self, devpath: str) -> UdevDevice:
        while True:
            event = self.events.get(timeout=DEADLINE_S)
            if isinstance(event, UdevDevice) and event.devpath == devpath:
                return event


@pytest.fixture
def kernel_source() -> Iterator[tuple[UdevSource, Inbox]]:
    inbox = Inbox()
    source = UdevSource(inbox.post, source="kernel")
    source.start()
    yield source, inbox
    source.stop()


@root_required
def test_real_add_uevent_is_posted(
    device: SysDevice, kernel_source: tuple[UdevSource, Inbox]
) -> None:
    source, inbox = kernel_source
    device.trigger()
    got = inbox.wait_for(device.devpath)
    assert got.action == "add"
    assert got.modalias == device.modalias
    assert got.subsystem == device.subsystem
    assert got.seqnum > 0
    assert source.counters.events >= 1


@root_required
def test_monitor_overflow_is_recovered(device: SysDevice) -> None:
    """A tiny receive buffer, the reader held inside post(), 300 uevents: the kernel drops
    them (ENOBUFS).  The source must post UdevLost, reopen, and deliver again."""
    inbox = Inbox()
    held = threading.Event()
    release = threading.Event()

    def post(event: Event) -> None:
        if isinstance(event, UdevDevice) and not held.is_set():
            held.set()
            release.wait(DEADLINE_S)
        inbox.post(event)

    source = UdevSource(post, source="kernel", receive_buffer=4096)
    source.start()
    try:
        device.trigger()
        assert held.wait(DEADLINE_S)
        for _ in range(300):
            device.trigger()
        release.set()
        while True:
            event = inbox.events.get(timeout=DEADLINE_S)
            if isinstance(event, UdevLost):
                break
        assert "ENOBUFS" in event.reason
        assert source.counters.lost == 1
        # The new monitor works: a fresh event comes through.
        device.trigger()
        assert inbox.wait_for(device.devpath).modalias == device.modalias
    finally:
        release.set()
        source.stop()


def test_coldplug_lists_present_devices(device: SysDevice) -> None:
    found = UdevSource(lambda _: None, source="kernel").coldplug()
    assert all(d.action == "coldplug" and d.modalias for d in found)
    mine = [d for d in found if d.devpath == device.devpath]
    assert [(d.modalias, d.subsystem) for d in mine] == [(device.modalias, device.subsystem)]


class BrokenDevice:
    action = "add"

    @property
    def properties(self) -> dict[str, str]:
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "hostile")


class FakeContext:
    def list_devices(self, **_: str) -> list[object]:
        return [BrokenDevice()]


def test_unreadable_devices_are_counted_not_fatal() -> None:
    source = UdevSource(lambda _: None, context_factory=FakeContext, source="kernel")
    assert source.coldplug() == []
    assert source.counters.skipped == 1


class UnreadableSysfs:
    def list_devices(self, **_: str) -> list[object]:
        raise OSError(5, "Input/output error")


def test_unreadable_sysfs_coldplugs_nothing() -> None:
    source = UdevSource(lambda _: None, context_factory=UnreadableSysfs, source="kernel")
    assert source.coldplug() == []
    assert source.counters.skipped == 1


def test_stop_twice_and_stop_without_start_are_harmless() -> None:
    source = UdevSource(lambda _: None, source="kernel")
    source.stop()
    source.stop()


# -- pure parts ---------------------------------------------------------------------------


def props(**extra: str) -> dict[str, str]:
    base = {"DEVPATH": "/devices/pci0000:00/0000:00:05.0", "SUBSYSTEM": "pci", "SEQNUM": "42"}
    return base | extra


def test_add_with_modalias() -> None:
    got = device_from_properties("add", props(MODALIAS="pci:v00001AF4d00001044"))
    assert got == UdevDevice(UdevAction.ADD, "/devices/pci0000:00/0000:00:05.0", "pci",
                             "pci:v00001AF4d00001044", 42)  # fmt: skip


@pytest.mark.parametrize("action", ["change", "bind", None, ""])
def test_only_add_and_remove_events_count(action: str | None) -> None:
    assert device_from_properties(action, props(MODALIAS="pci:x")) is None


def test_remove_names_only_the_device() -> None:
    got = device_from_properties("remove", props(MODALIAS="pci:x"))
    assert got == UdevDevice(UdevAction.REMOVE, "/devices/pci0000:00/0000:00:05.0", "", "")
    assert device_from_properties("remove", {"MODALIAS": "pci:x"}) is None  # no devpath


@pytest.mark.parametrize(
    "modalias", ["", "\x00\x01\x7f", "\u00e9\u00e8", "x" * (MODALIAS_MAX + 1)], ids=repr
)
def test_hostile_or_empty_modalias_is_dropped(modalias: str) -> None:
    assert device_from_properties("add", props(MODALIAS=modalias)) is None


def test_control_characters_are_stripped() -> None:
    got = device_from_properties(
        "add", props(MODALIAS="usb:v1\nKMODD_VERDICT=allow\x1b[2J", DEVPATH="/dev\x00ices/x")
    )
    assert got is not None
    assert got.modalias == "usb:v1KMODD_VERDICT=allow[2J"
    assert got.devpath == "/devices/x"


@pytest.mark.parametrize("seqnum", ["", "-1", "12a", "9" * 40])
def test_bad_seqnum_is_zero(seqnum: str) -> None:
    got = device_from_properties("add", props(MODALIAS="a:b", SEQNUM=seqnum))
    assert got is not None
    assert got.seqnum == 0


def test_printable_bounds_length() -> None:
    assert printable("ab\tc" * 10, 5) == "abcab"


def test_udevd_detection_needs_socket_and_process(tmp_path: Path) -> None:
    run, proc = tmp_path / "run", tmp_path / "proc"
    (proc / "123").mkdir(parents=True)
    (proc / "123/comm").write_text("systemd-udevd\n")
    (proc / "self").mkdir()
    assert not udevd_running(run, proc)  # no control socket
    (run / "udev").mkdir(parents=True)
    (run / "udev/control").write_text("")
    assert udevd_running(run, proc)
    (proc / "123/comm").write_text("bash\n")
    assert not udevd_running(run, proc)  # stale control socket, udevd gone
