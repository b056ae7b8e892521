"""`kmodctl simulate --directory DIR`: three hosts (real journald instances, each with its
own hostname and machine id) record decisions through the daemon's journal sink, upload
them with the real systemd-journal-upload to a real systemd-journal-remote on loopback, and
simulate reads the collected DIR: per host, what a candidate newly denies or allows.  A
non-root sender on one host forges a decision record (with _UID=0 and another host's name
in its payload): it reaches DIR, and counts nowhere."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from kmodd.cli.main import main
from kmodd.contract.journal import MessageId
from tests import journald, journalremote
from tests.cli.recording import Entry, write
from tests.conftest import root_required
from tests.kerneltree import KernelTree

pytestmark = root_required

HOSTS = {
    "fleet-a": [
        Entry("net-pf-5", ["llc", "psnap", "appletalk"], uid=65534, comm="python3"),
        Entry("net-pf-5", ["llc", "psnap", "appletalk"], uid=65534, comm="python3"),
        Entry("fs-ext4", ["mbcache", "crc16", "ext4"], uid=0, comm="mount"),
    ],
    "fleet-b": [Entry("algif-aead", ["algif_aead"], uid=0, comm="charon") for _ in range(3)]
    + [Entry("fs-vfat", ["fat", "vfat"], deny=True, uid=0, comm="mount")],
    "fleet-c": [Entry("fs-ext4", ["mbcache", "crc16", "ext4"], uid=0, comm="mount")],
}
CANDIDATE = """\
kmodd: 1
rules:
  - id: copy-fail
    action: deny
    match: {module: [algif_aead]}
  - id: no-appletalk
    action: deny
    match: {module: [appletalk]}
"""
# Sent as uid 65534 over journald's native socket: every field a decision record has,
# plus the trusted ones it may not set (journald drops fields starting with "_").
FORGER = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.sendto(("\n".join(sys.argv[1:]) + "\n").encode(), "/run/systemd/journal/socket")
"""


def _forge(jd: journald.Journald, victim: str) -> None:
    fields = [
        "SYSLOG_IDENTIFIER=kmodd",
        f"MESSAGE_ID={MessageId.ALLOW.value}",
        "MESSAGE=decision: allowed",
        "KMODD_REQUEST=net-pf-38",
        "KMODD_VERDICT=allow",
        "KMODD_RULE=default",
        "KMODD_SOURCE=kernel",
        "KMODD_MODE=enforce",
        "KMODD_MODULES=af_key",
        "_UID=0",
        f"_HOSTNAME={victim}",
    ]
    setpriv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    argv = jd.wrap([*setpriv, "/usr/bin/python3", "-c", FORGER, *fields])
    subprocess.run(argv, check=True, timeout=30)
    jd.wait_for(lambda r: True, "KMODD_REQUEST=net-pf-38")


@pytest.fixture(scope="module")
def collected(tmp_path_factory: pytest.TempPathFactory) -> Path:
    why = journald.available() or journalremote.available()
    if why is not None:
        pytest.skip(why)
    scratch = tmp_path_factory.mktemp("fleet")
    out = scratch / "remote"
    with journalremote.collector(out) as remote:
        for name, entries in HOSTS.items():
            with journald.running_journald(scratch, hostname=name) as jd:
                write(jd, entries, scratch)
                if name == "fleet-b":
                    _forge(jd, victim="fleet-c")
                remote.upload(jd.journal_dir())
    # The collector stopped (it closes and syncs its files): DIR is what a reviewer reads.
    return out


def simulate(tree: KernelTree, directory: Path, tmp_path: Path, *extra: str) -> int:
    policy = tmp_path / "candidate.yaml"
    policy.write_text(CANDIDATE)
    argv = ["--root", str(tree.root), "--kernel", tree.release, "simulate"]
    return main([*argv, *extra, "--directory", str(directory), str(policy)])


def _doc(
    tree: KernelTree, directory: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[int, dict[str, Any]]:
    code = simulate(tree, directory, tmp_path, "--json")
    return code, json.loads(capsys.readouterr().out)


def test_the_forgery_reached_the_collector(collected: Path) -> None:
    """So that the next tests' "counts nowhere" could fail: the forged record is in DIR,
    with journald's own _UID (65534) and _HOSTNAME (fleet-b), not the forged ones."""
    proc = subprocess.run(
        ["journalctl", f"--directory={collected}", "-o", "json", "KMODD_REQUEST=net-pf-38"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    found = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["_UID"], r["_HOSTNAME"], r["SYSLOG_IDENTIFIER"]) for r in found] == [
        ("65534", "fleet-b", "kmodd")
    ]


def test_per_host_what_if(
    kernel_tree: KernelTree,
    collected: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, doc = _doc(kernel_tree, collected, tmp_path, capsys)
    assert code == 1
    assert doc["decisions"] == 8  # the 8 written by the sink; the forgery is not one
    hosts = {h["hostname"]: h for h in doc["hosts"]}
    assert set(hosts) == set(HOSTS)
    assert len({h["machine_id"] for h in doc["hosts"]}) == 3

    def seen(name: str, what: str) -> set[tuple[str, int, str, str]]:
        return {
            (c["request"], c["count"], c["before"]["outcome"], c["after"]["rule"])
            for c in hosts[name][what]
        }

    assert seen("fleet-a", "newly_denied") == {("net-pf-5", 2, "allow", "no-appletalk")}
    assert seen("fleet-a", "newly_allowed") == set()
    assert seen("fleet-b", "newly_denied") == {("algif-aead", 3, "allow", "copy-fail")}
    assert seen("fleet-b", "newly_allowed") == {("fs-vfat", 1, "deny", "default")}
    assert hosts["fleet-c"]["newly_denied"] == hosts["fleet-c"]["newly_allowed"] == []
    assert hosts["fleet-c"]["decisions"] == 1  # not 2: the forged one named fleet-c
    assert (hosts["fleet-a"]["decisions"], hosts["fleet-b"]["decisions"]) == (3, 4)
    summary = doc["summary"]
    assert summary["hosts"] == 3
    assert summary["hosts_unchanged"] == 1
    assert summary["newly_denied"] == {
        "hosts": 2,
        "requests": ["algif-aead", "net-pf-5"],
        "decisions": 5,
    }
    assert summary["newly_allowed"] == {"hosts": 1, "requests": ["fs-vfat"], "decisions": 1}


def test_the_review_text(
    kernel_tree: KernelTree,
    collected: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = simulate(kernel_tree, collected, tmp_path)
    out = capsys.readouterr().out
    assert code == 1
    assert "fleet: 3 host(s), 1 unchanged\n" in out
    assert "  newly denied on 2 host(s), 5 decision(s): algif-aead, net-pf-5\n" in out
    assert "  newly allowed on 1 host(s), 1 decision(s): fs-vfat\n" in out
    assert "newly_denied: algif-aead [kernel, uid 0] x3: allow -> deny (rule copy-fail)" in out
    assert "host fleet-c" not in out
    assert out.index("host fleet-a") < out.index("host fleet-b")  # hosts by name


def test_no_window_and_no_directory_is_refused(
    kernel_tree: KernelTree, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--root", str(kernel_tree.root), "--kernel", kernel_tree.release, "simulate"]
    assert main(argv) != 0
    assert "--directory" in capsys.readouterr().err
