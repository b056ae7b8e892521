"""`kmodctl generate` and `kmodctl simulate`: policy from what a machine uses, and replay
of recorded decisions against a candidate policy (stdlib only: the verb table imports
this on every run; the handlers load pydantic and libkmod when they run)."""

from __future__ import annotations

import argparse

from kmodd.cli.verbs import Verb, VerbSpec


def _journal_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--journal-namespace", metavar="NS", help="read this journald namespace's journal"
    )
    parser.add_argument(
        "--journal-directory",
        "--directory",
        dest="journal_directory",
        metavar="DIR",
        help="read journal files from DIR (an export, or a fleet's journal-remote output)",
    )


def _generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--since", metavar="TIME", help="journal window start (journalctl)")
    parser.add_argument(
        "--no-journal", action="store_true", help="only /proc/modules, no recorded decisions"
    )
    parser.add_argument("-o", "--output", metavar="FILE", help="write here (default: stdout)")
    parser.add_argument(
        "--default",
        choices=("deny", "allow"),
        default="deny",
        help="the generated policy's default (default: deny)",
    )
    parser.add_argument(
        "--mode",
        choices=("enforce", "permissive"),
        default="enforce",
        help="the generated policy's mode (default: enforce)",
    )
    _journal_arguments(parser)


def _simulate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "policies",
        nargs="*",
        metavar="POLICY",
        help="candidate policy files or dirs (default: the policy dirs under --root)",
    )
    parser.add_argument(
        "--since",
        metavar="TIME",
        help="replay decisions from TIME (journalctl; optional with --directory: all of it)",
    )
    parser.add_argument("--until", metavar="TIME", help="... up to TIME")
    _journal_arguments(parser)


VERBS: tuple[VerbSpec, ...] = (
    VerbSpec(
        Verb.GENERATE,
        "write a policy allowing what is loaded now and what was recorded, with reasons",
        "kmodd.cli.generate:run",
        _generate_arguments,
        description="Generate a policy from /proc/modules (under --root) and the decisions"
        " kmodd recorded in the journal (best recorded in `mode: learn`).  Every allowed"
        " module carries a comment saying why; requests that were denied are listed as"
        " comments only.  The output always passes `kmodctl validate`.",
        epilog="examples:\n  kmodctl generate > /etc/kmodd/policy.d/50-this-host.yaml\n"
        "  kmodctl generate --since=-7d --default deny -o site.yaml\n"
        "  kmodctl generate --no-journal",
    ),
    VerbSpec(
        Verb.SIMULATE,
        "replay recorded decisions against a candidate policy; list what would change",
        "kmodd.cli.simulate:run",
        _simulate_arguments,
        description="Decide every request recorded in the journal since TIME again, with"
        " the candidate POLICY files (default: the policy dirs under --root) and the"
        " recorded requester, and list each outcome (allow, deny, would_deny) that would"
        " change.  With --directory DIR (journal files collected from many hosts by"
        " systemd-journal-remote) the changes are also listed per host (_HOSTNAME,"
        " _MACHINE_ID) with a summary for the change review.  Exit 0 if none would, 1 if"
        " some would.",
        epilog="examples:\n  kmodctl simulate --since=-7d ./stricter.yaml\n"
        "  kmodctl simulate --since '2026-11-01' /etc/kmodd/policy.d --json\n"
        "  kmodctl simulate --directory /var/log/journal/remote ./candidate.yaml",
    ),
)
