"""decide() against a plain reference written from docs/policy.md, on random policies."""

from __future__ import annotations

import fnmatch
import tempfile
from pathlib import Path

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from kmodd.kmod.model import LoadStep, Resolution, StepKind
from kmodd.policy.engine import Request, compile_policy, decide
from kmodd.policy.loader import load_policy_files
from kmodd.policy.requests import classify
from kmodd.policy.types import Source

NAMES = ["a", "b", "a-b", "a_c", "net-pf-5", "fs-x", "pci:v1"]
GLOBS = [*NAMES, "a*", "*b", "?", "[ab]", "net_pf_*", "*"]
CLASSES = ["other", "net_protocol", "filesystem", "modalias"]

matches = st.fixed_dictionaries(
    {},
    optional={
        "module": st.lists(st.sampled_from(GLOBS), min_size=1, max_size=2),
        "request": st.lists(st.sampled_from(GLOBS), min_size=1, max_size=2),
        "class": st.lists(st.sampled_from(CLASSES), min_size=1, max_size=2),
        "source": st.lists(st.sampled_from([s.value for s in Source]), min_size=1, max_size=2),
    },
).filter(bool)
rules = st.lists(st.tuples(st.sampled_from(["allow", "deny"]), matches), max_size=6)


def norm(name: str) -> str:
    return name.replace("-", "_")


def glob_hit(globs: list[str] | None, name: str) -> bool:
    return globs is None or any(fnmatch.fnmatchcase(norm(name), norm(g)) for g in globs)


def reference(
    policy: dict[str, object], request: str, source: str, modules: list[str], load: list[str]
) -> tuple[str, str]:
    """(verdict, rule) exactly as docs/policy.md words it."""
    rules = policy["rules"]
    assert isinstance(rules, list)
    default = str(policy["default"])

    def applies(rule: dict[str, object]) -> bool:
        match = rule["match"]
        assert isinstance(match, dict)
        return (
            glob_hit(match.get("request"), request)
            and (match.get("class") is None or classify(request) in match["class"])
            and (match.get("source") is None or source in match["source"])
        )

    def first(module: str | None) -> tuple[str, str]:
        for rule in rules:
            match = rule["match"]
            if not applies(rule):
                continue
            if match.get("module") is None or (
                module is not None and glob_hit(match["module"], module)
            ):
                return str(rule["action"]), str(rule["id"])
        return default, "default"

    subjects: list[str | None] = [*dict.fromkeys([*load, *modules])] or [None]
    verdicts = [first(m) for m in subjects]
    denied = [v for v in verdicts if v[0] == "deny"]
    if denied:
        return denied[0]
    return first(modules[0]) if modules else verdicts[0]


@settings(max_examples=300, deadline=None)
@given(
    rules,
    st.sampled_from(["allow", "deny"]),
    st.sampled_from(NAMES),
    st.sampled_from(list(Source)),
    st.tuples(
        st.lists(st.sampled_from(NAMES), max_size=2), st.lists(st.sampled_from(NAMES), max_size=3)
    ),
)
def test_decide_matches_the_reference(
    raw: list[tuple[str, dict[str, list[str]]]],
    default: str,
    request: str,
    source: Source,
    resolved: tuple[list[str], list[str]],
) -> None:
    """RESOLVED: (modules the name resolves to, extra dependencies loaded first)."""
    resolved_modules, deps = resolved
    modules = [norm(m) for m in dict.fromkeys(resolved_modules)]
    load = [norm(d) for d in deps] + modules
    policy = {
        "kmodd": 1,
        "default": default,
        "rules": [{"id": f"r{i}", "action": a, "match": m} for i, (a, m) in enumerate(raw)],
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.yaml"
        path.write_text(yaml.safe_dump(policy))
        compiled = compile_policy(load_policy_files([path]))
    resolution = Resolution(
        request, tuple(modules), tuple(LoadStep(m, StepKind.INSMOD) for m in load)
    )
    decision = decide(Request(request, source), resolution, compiled)
    expected = reference(policy, request, source.value, modules, load)
    assert (decision.verdict.value, decision.rule) == expected
