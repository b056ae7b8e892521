"""`kmodctl simulate`: decisions recorded in a real, namespaced journald by the daemon's
journal sink, replayed against candidate policies on the real Debian kernel tree."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kmodd.cli.main import main
from tests import journald
from tests.cli.recording import Entry, write
from tests.conftest import root_required
from tests.kerneltree import KernelTree

pytestmark = root_required

MODHARDEN = Path(__file__).resolve().parents[2] / "policies/20-modharden.yaml.example"
RECORDED = [
    Entry("net-pf-5", ["llc", "psnap", "appletalk"], uid=65534, comm="python3"),
    Entry("net-pf-5", ["llc", "psnap", "appletalk"], uid=65534, comm="python3"),
    Entry("net-pf-5", ["llc", "psnap", "appletalk"], uid=0, comm="atalkd"),
    Entry("algif-aead", ["algif_aead"], deny=True, uid=65534, comm="exploit"),
    Entry("fs-ext4", ["mbcache", "crc16", "ext4"], uid=0, comm="mount"),
]
DENY_AEAD = """\
kmodd: 1
rules:
  - id: copy-fail
    action: deny
    match: {module: [algif_aead]}
"""
DENY_APPLETALK = """\
kmodd: 1
rules:
  - id: no-appletalk
    action: deny
    match: {module: [appletalk]}
"""


@pytest.fixture(scope="module")
def jd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[journald.Journald]:
    why = journald.available()
    if why is not None:
        pytest.skip(why)
    scratch = tmp_path_factory.mktemp("journal")
    with journald.running_journald(scratch) as instance:
        write(instance, RECORDED, scratch)
        yield instance


def simulate(
    tree: KernelTree,
    jd: journald.Journald,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    *policies: str,
) -> tuple[int, dict[str, Any]]:
    paths = []
    for n, text in enumerate(policies):
        path = tmp_path / f"{n:02d}-candidate.yaml"
        path.write_text(text)
        paths.append(str(path))
    argv = ["--root", str(tree.root), "--kernel", tree.release, "simulate", "--json"]
    code = main([*argv, "--since=-1h", "--journal-namespace", jd.namespace, *paths])
    return code, json.loads(capsys.readouterr().out)


def changed(doc: dict[str, Any]) -> set[tuple[str, int | None, str, str, int]]:
    out = set()
    for c in doc["changes"]:
        uid = None if c["requester"] is None else c["requester"]["uid"]
        out.add((c["request"], uid, c["before"]["outcome"], c["after"]["outcome"], c["count"]))
    return out


def test_the_same_verdicts_change_nothing(
    kernel_tree: KernelTree,
    jd: journald.Journald,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, doc = simulate(kernel_tree, jd, tmp_path, capsys, DENY_AEAD)
    assert (doc["decisions"], doc["distinct"], doc["changes"]) == (5, 4, [])
    assert code == 0


def test_a_stricter_policy_lists_exactly_what_changes(
    kernel_tree: KernelTree,
    jd: journald.Journald,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, doc = simulate(kernel_tree, jd, tmp_path, capsys, DENY_AEAD, DENY_APPLETALK)
    assert code == 1
    assert changed(doc) == {
        ("net-pf-5", 65534, "allow", "deny", 2),
        ("net-pf-5", 0, "allow", "deny", 1),
    }
    first = next(c for c in doc["changes"] if c["requester"]["uid"] == 65534)
    assert first["comms"] == ["python3"]
    assert first["after"]["rule"] == "no-appletalk"
    assert first["before"]["rule"] == "default"


def test_a_looser_and_a_permissive_policy(
    kernel_tree: KernelTree,
    jd: journald.Journald,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, doc = simulate(kernel_tree, jd, tmp_path, capsys, "kmodd: 1\n")
    assert code == 1
    assert changed(doc) == {("algif-aead", 65534, "deny", "allow", 1)}
    permissive = DENY_AEAD.replace("rules:", "mode: permissive\nrules:")
    code, doc = simulate(kernel_tree, jd, tmp_path, capsys, permissive)
    assert changed(doc) == {("algif-aead", 65534, "deny", "would_deny", 1)}


def test_requester_rules_replay_with_the_recorded_requester(
    kernel_tree: KernelTree,
    jd: journald.Journald,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The MODHARDEN example: only uid 65534's allowed net-pf-5 turns into a deny; its
    algif-aead stays denied (by another rule now); root's requests do not change."""
    code, doc = simulate(kernel_tree, jd, tmp_path, capsys, MODHARDEN.read_text())
    assert code == 1
    assert changed(doc) == {("net-pf-5", 65534, "allow", "deny", 2)}
    assert doc["changes"][0]["after"]["rule"] == "modharden"
    assert doc["changes"][0]["requester"]["unprivileged"] is True


def test_human_output(
    kernel_tree: KernelTree,
    jd: journald.Journald,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(DENY_AEAD + DENY_APPLETALK.replace("kmodd: 1\nrules:\n", ""))
    argv = ["--root", str(kernel_tree.root), "--kernel", kernel_tree.release, "simulate"]
    code = main([*argv, "--since=-1h", "--journal-namespace", jd.namespace, str(policy)])
    out = capsys.readouterr().out
    assert code == 1
    assert "replayed 5 decision(s), 4 distinct\n" in out
    assert "2 would change (3 decision(s)):" in out
    assert "net-pf-5 [kernel, uid 65534 (python3)] x2" in out
    assert "allow (rule default) -> deny (rule no-appletalk)" in out
