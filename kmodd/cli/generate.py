"""`kmodctl generate`: a policy that allows what this machine uses, with the reasons.

The idea of USBGuard's `generate-policy`: start from what is there.  Two sources:

- /proc/modules (under --root): every module loaded now;
- the journal: every decision the daemon recorded (best in `mode: learn` or permissive,
  where everything loads and is recorded with its requester) whose module loaded.

Each allowed module is one list item with a comment saying why it is there (loaded now,
and/or requested N times as NAME by uid U (comm) ...); requests that were denied while
recording are listed as comments only (a generated policy never allows what the running
policy blocked).  The text is validated with the policy loader before it is written:
generate never writes a file `kmodctl validate` would reject.
"""

from __future__ import annotations

import argparse
import re
import socket
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from kmodd.cli.recorded import JournalQuery, Recorded, read_decisions
from kmodd.errors import InvalidInputError, KmoddError
from kmodd.policy.loader import parse_policy

MODULE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,55}$")  # MODULE_NAME_LEN 56 with the NUL
COMMENT_MAX = 160  # characters of one item's comment
SHOWN_MAX = 3  # requests / requesters named per comment
RULE_LOADED = "generated-loaded"
RULE_RECORDED = "generated-recorded"


@dataclass
class Seen:
    """What the journal says about one module (or one denied request)."""

    count: int = 0
    requests: Counter[str] = field(default_factory=Counter)
    who: Counter[str] = field(default_factory=Counter)  # "uid 0 (modprobe)", "udev"...
    rules: Counter[str] = field(default_factory=Counter)
    last_us: int = 0

    def add(self, rec: Recorded) -> None:
        self.count += 1
        self.requests[rec.request] += 1
        self.who[_who(rec)] += 1
        self.rules[rec.rule] += 1
        self.last_us = max(self.last_us, rec.at_us)


def _who(rec: Recorded) -> str:
    if rec.requester is None:
        return rec.source.value if rec.source.value != "kernel" else "requester unknown"
    comm = f" ({rec.comm})" if rec.comm else ""
    return f"uid {rec.requester.uid}{comm}"


def _clean(text: str) -> str:
    """Printable ASCII only: journal fields (comm, names) are not ours."""
    return "".join(ch if " " <= ch <= "~" else "?" for ch in text)


def _top(counter: Counter[str]) -> str:
    items = [f"{_clean(k)[:40]}" + (f" x{n}" if n > 1 else "") for k, n in counter.most_common()]
    more = len(items) - SHOWN_MAX
    return ", ".join(items[:SHOWN_MAX]) + (f", +{more} more" if more > 0 else "")


def _when(us: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(us / 1e6)) if us else "?"


def loaded_modules(root: Path) -> list[str]:
    """Module names in ROOT/proc/modules (none if the file is absent: no module support)."""
    try:
        text = (root / "proc/modules").read_text(errors="replace")
    except FileNotFoundError:
        return []
    except OSError as err:
        raise KmoddError(f"{root / 'proc/modules'}: {err.strerror}") from None
    names = (line.split(" ", 1)[0] for line in text.splitlines())
    return sorted({n for n in names if MODULE_NAME.match(n)})


@dataclass
class Collected:
    loaded: list[str]
    allowed: dict[str, Seen] = field(default_factory=dict)  # module -> what loaded it
    denied: dict[str, Seen] = field(default_factory=dict)  # request -> its denials
    decisions: int = 0


def collect(loaded: list[str], records: Iterable[Recorded]) -> Collected:
    found = Collected(loaded)
    for rec in records:
        found.decisions += 1
        if not rec.loaded:
            found.denied.setdefault(rec.request, Seen()).add(rec)
            continue
        for module in rec.modules:
            if MODULE_NAME.match(module):
                found.allowed.setdefault(module.replace("-", "_"), Seen()).add(rec)
    return found


def _item(module: str, loaded: bool, seen: Seen | None) -> str:
    why = ["loaded now"] if loaded else []
    if seen is not None:
        why.append(
            f"requested {seen.count}x as {_top(seen.requests)} by {_top(seen.who)},"
            f" last {_when(seen.last_us)}"
        )
    comment = "; ".join(why)[:COMMENT_MAX]
    return f"        - {module}  # {comment}"


def _rule(rule_id: str, reason: str, items: list[str]) -> list[str]:
    if not items:
        return []
    return [
        f"  - id: {rule_id}",
        "    action: allow",
        f'    reason: "{reason}"',
        "    match:",
        "      module:",
        *items,
    ]


@dataclass(frozen=True, slots=True)
class Header:
    source: str  # what was read, for the header comment
    mode: str
    default: str


def render(found: Collected, header: Header) -> str:
    loaded = set(found.loaded)
    now = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    lines = [
        f"# Generated by `kmodctl generate` on {_clean(socket.gethostname())} at {now}.",
        f"# From: {len(found.loaded)} module(s) in /proc/modules; {header.source}.",
        "# Review it, check it with `kmodctl simulate --since ... THIS-FILE`, then install it",
        "# as /etc/kmodd/policy.d/NN-name.yaml.  Rules are first-match across files in",
        "# basename order: a deny in an earlier file (the baseline) still wins over these.",
        "kmodd: 1",
        f"mode: {header.mode}",
        f"default: {header.default}",
    ]
    in_use = _rule(
        RULE_LOADED,
        "loaded when this policy was generated",
        [_item(m, True, found.allowed.get(m)) for m in sorted(loaded)],
    )
    recorded = _rule(
        RULE_RECORDED,
        "loaded on request while decisions were recorded",
        [_item(m, False, s) for m, s in sorted(found.allowed.items()) if m not in loaded],
    )
    lines += ["rules:", *in_use, *recorded] if in_use or recorded else ["rules: []"]
    if found.denied:
        lines.append("# Denied while recording, so not allowed here:")
        for request, seen in sorted(found.denied.items()):
            lines.append(
                f"#   {_clean(request)[:60]}: denied {seen.count}x by rule {_top(seen.rules)}"
                f" (asked by {_top(seen.who)})"
            )
    return "\n".join(lines) + "\n"


def check(text: str, where: str) -> None:
    """The generated text must be a valid policy file (else it is our bug: say so)."""
    _, _, issues = parse_policy(text.encode(), where)
    if issues:
        raise InvalidInputError(issues, what="the generated policy (a kmodctl bug)")


def run(args: argparse.Namespace) -> int:
    root = Path(args.root)
    loaded = loaded_modules(root)
    if args.no_journal:
        records: Iterable[Recorded] = ()
        source = "journal not read (--no-journal)"
    else:
        query = JournalQuery(args.since, None, args.journal_namespace, args.journal_directory)
        records = read_decisions(query)
        source = f"journal decisions since {args.since or 'the beginning'}"
    found = collect(loaded, records)
    if not args.no_journal:
        source = f"{found.decisions} decision(s) from the journal since {args.since or 'ever'}"
    text = render(found, Header(source, args.mode, args.default))
    check(text, args.output or "<generated>")
    if args.output:
        Path(args.output).write_text(text)
        allowed = len(set(found.loaded) | set(found.allowed))
        print(f"wrote {args.output}: {allowed} module(s) allowed", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
