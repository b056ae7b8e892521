"""Journal records: the bounded sink (unit), and the exact fields read back from a real,
namespaced journald (root)."""

from __future__ import annotations

import io
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmodd import helper, wire
from kmodd.contract.journal import MessageId, Priority, Record
from kmodd.daemon.journal import JournalSink, stream_sender
from tests import journald
from tests.conftest import root_required
from tests.daemon.running import Daemon, SystemRoot, as_nobody, make_root, run_helper
from tests.daemon.test_daemon import _CONNECT
from tests.kerneltree import KernelTree


def rec(n: int) -> Record:
    return Record(MessageId.NOTICE, Priority.INFO, f"m{n}", {"KMODD_N": str(n)})


def test_sink_never_blocks_and_counts_drops() -> None:
    gate, entered = threading.Event(), threading.Event()
    sent: list[Record] = []

    def slow(record: Record) -> None:
        entered.set()
        gate.wait(30)
        sent.append(record)

    sink = JournalSink(slow, maxsize=4)
    sink.start()
    sink.emit(rec(0))
    assert entered.wait(10)  # the writer is stuck in journald with record 0
    for n in range(1, 20):  # the queue takes four, the other fifteen are dropped at once
        sink.emit(rec(n))
    assert sink.dropped == 15
    gate.set()
    assert sink.flush()
    assert [r.message for r in sent] == [f"m{n}" for n in range(5)]  # 0, then the four queued
    sink.stop()


def test_sender_failure_is_counted_not_fatal() -> None:
    def broken(record: Record) -> None:
        raise ConnectionRefusedError("stale journald socket")

    sink = JournalSink(broken)
    sink.start()
    sink.emit(rec(1))
    sink.emit(rec(2))
    assert sink.flush()
    assert sink.failed == 2
    sink.stop()


def test_stream_sender_line() -> None:
    out = io.StringIO()
    stream_sender(out)(Record(MessageId.DENY, Priority.WARNING, "denied x", {"KMODD_RULE": "r"}))
    assert out.getvalue() == "<4>kmodd: denied x  KMODD_RULE=r\n"


def test_message_ids_are_unique_and_documented() -> None:
    ids = [m.value for m in MessageId]
    assert len(set(ids)) == len(ids)
    repo = Path(__file__).resolve().parents[2]
    docs = (repo / "docs/journal.md").read_text()
    catalog = (repo / "systemd/kmodd.catalog").read_text()
    for m in MessageId:
        assert m.value in docs, m
        assert f"-- {m.value}" in catalog, m


# --- real journald -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def jd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[journald.Journald]:
    why = journald.available()
    if why is not None:
        pytest.skip(why)
    with journald.running_journald(tmp_path_factory.mktemp("journald")) as instance:
        yield instance


@pytest.fixture(scope="module")
def logged(kernel_tree: KernelTree, jd: journald.Journald) -> Iterator[tuple[SystemRoot, Daemon]]:
    sr = make_root(kernel_tree)
    daemon = Daemon(sr, wrap=jd.wrap).start()
    yield sr, daemon
    daemon.stop()
    shutil.rmtree(sr.root.parent, ignore_errors=True)


def _kmodd(r: dict[str, str]) -> bool:
    return r.get("SYSLOG_IDENTIFIER") == "kmodd"


@root_required
def test_decision_records_carry_the_exact_fields(
    jd: journald.Journald, logged: tuple[SystemRoot, Daemon]
) -> None:
    sr, daemon = logged
    assert run_helper(sr, "-q", "--", "algif-aead") == (1, None)
    assert run_helper(sr, "-q", "--", "fs-vfat") == (0, ["-q", "--", "fs-vfat"])
    gen = str(daemon.generation())
    deny = jd.wait_for(lambda r: r.get("KMODD_REQUEST") == "algif-aead", "SYSLOG_IDENTIFIER=kmodd")
    assert len(deny) == 1
    d = deny[0]
    assert d["MESSAGE_ID"] == MessageId.DENY.value
    assert d["PRIORITY"] == "4"
    assert d["KMODD_VERDICT"] == "deny"
    assert d["KMODD_RULE"] == "copy-fail"
    assert d["KMODD_MODULES"] == "af_alg algif_aead"
    assert d["KMODD_SOURCE"] == "kernel"
    assert d["KMODD_MODE"] == "enforce"
    assert d["KMODD_POLICY_GENERATION"] == gen
    assert d["KMODD_CLASS"] == "crypto"
    assert d["KMODD_MODULE"] == "algif_aead"
    assert d["KMODD_REASON"] == "algif_aead denied by rule copy-fail: CVE-2026-31431: AF_ALG AEAD"
    assert d["MESSAGE"].startswith("denied algif-aead: ")
    allow = jd.wait_for(lambda r: r.get("KMODD_REQUEST") == "fs-vfat", "SYSLOG_IDENTIFIER=kmodd")
    a = allow[0]
    assert (a["MESSAGE_ID"], a["PRIORITY"], a["KMODD_VERDICT"], a["KMODD_RULE"]) == (
        MessageId.ALLOW.value,
        "6",
        "allow",
        "default",
    )
    assert a["KMODD_MODULES"] == "fat vfat"


@root_required
def test_lifecycle_and_reload_records(
    jd: journald.Journald, logged: tuple[SystemRoot, Daemon]
) -> None:
    _sr, daemon = logged
    assert daemon.proc is not None
    pid = f"_PID={daemon.proc.pid}"
    ids = {r["MESSAGE_ID"] for r in jd.wait_for(_kmodd, pid, count=2)}
    assert MessageId.START.value in ids and MessageId.RELOAD_OK.value in ids


@root_required
def test_refused_peer_is_logged(jd: journald.Journald, logged: tuple[SystemRoot, Daemon]) -> None:
    sr, _daemon = logged

    sock = sr.runtime / helper.DECIDE_SOCKET
    sock.chmod(0o666)
    try:
        as_nobody(_CONNECT, str(sock), "decide fs-vfat\n")
    finally:
        sock.chmod(0o600)
    found = jd.wait_for(
        lambda r: r.get("MESSAGE_ID") == MessageId.REFUSED.value, "SYSLOG_IDENTIFIER=kmodd"
    )
    assert found and found[0]["KMODD_PEER_UID"] == "65534"
    assert found[0]["KMODD_SOCKET"] == "decide"


@root_required
def test_helper_fallbacks_go_to_syslog(jd: journald.Journald, kernel_tree: KernelTree) -> None:
    sr = make_root(kernel_tree)
    try:
        daemon = Daemon(sr).start()
        daemon.stop()  # the snapshot stays; nobody answers on decide.sock
        assert run_helper(sr, "-q", "--", "algif-aead", wrap=jd.wrap) == (1, None)
        assert run_helper(sr, "--deny", "dccp", wrap=jd.wrap) == (1, None)
        assert run_helper(sr, "-x", wrap=jd.wrap) == (2, None)
        ident = "SYSLOG_IDENTIFIER=kmodd-modprobe"
        found = [r["MESSAGE"] for r in jd.wait_for(lambda r: True, ident, count=3)]
        assert (
            "fallback for algif-aead: daemon did not answer; snapshot denies (rule copy-fail)"
            in found
        )
        assert "denied dccp through modprobe.d" in found
        assert any(m.startswith("usage error") for m in found)
    finally:
        shutil.rmtree(sr.root.parent, ignore_errors=True)


UDEV_POLICY = """\
kmodd: 1
default: allow
rules:
  - id: no-vmclock-test
    action: deny
    match:
      request: ["{modalias}"]
    reason: "test: deny the harmless device's modalias"
"""


@root_required
def test_real_uevent_is_decided_and_logged_with_source_udev(
    jd: journald.Journald, kernel_tree: KernelTree
) -> None:
    from tests.daemon.test_udev import _harmless_device  # noqa: PLC0415 -- shared finder

    device = _harmless_device()
    if device is None:
        pytest.skip("no device with a modalias under /sys/bus on this machine")
    sr = make_root(kernel_tree)
    sr.write_policy(UDEV_POLICY.format(modalias=device.modalias.replace("*", "[*]")))
    # --no-watch: one generation throughout (a new one may record every device again)
    daemon = Daemon(sr, extra=["--no-watch"], wrap=jd.wrap, udev=True)
    try:
        daemon.start()
        # Coldplug at start: the present device needs a denied "module" -> status lists it.
        doc = daemon.wait_status(lambda d: d["devices_denied"] != [])
        denied = {d["devpath"]: d["rule"] for d in doc["devices_denied"]}
        assert denied[device.devpath] == "no-vmclock-test"
        # udev's replay at boot (`udevadm trigger`) sends an add for every present device:
        # decided already with this generation, so not recorded again (issue 14).
        device.trigger()
        # A remove uevent: the device no longer needs anything, status forgets it.
        device.trigger("remove")
        doc = daemon.wait_status(
            lambda d: device.devpath not in {x["devpath"] for x in d["devices_denied"]}
        )
        # The monitor's own counters are in status: the add and the remove it posted.
        udev = doc["udev"]
        assert udev is not None
        assert udev["running"] is True and udev["events"] >= 2, udev
        device.trigger("add")  # back again (and what every other listener last heard)
        found = jd.wait_for(
            lambda r: (
                r.get("KMODD_DEVPATH") == device.devpath and r.get("KMODD_UDEV_ACTION") == "add"
            ),
            "SYSLOG_IDENTIFIER=kmodd",
        )
        assert found, "no udev decision record"
        r = found[0]
        assert r["KMODD_DEVPATH"] == device.devpath
        assert r["KMODD_REQUEST"] == device.modalias
        assert r["KMODD_SOURCE"] == "udev"
        assert r["KMODD_VERDICT"] == "deny" and r["KMODD_RULE"] == "no-vmclock-test"
        assert r["KMODD_SUBSYSTEM"] == device.subsystem
        assert r["MESSAGE_ID"] == MessageId.DENY.value
        # One record per device per presence: the coldplug one, none for the replayed add,
        # the add after the remove (records of one stream arrive in order).
        mine = [
            r["KMODD_UDEV_ACTION"]
            for r in jd.records("SYSLOG_IDENTIFIER=kmodd")
            if r.get("KMODD_DEVPATH") == device.devpath
        ]
        assert mine == ["coldplug", "add"], mine
        assert doc["layers"]["udev"]["active"] is True
    finally:
        if daemon.proc is not None:
            daemon.stop()
        shutil.rmtree(sr.root.parent, ignore_errors=True)


@root_required
def test_reload_failure_conflict_and_tamper_records(
    jd: journald.Journald, kernel_tree: KernelTree
) -> None:
    sr = make_root(kernel_tree)
    (sr.root / "etc/modprobe.d/00-aaa.conf").write_text("install algif_aead /bin/true\n")
    sysctl = sr.root.parent / "kernel.modprobe"
    sysctl.write_text("/sbin/modprobe\n")
    helper_path = sr.root.parent / "kmodd-modprobe"
    shutil.copyfile(Path(helper.__file__), helper_path)
    helper_path.chmod(0o755)
    extra = ["--no-watch", "--modprobe-sysctl", str(sysctl), "--helper-path", str(helper_path)]
    daemon = Daemon(sr, extra=extra, wrap=jd.wrap, env={"WATCHDOG_USEC": "400000"})
    try:
        daemon.start()
        assert daemon.proc is not None
        pid = f"_PID={daemon.proc.pid}"
        conflict = jd.wait_for(lambda r: r["MESSAGE_ID"] == MessageId.CONFLICT.value, pid)
        assert conflict and conflict[0]["KMODD_CONFLICT"] == "install"
        assert conflict[0]["KMODD_MODULE"] == "algif_aead"
        assert conflict[0]["PRIORITY"] == "4"
        sr.write_policy("kmodd: 1\nrules:\n  - id: x\n    action: maybe\n")
        with pytest.raises(wire.RemoteError):
            daemon.call(wire.Method.RELOAD)
        failed = jd.wait_for(lambda r: r["MESSAGE_ID"] == MessageId.RELOAD_FAILED.value, pid)
        assert failed and failed[0]["PRIORITY"] == "3"
        assert f"{sr.policy_dir / '10-test.yaml'}:4:13:" in failed[0]["KMODD_ERRORS"]
        assert failed[0]["KMODD_RELOAD_CAUSE"] == "control"
        sysctl.write_text("/tmp/evil\n")
        tamper = jd.wait_for(lambda r: r["MESSAGE_ID"] == MessageId.TAMPER.value, pid)
        assert tamper and tamper[0]["KMODD_CURRENT"] == "/tmp/evil"
        assert tamper[0]["KMODD_EXPECTED"] == str(helper_path)
        daemon.stop()
        stop = jd.wait_for(lambda r: r["MESSAGE_ID"] == MessageId.STOP.value, pid)
        assert stop and stop[0]["MESSAGE"].endswith("stopping: SIGTERM")
    finally:
        daemon.stop()
        shutil.rmtree(sr.root.parent, ignore_errors=True)
