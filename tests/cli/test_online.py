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


def status_doc(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "pid": 42,
        "uptime_s": 3723.5,
        "generation": {
            "number": 7,
            "hash": "ab" * 32,
            "mode": "permissive",
            "mode_overridden": True,
            "default": "allow",
            "rules": 3,
            "files": ["/etc/kmodd/policy.d/10-a.yaml", "/etc/kmodd/policy.d/20-b.yaml"],
        },
        "last_reload": {
            "ok": False,
            "cause": "watch: /etc/kmodd/policy.d/20-b.yaml",
            "at": 0.0,
            "duration_s": 0.4,
            "generation": 7,
            "errors": ["/etc/kmodd/policy.d/20-b.yaml:3:9: bad"],
        },
        "decisions": {
            "verdicts": {"allow": 10, "would_deny": 2},
            "rules": {"default": 10, "copy-fail": 2},
            "sources": {"kernel": 12},
        },
        "journal": {"dropped": 0},
        "kernel_modprobe": {
            "managed": True,
            "points_at_helper": False,
            "current": "/sbin/modprobe",
            "expected": "/usr/local/libexec/kmodd/kmodd-modprobe",
        },
        "enforcement_file": "/run/modprobe.d/00-kmodd.conf",
        "conflicts": [{"kind": "install", "module": "dccp", "detail": "x"}],
        "devices_denied": [],
        "loaded_denied": [{"module": "algif_aead", "rule": "copy-fail"}],
        "notes": [],
    }
    doc.update(over)
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


def test_render_status_without_generation() -> None:
    text = render_status(status_doc(generation=None))
    assert "generation:  NONE" in text
