"""`kmodctl validate` warns, located, for every deny rule no layer fully enforces on the
module tree (coverage from kmodd.policy.coverage); `--strict` makes warnings fail; and
`kmodctl explain` says which layers hold a deny and what its rule leaves open."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kmodd.cli.main import main
from tests.kerneltree import KernelTree

BASELINE = Path(__file__).resolve().parents[2] / "policies/10-baseline.yaml"
POLICY = """\
kmodd: 1
rules:
  - id: kernel-coda
    action: deny
    match: {module: [coda], source: [kernel]}
  - id: builtin-bsg
    action: deny
    match: {module: [bsg]}
  - id: hfs-by-class
    action: deny
    match: {module: [hfs], class: [filesystem]}
"""
WARNING = re.compile(
    r"^(?P<path>[^:]+):(?P<line>\d+):(?P<col>\d+): warning: rule '(?P<rule>[^']+)'"
)


def _policy(tmp_path: Path) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(POLICY)
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_warnings_are_located_and_name_the_remedy(
    kernel_tree: KernelTree, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _policy(tmp_path)
    code, out, err = run(capsys, "--root", str(kernel_tree.root), "validate", str(path))
    assert code == 0
    found = {m["rule"]: m for m in map(WARNING.match, err.splitlines()) if m}
    assert set(found) == {"builtin-bsg", "hfs-by-class"}  # kernel-coda: the helper holds it
    assert (found["builtin-bsg"]["line"], found["builtin-bsg"]["col"]) == ("6", "5")
    assert found["hfs-by-class"]["path"] == str(path)
    bsg = next(ln for ln in err.splitlines() if "builtin-bsg" in ln)
    assert "built into the kernel" in bsg and "initcall_blacklist=bsg_init" in bsg
    assert "2 rule(s) not fully enforced" in out


def test_strict_fails_on_warnings_and_on_no_tree(
    kernel_tree: KernelTree, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _policy(tmp_path)
    root = ["--root", str(kernel_tree.root)]
    assert run(capsys, *root, "validate", "--strict", str(path))[0] == 1
    assert run(capsys, *root, "validate", "--strict", str(BASELINE))[0] == 0
    empty = tmp_path / "empty-root"
    (empty / "lib/modules/6.1.0-none").mkdir(parents=True)
    code, _out, err = run(capsys, "--root", str(empty), "validate", str(BASELINE))
    assert code == 0 and "enforcement not checked" in err
    assert run(capsys, "--root", str(empty), "validate", "--strict", str(BASELINE))[0] == 1


def test_json_carries_warnings_and_coverage(
    kernel_tree: KernelTree, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _policy(tmp_path)
    code, out, _err = run(capsys, "--root", str(kernel_tree.root), "validate", "--json", str(path))
    doc = json.loads(out)
    assert code == 0 and doc["valid"] is True
    assert [w["line"] for w in doc["warnings"]] == [6, 9]
    rules = {r["rule"]: r for r in doc["coverage"]["rules"]}
    coda = rules["kernel-coda"]
    assert coda.pop("kernel") == {
        "holds": True,  # offline: listed in no layer, but it would decide coda's requests
        "requests": True,
        "files": [],  # source kernel only: not rendered, so its file is not refused
        "leaves": ["names outside the tree's table (wildcard modaliases, unknown names) "
                   "pass to the helper"],
    }  # fmt: skip
    assert coda == {"rule": "kernel-coda", "layers": ["helper"],
                    "enforced": True, "gaps": [], "remedy": None}  # fmt: skip
    assert rules["builtin-bsg"]["enforced"] is False
    assert rules["hfs-by-class"]["kernel"]["files"] == []  # class keys: never rendered
    kernel = rules["builtin-bsg"]["kernel"]
    assert kernel["files"] == [] and "built into the kernel: bsg" in kernel["leaves"][-1]


def test_explain_names_the_layers_and_the_gap(
    kernel_tree: KernelTree, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _policy(tmp_path)
    root = ["--root", str(kernel_tree.root)]
    code, out, _ = run(capsys, *root, "explain", "char-major-67-0", "--policy", str(path))
    assert code == 1
    assert "  enforced by: kernel requests (the modprobe helper)\n" in out
    code, out, _ = run(capsys, *root, "explain", "bsg", "--policy", str(path), "--json")
    enforcement = json.loads(out)["enforcement"]
    assert enforcement["layers"] == [] and enforcement["enforced"] is False
    assert enforcement["not_enforced"] == "coverage: bsg is built into the kernel"
    assert "initcall_blacklist=bsg_init" in enforcement["rule"]["remedy"]
    code, out, _ = run(capsys, *root, "explain", "net-pf-5", "--policy", str(path), "--json")
    assert code == 0 and json.loads(out)["enforcement"] is None  # an allow
