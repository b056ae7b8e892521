"""`kmodctl validate`: exit 0/1, every problem as FILE:LINE:COL, drop-in dirs under --root."""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmodd.cli.main import main

GOOD = "kmodd: 1\nrules:\n  - {id: a, action: deny, match: {module: [x]}}\n"
BROKEN = """\
kmodd: 1
mode: sometimes
rules:
  - id: a
    action: deny
    match:
      module: no
  - id: a
    action: allow
    match: {}
    extra: 1
"""


def test_valid_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "good.yaml"
    path.write_text(GOOD)
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"ok  {path}" in out
    assert "1 file(s), 1 rule(s)" in out


def test_broken_file_prints_every_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN)
    other = tmp_path / "syntax.yaml"
    other.write_text("kmodd: 1\n\tmode: enforce\n")
    assert main(["validate", str(path), str(other)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"{path}:2:7: mode: Input should be 'enforce', 'permissive' or 'learn'",
        f"{path}:7:15: rules[0].match.module: Input should be a valid list"
        " (hint: write a YAML list: [a, b] or one '- item' per line)",
        f"{path}:8:9: rules[1].id: duplicate rule id 'a'"
        f" (hint: first defined at {path}:4; rule ids are unique across files)",
        f"{path}:10:12: rules[1].match: a match needs at least one of: module, request, class,"
        " source, requester",
        f"{path}:11:5: rules[1].extra: unknown key 'extra'"
        " (hint: check the spelling against `kmodctl schema`)",
        f"{other}:2:1: YAML syntax: found a tab character that violates indentation"
        " (hint: indent with spaces, not tabs)",
        "kmodctl: 6 problem(s) in policy",
    ]


def test_json_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN)
    assert main(["validate", "--json", str(path)]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["valid"] is False
    assert out["issues"][0] == {
        "path": str(path),
        "line": 2,
        "column": 7,
        "message": "mode: Input should be 'enforce', 'permissive' or 'learn'",
        "hint": None,
    }


def test_default_is_the_drop_in_dirs_under_root(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    etc = tmp_path / "etc/kmodd/policy.d"
    etc.mkdir(parents=True)
    (etc / "50-site.yaml").write_text(GOOD)
    masked = tmp_path / "usr/lib/kmodd/policy.d"
    masked.mkdir(parents=True)
    (masked / "10-baseline.yaml").write_text("broken: [")
    (etc / "10-baseline.yaml").symlink_to("/dev/null")
    assert main(["--root", str(tmp_path), "validate", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["files"] == [str(etc / "50-site.yaml")]
    assert out["masked"] == [str(etc / "10-baseline.yaml")]


def test_directories_and_missing_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.yaml").write_text(GOOD)
    (tmp_path / "notes.txt").write_text("ignored")
    assert main(["validate", str(tmp_path)]) == 0
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 1
    assert "no such file or directory" in capsys.readouterr().err


def test_empty_root_is_valid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--root", str(tmp_path), "validate"]) == 0
    assert "no policy files found" in capsys.readouterr().out


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_validate_never_crashes(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.yaml"
        path.write_bytes(b"kmodd: 1\n" + data)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(["validate", str(path)])
    assert code in (0, 1)
    assert "internal error" not in err.getvalue()
