"""Every shipped policy: valid for kmodd and for the JSON schema editors use, and every
baseline rule denies what it names on the real Debian tree (through `kmodctl explain`)."""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from kmodd.cli.main import main
from kmodd.cli.schema import policy_schema
from kmodd.kmod.context import KmodContext
from kmodd.policy.loader import load_policy_files
from kmodd.policy.model import PolicyFile
from tests.kerneltree import KernelTree

POLICIES = Path(__file__).resolve().parents[2] / "policies"
BASELINE = POLICIES / "10-baseline.yaml"
SHIPPED = sorted(p for p in POLICIES.iterdir() if p.name.endswith((".yaml", ".yaml.example")))


def as_yaml(path: Path, tmp_path: Path) -> Path:
    """Examples are shipped as NAME.yaml.example (not picked up); check them as .yaml."""
    if path.suffix == ".yaml":
        return path
    copy = tmp_path / path.name.removesuffix(".example")
    shutil.copyfile(path, copy)
    return copy


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_policy_is_valid(path: Path, tmp_path: Path) -> None:
    policy = load_policy_files([as_yaml(path, tmp_path)])
    assert policy.rules
    for located in policy.rules:
        assert located.rule.reason, located.rule.id


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_policy_matches_the_json_schema(path: Path) -> None:
    schema = policy_schema()
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(yaml.safe_load(path.read_text()))


def test_schema_rejects_what_kmodd_rejects() -> None:
    validator = jsonschema.Draft7Validator(policy_schema())
    bad = {"kmodd": 1, "rules": [{"id": "x", "action": "block", "match": {"module": ["a"]}}]}
    assert list(validator.iter_errors(bad))
    assert list(validator.iter_errors({"kmodd": 1, "typo": 1}))


def test_every_baseline_rule_has_a_reference() -> None:
    model = PolicyFile.model_validate(yaml.safe_load(BASELINE.read_text()))
    for rule in model.rules:
        assert rule.references, rule.id


def explain_json(
    tree: KernelTree, name: str, capsys: pytest.CaptureFixture[str]
) -> tuple[int, dict[str, Any]]:
    argv = [
        "--root",
        str(tree.root),
        "--kernel",
        tree.release,
        "explain",
        name,
        "--json",
        "--policy",
        str(BASELINE),
    ]
    code = main(argv)
    return code, json.loads(capsys.readouterr().out)


def test_each_baseline_rule_denies_its_modules(
    kernel_tree: KernelTree, capsys: pytest.CaptureFixture[str]
) -> None:
    model = PolicyFile.model_validate(yaml.safe_load(BASELINE.read_text()))
    with KmodContext(kernel_tree.root, kernel_tree.release, config_paths=[]) as ctx:
        names = ctx.module_names()
    for rule in model.rules:
        patterns = [p.replace("-", "_") for p in rule.match.module or []]
        present = sorted({n for n in names for p in patterns if fnmatch.fnmatchcase(n, p)})
        assert present, f"rule {rule.id} names no module of the tree"
        for module in present:
            code, out = explain_json(kernel_tree, module, capsys)
            assert (code, out["verdict"]) == (1, "deny"), module
            # the module itself is denied by this rule (the request may name a denied
            # dependency first: dccp_diag needs dccp)
            trace = {t["module"]: (t["verdict"], t["rule"]) for t in out["trace"]}
            assert trace[module] == ("deny", rule.id), module


def test_net_pf_5_is_denied_with_its_load_set(
    kernel_tree: KernelTree, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = explain_json(kernel_tree, "net-pf-5", capsys)
    assert code == 1
    assert out["verdict"] == "deny"
    assert out["rule"] == "legacy-net-protocols"
    assert out["modules"] == ["appletalk"]
    assert out["load_set"] == ["llc", "psnap", "appletalk"]
    assert "appletalk" in str(out["reason"])
