"""Hostile policy YAML: random structures, mutations of a valid policy, and resource bombs.

Random input must come out either valid (and then compile and decide) or refused with
every issue located as FILE:LINE:COL.  Bombs (aliases, nesting, huge files) are refused
in a subprocess whose peak RSS is measured (ru_maxrss), so a blow-up cannot take pytest
down with it and the bound is the whole process's, not a guess.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from kmodd.errors import Issue
from kmodd.kmod.model import Resolution
from kmodd.policy.engine import Request, compile_policy, decide
from kmodd.policy.loader import MAX_FILE_BYTES, load_policy_files, parse_policy
from tests.policy.test_fuzz import VALID, structures
from tests.reliability.conftest import Tally, fuzz

pytestmark = pytest.mark.reliability

PATH = "/etc/kmodd/policy.d/10-fuzz.yaml"
# Issues that are about the whole file, not a place in it (documented in docs/policy.md).
WHOLE_FILE = ("file contains NUL bytes", "file is larger than")


def check_located(data: bytes) -> str:
    """'valid' or 'refused'; asserts every issue of a refused file is located."""
    policy, _doc, issues = parse_policy(data, PATH)
    if policy is not None:
        assert not issues
        return "valid"
    assert issues, "refused without a reason"
    for issue in issues:
        assert_located(issue, data)
    return "refused"


def assert_located(issue: Issue, data: bytes) -> None:
    assert issue.path == PATH
    assert str(issue).startswith(f"{PATH}:"), issue
    if issue.message.startswith(WHOLE_FILE):
        return
    assert issue.line >= 1 and issue.column >= 1, issue
    assert issue.line <= data.count(b"\n") + 2, issue
    assert f"{PATH}:{issue.line}:{issue.column}: " in str(issue)


@fuzz(300)
@given(structures)
def test_random_structures_are_valid_or_located(tally: Tally, value: object) -> None:
    outcomes = [
        check_located(yaml.safe_dump({"kmodd": 1, "rules": [value]}).encode()),
        check_located(yaml.safe_dump(value).encode()),
        check_located(yaml.safe_dump({"kmodd": 1, "mode": value, "default": value}).encode()),
    ]
    tally.add("policy.structures", 3, valid=outcomes.count("valid"))


TOKENS = [
    b"\t", b":", b": ", b"- ", b"&a ", b"*a", b"[", b"]", b"{", b"}", b"\n  ", b"no", b"!!",
    b"%", b"!!python/object:os.system ", b"<<: ", b"? ", b"|", b">", b"'", b'"', b"#", b",",
    b"\x00", b"\x01", b"\x85", b"\xef\xbb\xbf", b"\xff", b"\xe2\x80\xa8", b"\r", b"---\n",
    b"...\n", b"%YAML 1.1\n", b"1e400", b"0x", b"~", b"null", b"kmodd: 1\n", b"- id: x\n",
]  # fmt: skip


@fuzz(600)
@given(st.data())
def test_mutated_valid_policy_is_valid_or_located(tally: Tally, data: st.DataObject) -> None:
    text = bytearray(VALID.encode())
    for _ in range(data.draw(st.integers(1, 6))):
        if not text:
            break
        op = data.draw(st.sampled_from(["flip", "delete", "insert", "dup-line", "swap-lines"]))
        at = data.draw(st.integers(0, len(text) - 1))
        if op == "flip":
            text[at] = data.draw(st.integers(0, 255))
        elif op == "delete":
            del text[at : at + data.draw(st.integers(1, 12))]
        elif op == "insert":
            text[at:at] = data.draw(st.sampled_from(TOKENS))
        else:
            lines = bytes(text).split(b"\n")
            i, j = (
                data.draw(st.integers(0, len(lines) - 1)),
                data.draw(st.integers(0, len(lines) - 1)),
            )
            if op == "dup-line":
                lines.insert(i, lines[i])
            else:
                lines[i], lines[j] = lines[j], lines[i]
            text = bytearray(b"\n".join(lines))
    outcome = check_located(bytes(text))
    if outcome == "valid":  # a valid mutant must also load, compile and decide
        compile_and_decide(bytes(text))
    tally.add("policy.mutations", 1, valid=int(outcome == "valid"))


def compile_and_decide(data: bytes) -> None:
    """The loader's full path (file, merge, compile) and one decision."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.yaml"
        path.write_bytes(data)
        compiled = compile_policy(load_policy_files([path]))
    d = decide(Request("net-pf-5"), Resolution("net-pf-5", (), ()), compiled)
    assert d.rule


# --- bombs, each in a subprocess with its peak RSS measured --------------------------------

_CHILD = """
import json, resource, sys, time
from pathlib import Path
from kmodd.errors import InvalidInputError
from kmodd.policy.loader import load_policy_files
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.monotonic()
try:
    load_policy_files([Path(sys.argv[1])])
    outcome, issues = "valid", []
except InvalidInputError as err:
    outcome, issues = "refused", [str(i) for i in err.issues]
print(json.dumps({"outcome": outcome, "issues": issues, "seconds": time.monotonic() - start,
                  "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base}))
"""


def _laughs(levels: int) -> str:
    lines = ["kmodd: 1", "l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels):
        refs = ", ".join([f"*l{i - 1}"] * 10)
        lines.append(f"l{i}: &l{i} [{refs}]")
    return "\n".join(lines) + "\nrules: []\n"


BOMBS: dict[str, tuple[str, bytes]] = {
    "billion-laughs": ("aliases", _laughs(12).encode()),
    "alias-chain": ("aliases", b"a: &a x\n" + b"".join(b"k%d: *a\n" % i for i in range(50_000))),
    "merge-bomb": ("merge keys", b"base: &b {x: 1}\n" + b"m: {<<: *b}\n"),
    "deep-flow": ("nest", b"kmodd: 1\nrules: " + b"[" * 100_000 + b"]" * 100_000 + b"\n"),
    "deep-block": ("nest", b"kmodd: 1\nrules:\n  " + b"- " * 50_000 + b"x\n"),
    "oversized": ("larger than", b"kmodd: 1\nrules:\n" + b"  - id: r\n" * 3_000_000),
    "huge-scalar": ("", b"kmodd: 1\nx: '" + b"A" * (MAX_FILE_BYTES - 100) + b"'\n"),
    "many-nodes": ("", b"kmodd: 1\nrules: [" + b"0," * (MAX_FILE_BYTES // 2 - 20) + b"0]\n"),
    "many-keys": ("", b"kmodd: 1\n" + b"".join(b"k%d: 1\n" % i for i in range(20_000))),
}
PEAK_KIB_MAX = 200 * 1024  # a 1 MiB file may cost what it costs to parse, not gigabytes
BOMB_TIMEOUT_S = 120.0  # a guard against an unbounded parse, not a timing claim


@pytest.mark.parametrize("bomb", sorted(BOMBS))
def test_bomb_refused_with_bounded_memory(tmp_path: Path, tally: Tally, bomb: str) -> None:
    want, data = BOMBS[bomb]
    path = tmp_path / f"{bomb}.yaml"
    path.write_bytes(data)
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path)],
        capture_output=True,
        text=True,
        timeout=BOMB_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["outcome"] == "refused", out
    assert all(str(path) in issue for issue in out["issues"])
    assert any(want in issue for issue in out["issues"]), out["issues"][:3]
    assert out["peak_kib"] < PEAK_KIB_MAX, out
    tally.add(
        f"policy.bomb.{bomb}",
        1,
        file_bytes=len(data),
        peak_rss_growth_kib=out["peak_kib"],
        parse_s=round(out["seconds"], 3),
        wall_s=round(time.monotonic() - started, 3),
    )
