"""`kmodctl validate [PATH…]`: every problem as FILE:LINE:COL, exit 0 valid / 1 invalid.

A valid policy is then checked for enforcement on the module tree of --root/--kernel:
every deny rule that no layer can fully enforce (a built-in, a requester rule, ...) is a
`FILE:LINE:COL: warning: …` with the remedy as hint; exit stays 0 unless --strict."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from kmodd.cli.common import paths_from_args, policy_paths_only, print_json, wants_json
from kmodd.errors import InvalidInputError, Issue, KmoddError
from kmodd.policy.loader import SUFFIX, load_policy, load_policy_files
from kmodd.policy.model import PolicySet

if TYPE_CHECKING:
    from kmodd.cli.enforcement import Coverage


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


def _coverage(args: argparse.Namespace, policy: PolicySet) -> Coverage:
    """Which layers enforce each deny rule, on the module tree of --root/--kernel."""
    from kmodd.cli import enforcement  # noqa: PLC0415 -- libkmod only once the policy is valid
    from kmodd.policy.engine import compile_policy  # noqa: PLC0415

    try:
        paths = paths_from_args(args)
    except KmoddError as err:
        return enforcement.Coverage(unavailable=err.message)
    return enforcement.compute(paths, compile_policy(policy))


def _strict_exit(args: argparse.Namespace, coverage: Coverage, warned: int) -> int:
    return 1 if args.strict and (warned or coverage.unavailable) else 0


def run(args: argparse.Namespace) -> int:
    from kmodd.cli import enforcement  # noqa: PLC0415

    try:
        policy = load_for(args, args.paths)
    except InvalidInputError as err:
        if not wants_json(args):
            raise
        print_json({"valid": False, "issues": [_issue_json(i) for i in err.issues]})
        return 1
    coverage = _coverage(args, policy)
    warned = enforcement.warnings(policy, coverage)
    if wants_json(args):
        print_json(
            {
                "valid": True,
                "hash": policy.hash,
                "mode": str(policy.mode),
                "default": str(policy.default),
                "unknown_requester": str(policy.unknown_requester),
                "files": [f.path for f in policy.files],
                "masked": list(policy.masked),
                "rules": len(policy.rules),
                "warnings": [_issue_json(i) for i in warned],
                "coverage": enforcement.coverage_json(coverage),
            }
        )
        return _strict_exit(args, coverage, len(warned))
    for issue in warned:
        print(issue, file=sys.stderr)
    if coverage.unavailable:
        print(f"kmodctl: enforcement not checked: {coverage.unavailable}", file=sys.stderr)
        print("  hint: name the module tree with --root/--kernel", file=sys.stderr)
    if not policy.files:
        print("no policy files found (the default applies: allow everything)")
        return _strict_exit(args, coverage, len(warned))
    for source in policy.files:
        print(f"ok  {source.path}")
    for path in policy.masked:
        print(f"masked  {path}")
    print(
        f"{len(policy.files)} file(s), {len(policy.rules)} rule(s); mode {policy.mode},"
        f" default {policy.default}, unknown_requester {policy.unknown_requester};"
        f" generation {policy.hash[:12]}"
    )
    if warned:
        print(f"{len(warned)} rule(s) not fully enforced (warnings above)")
    return _strict_exit(args, coverage, len(warned))
