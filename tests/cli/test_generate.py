"""`kmodctl generate`: from a root's /proc/modules and from decisions in a real, namespaced
journald written by the daemon's own journal sink; the output always validates."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmodd.cli.main import main
from kmodd.policy.engine import compile_policy
from kmodd.policy.loader import load_policy_files
from tests import journald
from tests.cli.recording import Entry, write
from tests.conftest import root_required

PROC_MODULES = """\
ext4 1028096 1 - Live 0xffffffffc0a00000
mbcache 16384 1 ext4, Live 0xffffffffc0400000
crc16 12288 1 ext4, Live 0x0000000000000000
"""


def _root(tmp_path: Path, modules: str = PROC_MODULES) -> Path:
    root = tmp_path / "root"
    (root / "proc").mkdir(parents=True)
    (root / "proc/modules").write_text(modules)
    return root


def generate(root: Path, *args: str) -> tuple[int, str]:
    out = root.parent / "generated.yaml"
    code = main(["--root", str(root), "generate", "-o", str(out), *args])
    return code, out.read_text() if out.exists() else ""


def allowed_modules(path: Path) -> dict[str, set[str]]:
    """rule id -> the modules it allows, from the validated file."""
    policy = load_policy_files([path])
    out = {}
    for located in policy.rules:
        assert located.rule.action.value == "allow"
        out[located.rule.id] = set(located.rule.match.module or [])
    return out


def test_loaded_modules_only(tmp_path: Path) -> None:
    root = _root(tmp_path)
    code, text = generate(root, "--no-journal")
    assert code == 0
    assert allowed_modules(tmp_path / "generated.yaml") == {
        "generated-loaded": {"ext4", "mbcache", "crc16"}
    }
    assert "        - ext4  # loaded now\n" in text
    assert "default: deny\n" in text
    compiled = compile_policy(load_policy_files([tmp_path / "generated.yaml"]))
    assert compiled.default.value == "deny"


def test_no_modules_is_still_valid(tmp_path: Path) -> None:
    root = tmp_path / "empty"
    root.mkdir()
    code, text = generate(root, "--no-journal", "--default", "allow", "--mode", "permissive")
    assert code == 0
    assert "rules: []\n" in text
    assert load_policy_files([tmp_path / "generated.yaml"]).mode.value == "permissive"


def test_hostile_proc_modules_lines_are_skipped(tmp_path: Path) -> None:
    root = _root(tmp_path, "ok_mod 1 0 - Live 0x0\n'; rm -rf / 1 0\n*glob 1 0\n\n")
    code, _ = generate(root, "--no-journal")
    assert code == 0
    assert allowed_modules(tmp_path / "generated.yaml") == {"generated-loaded": {"ok_mod"}}


@pytest.fixture
def jd(tmp_path: Path) -> Iterator[journald.Journald]:
    why = journald.available()
    if why is not None:
        pytest.skip(why)
    with journald.running_journald(tmp_path) as instance:
        yield instance


RECORDED = [
    Entry("net-pf-5", ["llc", "psnap", "appletalk"], uid=65534, comm="python3"),
    Entry("net-pf-5", ["llc", "psnap", "appletalk"], uid=0, comm="atalkd"),
    Entry("fs-ext4", ["mbcache", "crc16", "ext4"], uid=0, comm="mount"),
    Entry("algif-aead", ["algif_aead"], deny=True, uid=65534, comm="exploit"),
    Entry("net-pf-38", ["af_rxrpc"], deny=True, mode="permissive"),  # would-deny: it loaded
    Entry("pci:v00008086d00001572sv*", ["i40e"], source="udev"),
]


@root_required
def test_from_recorded_decisions(tmp_path: Path, jd: journald.Journald) -> None:
    write(jd, RECORDED, tmp_path)
    root = _root(tmp_path)
    code, text = generate(root, "--journal-namespace", jd.namespace)
    assert code == 0, text
    allowed = allowed_modules(tmp_path / "generated.yaml")
    assert allowed == {
        "generated-loaded": {"ext4", "mbcache", "crc16"},
        "generated-recorded": {"llc", "psnap", "appletalk", "af_rxrpc", "i40e"},
    }
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("- appletalk "))
    assert "requested 2x as net-pf-5 x2 by uid 65534 (python3), uid 0 (atalkd)" in line
    ext4 = next(ln for ln in text.splitlines() if ln.strip().startswith("- ext4 "))
    assert "loaded now; requested 1x as fs-ext4 by uid 0 (mount)" in ext4
    rxrpc = next(ln for ln in text.splitlines() if ln.strip().startswith("- af_rxrpc "))
    assert "requester unknown" in rxrpc
    assert "udev" in next(ln for ln in text.splitlines() if ln.strip().startswith("- i40e "))
    # The denied request is a comment, never an allowed module.
    assert "#   algif-aead: denied 1x by rule test-deny (asked by uid 65534 (exploit))" in text
    assert "algif_aead" not in str(allowed)


@root_required
def test_records_not_sent_by_root_are_ignored(tmp_path: Path, jd: journald.Journald) -> None:
    """Anyone may send SYSLOG_IDENTIFIER=kmodd; only _UID=0 records count."""
    forged = (
        "MESSAGE=allowed net-pf-5\nMESSAGE_ID=8bd2e8ad851f41c691d60a6769ff481b\n"
        "SYSLOG_IDENTIFIER=kmodd\nKMODD_REQUEST=net-pf-5\nKMODD_VERDICT=allow\n"
        "KMODD_SOURCE=kernel\nKMODD_MODE=enforce\nKMODD_RULE=default\nKMODD_MODULES=evil\n"
    )
    nobody = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
    argv = jd.wrap([*nobody, "logger", "--journald"])
    subprocess.run(argv, input=forged, text=True, check=True, timeout=30)
    jd.wait_for(lambda r: r.get("KMODD_MODULES") == "evil", "SYSLOG_IDENTIFIER=kmodd")
    write(jd, RECORDED[:1], tmp_path)
    code, _ = generate(_root(tmp_path), "--journal-namespace", jd.namespace)
    assert code == 0
    recorded = allowed_modules(tmp_path / "generated.yaml")["generated-recorded"]
    assert recorded == {"llc", "psnap", "appletalk"}
