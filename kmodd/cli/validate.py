"""`kmodctl validate [PATH…]`: every problem as FILE:LINE:COL, exit 0 valid / 1 invalid."""

from __future__ import annotations

import argparse
from pathlib import Path

from kmodd.cli.common import policy_paths_only, print_json, wants_json
from kmodd.errors import InvalidInputError, Issue
from kmodd.policy.loader import SUFFIX, load_policy, load_policy_files
from kmodd.policy.model import PolicySet


def expand(paths: list[str]) -> tuple[list[Path], list[Issue]]:
    """Files as given; directories contribute their *.yaml in basename order."""
    files: list[Path] = []
    issues: list[Issue] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if _policy_name(p.name)))
        elif path.exists() or path.is_symlink():
            files.append(path)
        else:
            issues.append(Issue(raw, 0, 0, "no such file or directory"))
    return files, issues


def _policy_name(name: str) -> bool:
    return name.endswith(SUFFIX) and not name.startswith(".")


def load_for(args: argparse.Namespace, paths: list[str] | None) -> PolicySet:
    """The policy of PATHS (files/dirs) or, if none, of the drop-in dirs under --root."""
    if paths:
        files, issues = expand(paths)
        if issues:
            raise InvalidInputError(issues, what="policy")
        return load_policy_files(files)
    return load_policy(policy_paths_only(args))


def _issue_json(issue: Issue) -> dict[str, object]:
    return {
        "path": issue.path,
        "line": issue.line,
        "column": issue.column,
        "message": issue.message,
        "hint": issue.hint,
    }


def run(args: argparse.Namespace) -> int:
    try:
        policy = load_for(args, args.paths)
    except InvalidInputError as err:
        if not wants_json(args):
            raise
        print_json({"valid": False, "issues": [_issue_json(i) for i in err.issues]})
        return 1
    if wants_json(args):
        print_json(
            {
                "valid": True,
                "hash": policy.hash,
                "mode": str(policy.mode),
                "default": str(policy.default),
                "files": [f.path for f in policy.files],
                "masked": list(policy.masked),
                "rules": len(policy.rules),
            }
        )
        return 0
    if not policy.files:
        print("no policy files found (the default applies: allow everything)")
        return 0
    for source in policy.files:
        print(f"ok  {source.path}")
    for path in policy.masked:
        print(f"masked  {path}")
    print(
        f"{len(policy.files)} file(s), {len(policy.rules)} rule(s); mode {policy.mode},"
        f" default {policy.default}; generation {policy.hash[:12]}"
    )
    return 0
