"""`kmodctl cmdline`: the kernel arguments the policy implies, text and --json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kmodd.cli.main import main
from tests.kerneltree import KernelTree

REPO = Path(__file__).resolve().parents[2]
BASELINE = REPO / "policies/10-baseline.yaml"


def test_baseline_on_debian12(kernel_tree: KernelTree, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--root", str(kernel_tree.root), "cmdline", "--policy", str(BASELINE), "--json"]
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert "algif_aead" in doc["module_blacklist"] and "ksmbd" in doc["module_blacklist"]
    assert doc["arguments"][0] == "module_blacklist=" + ",".join(doc["module_blacklist"])
    assert doc["fits"] and doc["length"] < 2048
    assert doc["module_dir"] == str(kernel_tree.module_dir)
    # lib/modules on Debian 12; Debian 13's image has only usr/lib/modules (test-debian13)
    base = kernel_tree.module_dir.parent.relative_to(kernel_tree.root)
    assert doc["module_dir_base"] == str(base)
    assert doc["initcall_blacklist"] == []


def test_builtin_and_udev_only_rules(
    kernel_tree: KernelTree, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "kmodd: 1\nrules:\n"
        "  - {id: z, action: deny, match: {module: [bsg, dccp]}}\n"
        "  - {id: u, action: deny, match: {module: [usb_storage], source: [udev]}}\n"
    )
    argv = ["--root", str(kernel_tree.root), "cmdline", "--policy", str(policy)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "module_blacklist=dccp\n" in out
    assert "initcall_blacklist=bsg_init\n" in out
    assert "bsg is built in: initcall bsg_init by convention, unverified" in out
    assert "left out, denied for some sources only (1): usb_storage" in out
    assert "grubby --update-kernel=ALL" in out


def test_merged_usr_tree_is_found_and_said(
    trixie_tree: KernelTree, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--root", str(trixie_tree.root), "cmdline", "--policy", str(BASELINE)]
    assert main(argv) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert str(trixie_tree.module_dir) in first
    assert "(no lib/modules: using usr/lib/modules)" in first


def test_help_teaches(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["cmdline", "--help"])
    out = capsys.readouterr().out
    assert "module_blacklist=" in out and "initcall_blacklist=" in out and "2048" in out
