"""Small helpers shared by kmodctl verbs (stdlib only: imported on every run)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kmodd.paths import Paths, make_paths


def paths_from_args(args: argparse.Namespace) -> Paths:
    """The --root/--kernel/--runtime-dir table for this invocation."""
    return make_paths(args.root, args.kernel, args.runtime_dir)


def policy_paths_only(args: argparse.Namespace) -> Paths:
    """Paths for verbs that read only policy files: no kernel release needed."""
    root = Path(args.root)
    return Paths(root=root, release=args.kernel or "", runtime_dir=Path(args.runtime_dir or "/"))


def wants_json(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "json", False))


def print_json(value: object) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")
