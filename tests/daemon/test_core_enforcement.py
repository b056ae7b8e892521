"""Decision records say whether the deny is enforced, and by which layer (KMODD_ENFORCED,
KMODD_LAYERS), and a udev record for a device whose denied driver is already in the kernel
says so instead of "denied" (KMODD_LOADED, its own MESSAGE_ID).

A real core on the real Debian tree; "already loaded" is read from a sys_module dir laid
out as /sys/module is (NAME/initstate for a loaded module), since this machine's kernel
has no modules; the VM test (tests/vm/test_enforcement.py) does the same with a real
insmod."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kmodd.contract.journal import Field, MessageId, Record
from kmodd.daemon.core import Core
from kmodd.daemon.events import ReloadCause, UdevAction, UdevDevice
from kmodd.daemon.generation import BuildOptions
from kmodd.daemon.journal import JournalSink
from kmodd.daemon.notify import Notifier
from kmodd.daemon.ports import Edges
from kmodd.daemon.server import Peer, prepare_runtime_dir
from kmodd.host.sysmodule import loaded
from kmodd.paths import Paths
from tests.conftest import root_required
from tests.daemon.running import SystemRoot, make_root
from tests.kerneltree import KernelTree

pytestmark = root_required

POLICY = """\
kmodd: 1
rules:
  - id: udev-psmouse
    action: deny
    match: {module: [psmouse], source: [udev]}
  - id: kernel-coda
    action: deny
    match: {module: [coda], source: [kernel]}
  - id: builtin-bsg
    action: deny
    match: {module: [bsg]}
  - id: hfs-by-class
    action: deny
    match: {module: [hfs], class: [filesystem]}
"""
SERIO = UdevDevice(
    UdevAction.ADD, "/devices/platform/i8042/serio1", "serio", "serio:ty01pr00id00ex00"
)


@dataclass
class Rig:
    core: Core
    sent: list[Record]
    sys_module: Path

    def udev(self, device: UdevDevice) -> Record:
        self.core._udev(device)
        assert self.core.sink.flush()
        return self.sent[-1]

    def kernel(self, name: str) -> Record:
        self.core.decide_line(name.encode(), Peer(1, 0, 0), lambda _reply: None)
        assert self.core.sink.flush()
        return self.sent[-1]


@pytest.fixture(scope="module")
def root(kernel_tree: KernelTree) -> Iterator[SystemRoot]:
    sr = make_root(kernel_tree)
    sr.write_policy(POLICY, "20-enforce.yaml")
    yield sr
    shutil.rmtree(sr.root.parent, ignore_errors=True)


@pytest.fixture
def rig(root: SystemRoot, tmp_path: Path) -> Iterator[Rig]:
    sent: list[Record] = []
    sink = JournalSink(sent.append)
    sink.start()
    paths = Paths(root.root, root.release, root.runtime)
    prepare_runtime_dir(paths.runtime_dir)
    options = BuildOptions(modprobe=str(root.modprobe), cmdline=root.cmdline)
    sys_module = tmp_path / "sys-module"
    sys_module.mkdir()
    edges = Edges(notifier=Notifier(env={}), sys_module=sys_module)
    core = Core(paths, options, sink, edges)
    core._build_now(ReloadCause.START)
    assert sink.flush()
    assert core.generation is not None, [r.message for r in sent]
    yield Rig(core, sent, sys_module)
    sink.stop()
    core.close()


def test_a_udev_deny_held_by_modprobe_d(rig: Rig) -> None:
    record = rig.udev(SERIO)
    assert record.message_id is MessageId.DENY
    assert record.fields[Field.ENFORCED] == "yes"
    assert record.fields[Field.LAYERS] == "modprobe_d"
    assert Field.LOADED not in record.fields
    assert record.message.startswith("denied /devices/platform/i8042/serio1")


def test_a_denied_driver_already_loaded_is_not_called_denied(rig: Rig) -> None:
    (rig.sys_module / "psmouse").mkdir()
    (rig.sys_module / "psmouse/initstate").write_text("live\n")
    record = rig.udev(SERIO)
    assert record.message_id is MessageId.ALREADY_LOADED
    assert record.message.startswith("already loaded /devices/platform/i8042/serio1 (serio:")
    assert "psmouse was in the kernel before kmodd decided; rule udev-psmouse" in record.message
    assert "denied" not in record.message
    assert record.fields[Field.LOADED] == "psmouse"
    assert record.fields[Field.ENFORCED] == "no: already loaded: psmouse (before kmodd decided)"
    assert record.fields[Field.VERDICT] == "deny"  # what the policy says stays true


def test_builtin_code_has_no_module_directory_state(rig: Rig) -> None:
    """A built-in with parameters has /sys/module/NAME but no initstate: not 'loaded'."""
    (rig.sys_module / "psmouse").mkdir()
    assert loaded(["psmouse", "../etc", "psmouse"], rig.sys_module) == ()


def test_a_kernel_request_held_by_the_helper_only(rig: Rig) -> None:
    record = rig.kernel("char-major-67-0")
    assert record.fields[Field.RULE] == "kernel-coda"
    assert record.fields[Field.ENFORCED] == "yes"
    assert record.fields[Field.LAYERS] == "helper"


def test_a_builtin_deny_is_not_enforced(rig: Rig) -> None:
    record = rig.kernel("bsg")
    assert record.fields[Field.VERDICT] == "deny"
    assert record.fields[Field.ENFORCED] == "no: coverage: bsg is built into the kernel"
    assert record.fields[Field.LAYERS] == ""


def test_a_rule_no_layer_holds_for_udev(rig: Rig) -> None:
    record = rig.udev(UdevDevice(UdevAction.ADD, "/devices/x", "platform", "fs-hfs"))
    assert record.fields[Field.VERDICT] == "deny", record
    assert record.fields[Field.ENFORCED].startswith("no: coverage: no layer holds rule hfs-by")
    assert record.fields[Field.LAYERS] == ""


def test_an_allow_carries_no_enforcement_fields(rig: Rig) -> None:
    record = rig.kernel("net-pf-5")
    assert record.fields[Field.VERDICT] == "allow"
    assert Field.ENFORCED not in record.fields and Field.LAYERS not in record.fields


# --- one record per device per generation (issue 14) ---------------------------------------

BOCHS = UdevDevice(  # QEMU's display: two alias lines of bochs match its modalias
    UdevAction.ADD,
    "/devices/pci0000:00/0000:00:02.0",
    "pci",
    "pci:v00001234d00001111sv00001AF4sd00001100bc03sc00i00",
)


def device_records(rig: Rig, devpath: str) -> list[str]:
    assert rig.core.sink.flush()
    return [
        str(r.fields[Field.UDEV_ACTION]) for r in rig.sent if r.fields.get(Field.DEVPATH) == devpath
    ]


def test_coldplug_then_udevs_replay_records_a_device_once(rig: Rig) -> None:
    coldplug = UdevDevice(UdevAction.COLDPLUG, SERIO.devpath, SERIO.subsystem, SERIO.modalias)
    rig.core._udev(coldplug)  # kmodd's own scan at start
    rig.core._udev(SERIO)  # `udevadm trigger` at boot: the same device again
    rig.core._udev(SERIO)
    assert device_records(rig, SERIO.devpath) == ["coldplug"]
    removed = UdevDevice(UdevAction.REMOVE, SERIO.devpath, "", "")
    rig.core._udev(removed)
    rig.core._udev(SERIO)  # replugged: decided again
    assert device_records(rig, SERIO.devpath) == ["coldplug", "add"]
    rig.core._build_now(ReloadCause.CONTROL)  # a new generation may decide it again
    rig.core._udev(SERIO)
    assert device_records(rig, SERIO.devpath) == ["coldplug", "add", "add"]
    numbers = [r.fields[Field.GENERATION] for r in rig.sent if r.fields.get(Field.DEVPATH)]
    assert numbers[-1] != numbers[-2]


def test_a_recorded_deny_is_followed_by_already_loaded_after_an_insmod(rig: Rig) -> None:
    """The VM's e3: coldplug said "denied", an insmod loaded psmouse, udev's add of the same
    device must then be recorded, or the journal's last word on it is a false "denied"."""
    coldplug = UdevDevice(UdevAction.COLDPLUG, SERIO.devpath, SERIO.subsystem, SERIO.modalias)
    rig.core._udev(coldplug)
    (rig.sys_module / "psmouse").mkdir()
    (rig.sys_module / "psmouse/initstate").write_text("live\n")
    rig.core._udev(SERIO)
    rig.core._udev(SERIO)  # and once said, not again
    assert device_records(rig, SERIO.devpath) == ["coldplug", "add"]
    last = [r for r in rig.sent if r.fields.get(Field.DEVPATH) == SERIO.devpath][-1]
    assert last.message.startswith("already loaded "), last.message


def test_an_allowed_coldplug_device_is_recorded_by_the_replay(rig: Rig) -> None:
    """Coldplug records only denies, so the replay's add is a device's one allow record."""
    coldplug = UdevDevice(UdevAction.COLDPLUG, BOCHS.devpath, BOCHS.subsystem, BOCHS.modalias)
    rig.core._udev(coldplug)
    rig.core._udev(BOCHS)
    rig.core._udev(BOCHS)
    assert device_records(rig, BOCHS.devpath) == ["add"]


def test_a_load_set_names_each_module_once(rig: Rig) -> None:
    record = rig.udev(BOCHS)
    assert record.fields[Field.VERDICT] == "allow"
    modules = str(record.fields[Field.MODULES]).split()
    assert modules[-1] == "bochs" and len(modules) == len(set(modules)), modules
    assert rig.core.generation is not None  # resolution itself stays kmod's, twice
    assert rig.core.generation.kmod.resolve(BOCHS.modalias).modules == ("bochs", "bochs")
