"""kmodctl: parser, verb dispatch and the one error wrapper.

Exit codes: 0 ok/allowed, 1 failure/invalid/denied, 2 usage, 130 interrupted.
Start-up stays cheap: only argparse and the verb table are imported here; a verb's
handler module is imported when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Protocol, cast

from kmodd import __version__
from kmodd.cli.verbs import OFFLINE, Verb, VerbSpec
from kmodd.errors import InvalidInputError, KmoddError

# Modules that contribute verbs (each exports VERBS: tuple[VerbSpec, ...]); together with
# OFFLINE they must cover every Verb (tests/cli/test_main.py).
PLUGIN_MODULES = ("kmodd.cli.online", "kmodd.cli.install", "kmodd.cli.learning")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

EPILOG = """\
examples:
  kmodctl validate                       check the policy dirs under /
  kmodctl explain net-pf-5               who may open an AppleTalk socket, and why
  kmodctl explain algif-aead --json      the same, machine-readable
  kmodctl --root /mnt/image explain ext4 evaluate an image or chroot offline
  kmodctl schema > policy.schema.json    JSON Schema for editors
  kmodctl status                         the running daemon's generation and counters

policy dirs (lowest to highest, same basename replaces, symlink to /dev/null masks):
  /usr/lib/kmodd/policy.d  /etc/kmodd/policy.d  /run/kmodd/policy.d

exit codes: 0 ok/allowed, 1 failure/invalid/denied, 2 usage
"""


class _Handler(Protocol):
    def __call__(self, args: argparse.Namespace) -> int: ...


def verb_table(*, plugins: bool = True) -> dict[Verb, VerbSpec]:
    """Every verb, in Verb order: offline ones and plugin ones.

    plugins=False: the offline verbs only (what main() builds when one of them runs)."""
    table = {spec.verb: spec for spec in OFFLINE}
    if not plugins:
        return table
    for name in PLUGIN_MODULES:
        for spec in cast(tuple[VerbSpec, ...], importlib.import_module(name).VERBS):
            table[spec.verb] = spec
    return {verb: table[verb] for verb in Verb}


def _global_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--root",
        metavar="DIR",
        default="/",
        help="read etc/, run/, lib/modules/ and the policy dirs under DIR (default: /)",
    )
    parser.add_argument(
        "--kernel",
        metavar="RELEASE",
        help="kernel release under DIR/lib/modules (default: uname -r, or the only one)",
    )
    parser.add_argument(
        "--runtime-dir",
        metavar="DIR",
        help="daemon socket and snapshot dir (default: /run/kmodd)",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")


def make_parser(*, plugins: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kmodctl",
        description="Inspect and check kmodd kernel-module policy; talk to the kmodd daemon.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"kmodctl {__version__}")
    _global_options(parser)
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for spec in verb_table(plugins=plugins).values():
        verb_parser = sub.add_parser(
            str(spec.verb),
            help=spec.help,
            description=spec.description or spec.help,
            epilog=spec.epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        # Also accepted after the verb; SUPPRESS keeps a global --json from being reset.
        verb_parser.add_argument(
            "--json", action="store_true", default=argparse.SUPPRESS, help="JSON output"
        )
        spec.add_arguments(verb_parser)
        verb_parser.set_defaults(handler=spec.handler)
    return parser


def _resolve(handler: str) -> _Handler:
    module_name, _, function = handler.partition(":")
    return cast(_Handler, getattr(importlib.import_module(module_name), function))


def _report(err: KmoddError) -> None:
    if isinstance(err, InvalidInputError):
        for issue in err.issues:
            print(issue, file=sys.stderr)
        print(f"kmodctl: {err.message}", file=sys.stderr)
        return
    print(f"kmodctl: {err.message}", file=sys.stderr)
    if err.hint:
        print(f"  hint: {err.hint}", file=sys.stderr)


_VALUED_OPTIONS = frozenset({"--root", "--kernel", "--runtime-dir"})
_OFFLINE_VERBS = frozenset(str(spec.verb) for spec in OFFLINE)


def _runs_offline_verb(argv: Sequence[str]) -> bool:
    """True if ARGV names an offline verb: then the plugin modules (daemon client,
    installer: ~25 ms of imports) are not needed to parse it."""
    tokens = iter(argv)
    for token in tokens:
        if token in _VALUED_OPTIONS:
            next(tokens, None)
        elif not token.startswith("-"):
            return token in _OFFLINE_VERBS
    return False


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = make_parser(plugins=not _runs_offline_verb(argv))
    args = parser.parse_args(argv)  # exits 2 on usage errors
    try:
        return _resolve(args.handler)(args)
    except KmoddError as err:
        if args.debug:
            raise
        _report(err)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `kmodctl schema | head`: not an error worth a traceback.
        sys.stderr.close()
        return EXIT_FAILURE
    except Exception as err:
        if args.debug:
            raise
        print(f"kmodctl: internal error: {type(err).__name__}: {err}", file=sys.stderr)
        print("  hint: run again with --debug for a traceback", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
