"""Schema details the loader relies on (strictness, enums, globs)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from kmodd.policy.model import PolicyFile, glob_problem
from kmodd.policy.requests import RequestClass
from kmodd.policy.types import Action, Source


def rule(**match: object) -> dict[str, object]:
    return {"id": "r1", "action": "deny", "match": match}


def test_enums_come_from_strings_inside_a_strict_model() -> None:
    policy = PolicyFile.model_validate(
        {"kmodd": 1, "rules": [rule(module=["x"], source=["udev"], **{"class": ["crypto"]})]}
    )
    (only,) = policy.rules
    assert only.action is Action.DENY
    assert only.match.source == [Source.UDEV]
    assert only.match.class_ == [RequestClass.CRYPTO]


@pytest.mark.parametrize(
    "data",
    [
        {"kmodd": True},
        {"kmodd": 2},
        {"kmodd": "1"},
        {"kmodd": 1, "mode": "learning"},
        {"kmodd": 1, "mode": False},
        {"kmodd": 1, "default": "maybe"},
        {"kmodd": 1, "extra": 1},
        {"kmodd": 1, "rules": [rule()]},
        {"kmodd": 1, "rules": [rule(module=[])]},
        {"kmodd": 1, "rules": [rule(module="x")]},
        {"kmodd": 1, "rules": [rule(module=[False])]},
        {"kmodd": 1, "rules": [rule(module=["a b"])]},
        {"kmodd": 1, "rules": [rule(module=["a/b"])]},
        {"kmodd": 1, "rules": [rule(module=["[ab"])]},
        {"kmodd": 1, "rules": [rule(source=["user"])]},
        {"kmodd": 1, "rules": [{"id": "bad id", "action": "deny", "match": {"module": ["x"]}}]},
        {"kmodd": 1, "rules": [{"id": "x", "action": "deny"}]},
    ],
)
def test_rejected(data: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        PolicyFile.model_validate(data)


def test_models_are_frozen() -> None:
    policy = PolicyFile.model_validate({"kmodd": 1})
    with pytest.raises(ValidationError):
        policy.mode = None


@pytest.mark.parametrize(
    ("pattern", "ok"),
    [
        ("x", True),
        ("dccp_*", True),
        ("[a-z]x", True),
        ("a]", False),
        ("[[a]]", False),
        ("[a", False),
        ("é", False),
        ("a\tb", False),
    ],
)
def test_glob_problem(pattern: str, ok: bool) -> None:
    assert (glob_problem(pattern) is None) is ok
