"""Nothing crashes on any input: random YAML, mutated policies, random request names."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kmodd.errors import InvalidInputError
from kmodd.kmod.model import LoadStep, Resolution, StepKind
from kmodd.policy.engine import CompiledPolicy, Request, compile_policy, decide
from kmodd.policy.loader import load_policy_files, parse_policy
from kmodd.policy.requests import classify
from kmodd.policy.types import Source

VALID = """\
kmodd: 1
mode: enforce
default: allow
rules:
  - id: copy-fail
    action: deny
    match:
      module: [algif_aead, "dccp*"]
      request: ["net-pf-[0-9]"]
      class: [crypto, net_protocol]
      source: [kernel, udev]
    reason: "CVE-2026-31431"
    reference: [CVE-2026-31431]
"""
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.sampled_from(["kmodd", "rules", "match", "module", "deny", "1"]),
)
structures = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.one_of(
                st.text(max_size=8),
                st.sampled_from(
                    [
                        "kmodd",
                        "mode",
                        "default",
                        "rules",
                        "id",
                        "action",
                        "match",
                        "module",
                        "request",
                        "class",
                        "source",
                        "reason",
                        "reference",
                    ]
                ),
            ),
            inner,
            max_size=5,
        )
    ),
    max_leaves=30,
)


def check_bytes(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.yaml"
        path.write_bytes(data)
        try:
            policy = load_policy_files([path])
        except InvalidInputError as err:
            assert err.issues
            for issue in err.issues:
                assert issue.path == str(path)
                assert issue.line >= 0 and issue.column >= 0
                assert str(issue)
            return
        compiled = compile_policy(policy)
        decide(Request("net-pf-5"), Resolution("net-pf-5", (), ()), compiled)


@FUZZ
@given(structures)
def test_random_structures(value: object) -> None:
    check_bytes(yaml.safe_dump({"kmodd": 1, "rules": [value]}).encode())
    check_bytes(yaml.safe_dump(value).encode())


@FUZZ
@given(st.data())
def test_mutated_valid_policy(data: st.DataObject) -> None:
    text = bytearray(VALID.encode())
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "delete", "insert", "dup-line"]))
        at = data.draw(st.integers(0, len(text) - 1))
        if op == "flip":
            text[at] = data.draw(st.integers(0, 255))
        elif op == "delete":
            del text[at : at + data.draw(st.integers(1, 8))]
        elif op == "insert":
            text[at:at] = data.draw(
                st.sampled_from(
                    [b"\t", b":", b"- ", b"&a ", b"*a", b"[", b"}", b"\n  ", b"no", b"!!", b"%"]
                )
            )
        else:
            lines = bytes(text).split(b"\n")
            i = data.draw(st.integers(0, len(lines) - 1))
            lines.insert(i, lines[i])
            text = bytearray(b"\n".join(lines))
        if not text:
            break
    check_bytes(bytes(text))


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes(data: bytes) -> None:
    _model, _doc, issues = parse_policy(data, "x.yaml")
    assert all(i.path == "x.yaml" for i in issues)


@functools.cache
def _valid_policy() -> CompiledPolicy:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.yaml"
        path.write_text(VALID)
        return compile_policy(load_policy_files([path]))


@FUZZ
@given(
    st.text(max_size=80),
    st.sampled_from(list(Source)),
    st.lists(st.text(min_size=1, max_size=10), max_size=4),
)
def test_decide_any_name(name: str, source: Source, modules: list[str]) -> None:
    compiled = _valid_policy()
    steps = tuple(LoadStep(m, StepKind.INSMOD) for m in modules)
    decision = decide(Request(name, source), Resolution(name, tuple(modules), steps), compiled)
    assert decision.rule in {"default", "copy-fail"}
    assert decision.request_class is classify(name)
