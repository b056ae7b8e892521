"""`kmodctl explain` on the real Debian tree: JSON contract (design §5.4), human view,
exit codes, agreement with `modprobe -D`, provenance of modprobe.d lines."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kmodd.cli.main import main
from tests.kerneltree import KernelTree

BASELINE = Path(__file__).resolve().parents[2] / "policies/10-baseline.yaml"
KMODCTL = Path(sys.executable).with_name("kmodctl")


def explain(
    tree: KernelTree, capsys: pytest.CaptureFixture[str], *args: str, root: Path | None = None
) -> tuple[int, str]:
    argv = ["--root", str(root or tree.root), "--kernel", tree.release, "explain", *args]
    code = main(argv)
    return code, capsys.readouterr().out


def explain_json(
    tree: KernelTree, capsys: pytest.CaptureFixture[str], *args: str, root: Path | None = None
) -> tuple[int, dict[str, Any]]:
    code, out = explain(tree, capsys, *args, "--json", root=root)
    return code, json.loads(out)


def test_done_net_pf_5_with_the_installed_kmodctl(kernel_tree: KernelTree, tmp_path: Path) -> None:
    """Issue 2's first done criterion, through .venv/bin/kmodctl and the policy dirs."""
    policy_dir = tmp_path / "usr/lib/kmodd/policy.d"
    policy_dir.mkdir(parents=True)
    (policy_dir / BASELINE.name).symlink_to(BASELINE)
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib/modules").symlink_to(kernel_tree.module_dir.parent)
    proc = subprocess.run(
        [str(KMODCTL), "--root", str(tmp_path), "explain", "net-pf-5", "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    out = json.loads(proc.stdout)
    assert out["verdict"] == "deny"
    assert out["rule"] == "legacy-net-protocols"
    assert "appletalk" in out["modules"]
    assert out["load_set"] == ["llc", "psnap", "appletalk"]
    assert out["policy"]["files"] == [str(policy_dir / BASELINE.name)]


def modprobe_d_modules(tree: KernelTree, name: str) -> list[str]:
    proc = subprocess.run(
        [
            "modprobe",
            "-q",
            "-D",
            "-d",
            str(tree.dirname),  # ROOT, or ROOT/usr for Debian 13's merged-/usr tree
            "-S",
            tree.release,
            "-C",
            "/dev/null",
            "--",
            name,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return [
        Path(line.split()[1]).name.split(".")[0].replace("-", "_")
        for line in proc.stdout.splitlines()
    ]


def test_done_ext4_allowed_with_modprobes_load_set(
    kernel_tree: KernelTree, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = explain_json(kernel_tree, capsys, "ext4", "--policy", str(BASELINE))
    assert code == 0
    assert (out["verdict"], out["rule"], out["effective"]) == ("allow", "default", "allow")
    assert out["load_set"] == modprobe_d_modules(kernel_tree, "ext4")
    assert out["load_set"][-1] == "ext4"


def test_json_contract(kernel_tree: KernelTree, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = explain_json(kernel_tree, capsys, "algif-aead", "--policy", str(BASELINE))
    assert code == 1
    for key in (
        "request",
        "modules",
        "load_set",
        "verdict",
        "rule",
        "mode",
        "reason",
        "class",
        "source",
        "steps",
        "trace",
        "provenance",
        "effective",
    ):
        assert key in out, key
    assert out["request"] == "algif-aead"
    assert out["class"] == "crypto"
    assert out["rule"] == "copy-fail"
    assert out["rule_location"].endswith("10-baseline.yaml:22")
    assert "CVE-2026-31431" in out["references"]
    assert out["load_set"] == ["af_alg", "algif_aead"]
    assert [s["kind"] for s in out["steps"]] == ["insmod", "insmod"]
    assert out["steps"][1]["description"]


def test_human_view(kernel_tree: KernelTree, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = explain(kernel_tree, capsys, "net-pf-5", "--policy", str(BASELINE))
    assert code == 1
    assert "net-pf-5  (class net_protocol, source kernel)" in out
    assert "resolves to: appletalk" in out
    appletalk = kernel_tree.module_file("net/appletalk/appletalk")  # .ko or .ko.xz
    assert f"{appletalk.relative_to(kernel_tree.module_dir)}  (AppleTalk 0.20)" in out
    assert f"  modules: {kernel_tree.module_dir}" in out
    assert "verdict: DENY  (mode enforce)" in out
    assert "rule: legacy-net-protocols  (" in out
    assert "appletalk   deny   legacy-net-protocols (module)" in out


def test_merged_usr_root_says_which_base(
    trixie_tree: KernelTree, capsys: pytest.CaptureFixture[str]
) -> None:
    """Debian 13's extracted image has only usr/lib/modules: --root reads it (as kmod 34
    built for it would) and says so, in the text and in the JSON."""
    assert not (trixie_tree.root / "lib/modules").exists()
    code, out = explain(trixie_tree, capsys, "net-pf-5", "--policy", str(BASELINE))
    assert code == 1
    assert "resolves to: appletalk" in out
    note = f"  modules: {trixie_tree.module_dir} (no lib/modules: using usr/lib/modules)"
    assert note in out
    assert "net/appletalk/appletalk.ko.xz  (AppleTalk 0.20)" in out
    _, doc = explain_json(trixie_tree, capsys, "net-pf-5", "--policy", str(BASELINE))
    assert doc["module_dir_base"] == "usr/lib/modules"
    assert doc["module_dir"] == str(trixie_tree.module_dir)


def test_unresolvable_and_hostile_names(
    kernel_tree: KernelTree, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("net-pf-250", "x" * 5000, "../../etc/passwd", "$(reboot)", "a b", "[", "*"):
        code, text = explain(kernel_tree, capsys, "--json", "--", name)
        out = json.loads(text)
        assert (code, out["verdict"], out["modules"], out["load_set"]) == (0, "allow", [], [])
    code, out = explain_json(kernel_tree, capsys, "x" * 60)
    assert out["valid_kernel_name"] is False


def test_permissive_and_sources(
    kernel_tree: KernelTree, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "kmodd: 1\nmode: permissive\nrules:\n"
        "  - {id: k, action: deny, match: {module: [ext4], source: [kernel]}}\n"
    )
    code, out = explain_json(kernel_tree, capsys, "ext4", "--policy", str(policy))
    assert (code, out["verdict"], out["effective"], out["mode"]) == (
        1,
        "deny",
        "allow",
        "permissive",
    )
    code, out = explain_json(
        kernel_tree, capsys, "ext4", "--source", "udev", "--policy", str(policy)
    )
    assert (code, out["verdict"], out["source"]) == (0, "allow", "udev")
    code, text = explain(kernel_tree, capsys, "ext4", "--policy", str(policy))
    assert "would be denied, is allowed" in text


def test_provenance_of_modprobe_d_lines(
    kernel_tree: KernelTree, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    conf = tmp_path / "etc/modprobe.d"
    conf.mkdir(parents=True)
    (conf / "50-test.conf").write_text("# comment\noptions jbd2 jbd2_debug=1\n")
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib/modules").symlink_to(kernel_tree.module_dir.parent)
    code, out = explain_json(kernel_tree, capsys, "ext4", root=tmp_path)
    assert code == 0
    provenance = {(Path(p["path"]).name, p["line"], p["directive"]) for p in out["provenance"]}
    if importlib.util.find_spec("kmodd.kmod.provenance") is None:
        pytest.skip("kmodd.kmod.provenance has not landed")
    assert ("50-test.conf", 2, "options") in provenance
    jbd2 = next(s for s in out["steps"] if s["module"] == "jbd2")
    assert jbd2["options"].strip() == "jbd2_debug=1"


def test_missing_kernel_tree_is_a_clean_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--root", str(tmp_path), "explain", "ext4"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("kmodctl: ")
    assert "hint:" in err
