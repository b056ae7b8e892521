"""kmodctl status / reload without a daemon, and the human rendering of a status document
(the live paths are covered against the real daemon in tests/daemon/test_daemon.py)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kmodd import helper
from kmodd.cli import client
from kmodd.cli.online import render_status
from kmodd.contract.status import (
    ConflictInfo,
    DecisionCounters,
    FallbackInfo,
    GenerationInfo,
    InitramfsInfo,
    KernelModprobe,
    KernelRuleInfo,
    LastGoodInfo,
    LayerState,
    LoadedDenied,
    ReloadInfo,
    RuleCoverageInfo,
    StatusDocument,
    StoredInfo,
    UdevInfo,
    WatcherInfo,
)
from kmodd.errors import KmoddError
from kmodd.wire import Method

KMODCTL = [sys.executable, "-m", "kmodd.cli.main"]


def kmodctl(runtime: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [*KMODCTL, "--runtime-dir", str(runtime), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("verb", ["status", "reload"])
def test_no_daemon_is_a_clear_error(tmp_path: Path, verb: str) -> None:
    out = kmodctl(tmp_path, verb)
    assert out.returncode == 1
    assert "kmodd is not running" in out.stderr
    assert "Traceback" not in out.stderr


def test_stale_socket_is_not_running(tmp_path: Path) -> None:
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / helper.CONTROL_SOCKET))
    stale.close()  # the file stays, nobody listens: ECONNREFUSED
    with pytest.raises(client.DaemonNotRunningError):
        client.call(tmp_path / helper.CONTROL_SOCKET, Method.STATUS)


def test_silent_daemon_times_out(tmp_path: Path) -> None:
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / helper.CONTROL_SOCKET))
    listener.listen()
    try:
        with pytest.raises(KmoddError, match="did not answer"):
            client.call(tmp_path / helper.CONTROL_SOCKET, Method.STATUS, timeout=0.3)
    finally:
        listener.close()


def status_doc(**over: Any) -> StatusDocument:
    """A whole document of the shared type (mypy checks every key against the contract)."""
    doc = StatusDocument(
        pid=42,
        uptime_s=3723.5,
        started=0.0,
        root="/",
        release="6.1.0-test-amd64",
        module_dir="/lib/modules/6.1.0-test-amd64",
        module_dir_base="lib/modules",
        runtime_dir="/run/kmodd",
        generation=GenerationInfo(
            number=7,
            hash="ab" * 32,
            policy_hash="cd" * 32,
            created=0.0,
            mode="permissive",
            policy_mode="enforce",
            mode_overridden=True,
            default="allow",
            files=["/etc/kmodd/policy.d/10-a.yaml", "/etc/kmodd/policy.d/20-b.yaml"],
            masked=[],
            rules=3,
            denied_modules=0,
            stands_in=None,
        ),
        mode="permissive",
        last_reload=ReloadInfo(
            ok=False,
            cause="watch: /etc/kmodd/policy.d/20-b.yaml",
            at=0.0,
            duration_s=0.4,
            generation=7,
            errors=["/etc/kmodd/policy.d/20-b.yaml:3:9: bad"],
        ),
        decisions=DecisionCounters(
            verdicts={"allow": 10, "would_deny": 2},
            rules={"default": 10, "copy-fail": 2},
            sources={"kernel": 12},
            invalid_names=0,
            no_generation=0,
        ),
        journal={"dropped": 0, "failed": 0},
        server={"refused_over_limit": 0},
        notify={"dropped": 0},
        kernel_modprobe=KernelModprobe(
            managed=True,
            points_at_helper=False,
            current="/sbin/modprobe",
            expected="/usr/local/libexec/kmodd/kmodd-modprobe",
        ),
        enforcement_file="/run/modprobe.d/00-kmodd.conf",
        snapshot="/run/kmodd/snapshot",
        conflicts=[ConflictInfo(kind="install", module="dccp", detail="x")],
        devices_denied=[],
        loaded_denied=[LoadedDenied(module="algif_aead", rule="copy-fail", reason="r")],
        notes=[],
        layers={
            "kernel": LayerState(active=False, reason="not implemented yet"),
            "helper": LayerState(active=False, reason="kernel.modprobe is '/sbin/modprobe'"),
            "modprobe_d": LayerState(active=False, reason="mode permissive: nothing rendered"),
            "udev": LayerState(active=True, reason="uevent monitor running (udev events)"),
        },
        coverage=[
            RuleCoverageInfo(
                rule="copy-fail",
                location="/x.yaml:3",
                layers=["helper", "modprobe_d"],
                enforced=True,
                gaps=[],
                remedy=None,
                kernel=KernelRuleInfo(
                    holds=True, enforcing=False, requests=True, files=["algif_aead"], leaves=[]
                ),
            ),
            RuleCoverageInfo(
                rule="no-zswap",
                location="/x.yaml:9",
                layers=["helper"],
                enforced=False,
                gaps=["built into the kernel: zswap"],
                remedy="add initcall_blacklist=zswap_init",
                kernel=None,
            ),
        ],
        initramfs=InitramfsInfo(
            path="/boot/initrd.img-6.1.0-test-amd64",
            policy_hash="ef" * 32,
            current=False,
            error=None,
        ),
        watcher=WatcherInfo(running=True, errors=3),
        udev=UdevInfo(running=True, source="udev", events=5, skipped=1, lost=2),
        last_good=None,
    )
    doc.update(over)  # type: ignore[typeddict-item]
    return doc


def test_render_status_says_what_matters() -> None:
    text = render_status(status_doc())
    assert "pid 42, up 1h 2m 3s" in text
    assert "generation:  7  hash abababababab" in text
    assert "permissive (set by the kernel command line)" in text
    assert "last reload: FAILED" in text
    assert "  /etc/kmodd/policy.d/20-b.yaml:3:9: bad" in text
    assert "decisions:   allow 10, would_deny 2" in text
    assert "NOT the kmodd helper" in text
    assert "conflicts: 1\n  install dccp: x" in text
    assert "devices needing denied modules: none" in text
    assert "  algif_aead (rule copy-fail)" in text
    assert "watcher:     3 failed round(s)" in text
    assert "udev:        5 event(s) (udev), 1 skipped, 2 monitor failure(s)" in text
    assert "  modprobe_d  INACTIVE: mode permissive: nothing rendered" in text
    assert "  udev        active: uevent monitor running (udev events)" in text
    assert "coverage:    2 deny rule(s), 1 not fully enforced" in text
    assert "  copy-fail  helper modprobe_d  (kernel layer: would hold it if active)\n" in text
    assert "  no-zswap   helper  (gaps)\n    not enforced: built into the kernel: zswap" in text
    assert "    remedy: add initcall_blacklist=zswap_init" in text
    assert "PREDATES THE POLICY (it has efefefefefef, the policy is cdcdcdcdcdcd)" in text


def test_render_status_says_which_module_tree() -> None:
    """A merged-/usr root (Debian 13's kernel packages: no lib/modules) is named as such."""
    assert "modules:     /lib/modules/6.1.0-test-amd64\n" in render_status(status_doc())
    merged = status_doc(module_dir="/img/usr/lib/modules/6.12", module_dir_base="usr/lib/modules")
    line = "modules:     /img/usr/lib/modules/6.12 (no lib/modules: using usr/lib/modules)\n"
    assert line in render_status(merged)


def test_render_status_initramfs_current_and_absent() -> None:
    current = InitramfsInfo(path="/boot/i", policy_hash="cd" * 32, current=True, error=None)
    assert "initramfs:   /boot/i: carries this policy" in render_status(
        status_doc(initramfs=current)
    )
    none = InitramfsInfo(path=None, policy_hash=None, current=False, error=None)
    assert "initramfs:   none for 6.1.0-test-amd64" in render_status(status_doc(initramfs=none))


def test_render_status_without_generation() -> None:
    text = render_status(status_doc(generation=None))
    assert "generation:  NONE" in text


def test_render_status_shows_the_last_good_generation() -> None:
    stored = StoredInfo(
        generation=6, hash="ef" * 32, release="6.1.0-test-amd64", created=0.0, inputs="00",
        policy_dirs=["/etc/kmodd/policy.d"],
    )  # fmt: skip
    last_good = LastGoodInfo(
        store="/var/lib/kmodd/last-good", stored=stored, refused=None,
        boot_published="boot-publish generation 6 hash efef", fallback=None, verified=None,
        persist_note=None, accept_removed_pending=[],
    )  # fmt: skip
    text = render_status(status_doc(last_good=last_good))
    assert "last good:   generation 6 in /var/lib/kmodd/last-good\n" in text
    assert "  boot-publish generation 6 hash efef\n" in text
    message = "policy invalid (1 error(s)): enforcing the last good generation 6"
    last_good["fallback"] = FallbackInfo(generation=6, hash="ef" * 32, message=message)
    text = render_status(status_doc(generation=None, last_good=last_good))
    assert f"last good:   ENFORCING IT: {message}\n" in text
