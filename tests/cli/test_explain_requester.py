"""`kmodctl explain` and `validate` show the requester rules and the `unknown_requester`
setting that decides them when the requester is unknown (explain has no requester, as
the daemon without the kernel layer)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kmodd.bpf.detect import detect
from kmodd.cli.main import main
from tests.kerneltree import KernelTree

MODHARDEN = Path(__file__).resolve().parents[2] / "policies/20-modharden.yaml.example"


def _argv(tree: KernelTree) -> list[str]:
    return ["--root", str(tree.root), "--kernel", tree.release]


def test_explain_decides_requester_rules_by_unknown_requester(
    kernel_tree: KernelTree, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [*_argv(kernel_tree), "explain", "net-pf-5", "--policy", str(MODHARDEN)]
    code = main([*argv, "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 1  # requester unknown: the modharden rule denies (fail closed)
    assert (out["rule"], out["verdict"]) == ("modharden", "deny")
    found = out["requester"]
    assert found["rules"] == ["modharden-allow-list", "modharden"]
    assert (found["unknown_requester"], found["unknown_requester_from"]) == ("deny", None)
    assert (found["in_kernel"], found["layer1_only"]) == (True, [])
    assert found["kernel_layer"]["active"] is detect().active
    main(argv)
    text = capsys.readouterr().out
    assert "  requester rules: modharden-allow-list, modharden" in text
    assert "unknown_requester deny (from the default)" in text


def test_the_last_file_that_sets_unknown_requester_wins(
    kernel_tree: KernelTree, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    allow = tmp_path / "90-allow.yaml"
    allow.write_text("kmodd: 1\nunknown_requester: allow\n")
    unit = tmp_path / "30-unit.yaml"
    unit.write_text(
        "kmodd: 1\nrules:\n  - id: udisks\n    action: allow\n"
        "    match: {module: [vfat], requester: {unit: [udisks2.service]}}\n"
    )
    policy = ["--policy", str(MODHARDEN), "--policy", str(unit), "--policy", str(allow)]
    code = main([*_argv(kernel_tree), "explain", "net-pf-5", *policy, "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert (out["rule"], out["verdict"]) == ("modharden", "allow")
    assert out["requester"]["unknown_requester_from"] == str(allow)
    assert out["requester"]["layer1_only"] == ["udisks"]
    files = [str(MODHARDEN), str(unit), str(allow)]
    main([*_argv(kernel_tree), "validate", *files, "--json"])
    assert json.loads(capsys.readouterr().out)["unknown_requester"] == "allow"
    main([*_argv(kernel_tree), "validate", *files])
    assert "unknown_requester allow" in capsys.readouterr().out
