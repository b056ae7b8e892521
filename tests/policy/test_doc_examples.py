"""Every YAML policy example in the README and docs/policy.md is a valid policy."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kmodd.policy.loader import load_policy_files

REPO = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"```yaml\n(.*?)```", re.DOTALL)


def examples() -> list[tuple[str, str]]:
    found = []
    for doc in ("README.md", "docs/policy.md"):
        for index, block in enumerate(BLOCK.findall((REPO / doc).read_text())):
            found.append((f"{doc}#{index}", block))
    return found


@pytest.mark.parametrize(("where", "text"), examples(), ids=[w for w, _ in examples()])
def test_example_is_valid(where: str, text: str, tmp_path: Path) -> None:
    path = tmp_path / "example.yaml"
    path.write_text(text)
    policy = load_policy_files([path])
    assert policy.rules, where


def test_there_are_examples() -> None:
    assert {w.split("#")[0] for w, _ in examples()} == {"README.md", "docs/policy.md"}
