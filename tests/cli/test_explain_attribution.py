"""`kmodctl explain` says what requester attribution this kernel offers and which rules
depend on it (they never match in explain, which has no requester)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kmodd.cli.main import main
from kmodd.host.tracefs import probe
from tests.kerneltree import KernelTree

MODHARDEN = Path(__file__).resolve().parents[2] / "policies/20-modharden.yaml.example"


def test_explain_shows_attribution_and_requester_rules(
    kernel_tree: KernelTree, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--root", str(kernel_tree.root), "--kernel", kernel_tree.release, "explain"]
    code = main([*argv, "net-pf-5", "--policy", str(MODHARDEN), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0  # no requester: the MODHARDEN rules do not match
    assert out["rule"] == "default"
    here = probe()
    assert out["attribution"]["requester_rules"] == ["modharden-allow-list", "modharden"]
    assert out["attribution"]["tracefs"] == here.tracefs
    assert out["attribution"]["event"] is here.event
    main([*argv, "net-pf-5", "--policy", str(MODHARDEN)])
    text = capsys.readouterr().out
    assert "  attribution on this kernel: " in text
    assert "requester rules (modharden-allow-list, modharden) do not match here" in text
