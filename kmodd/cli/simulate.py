"""`kmodctl simulate --since TIME [POLICY…]`: replay recorded decisions against a
candidate policy and list every outcome that would change.  With --directory DIR (journal
files collected from many hosts) the changes are also split per host (kmodd.cli.fleet).

Each recorded decision (journal, see kmodd.cli.recorded) is decided again, offline, with
the candidate policy (POLICY files/dirs, or the policy dirs under --root) and libkmod on
--root/--kernel, with the requester facts the record carries.  Outcomes are compared as
`kmodctl status` counts them: allow, deny (blocked) or would_deny (a deny that a
permissive or learning mode let through).  Identical decisions (same request, source,
requester facts and old outcome) are grouped and counted.

Exit 0 when no outcome changes, 1 when some would (like diff): a CI job can gate a
policy change on it.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from kmodd.cli import fleet
from kmodd.cli.common import paths_from_args, print_json, wants_json
from kmodd.cli.recorded import JournalQuery, Recorded, read_decisions
from kmodd.cli.replay import Change, Group, Host, Key, Replay
from kmodd.cli.validate import load_for
from kmodd.errors import KmoddError
from kmodd.kmod.context import KmodContext
from kmodd.policy import engine
from kmodd.policy.requester import RequesterFacts
from kmodd.policy.types import Mode, Outcome, Source

DISTINCT_MAX = 100_000  # groups kept; names are attacker-chosen, the rest is counted
HOSTS_MAX = 20_000  # hosts told apart (a fleet's collector); more are counted, not named


class SimulateUsageError(KmoddError):
    """simulate was given no window: neither --since nor a collected --directory."""


Decider = Callable[[str, Source, RequesterFacts | None], engine.Decision]


def group(records: Iterable[Recorded]) -> Replay:
    replay = Replay()
    for rec in records:
        replay.decisions += 1
        key = Key(rec.request, rec.source, rec.requester, rec.outcome, rec.rule)
        found = replay.groups.get(key)
        if found is None:
            if len(replay.groups) >= DISTINCT_MAX:
                replay.overflow += 1
                continue
            found = replay.groups[key] = Group(first_us=rec.at_us)
        found.count += 1
        found.last_us = max(found.last_us, rec.at_us)
        if rec.comm and len(found.comms) < 8:
            found.comms.add(rec.comm)
        host = Host(rec.hostname, rec.machine_id)
        if host in replay.hosts or len(replay.hosts) < HOSTS_MAX:
            replay.hosts[host] = replay.hosts.get(host, 0) + 1
            found.hosts[host] = found.hosts.get(host, 0) + 1
    return replay


def changes(replay: Replay, decide: Decider, mode: Mode) -> list[Change]:
    out = []
    for key, grp in replay.groups.items():
        d = decide(key.request, key.source, key.requester)
        after = Outcome.of(d.verdict, mode)
        if after != key.before:
            out.append(Change(key, grp, after, d))
    return sorted(out, key=lambda c: (c.key.request, c.key.source, -c.group.count))


def _requester(facts: RequesterFacts | None) -> dict[str, Any] | None:
    if facts is None:
        return None
    return {
        "uid": facts.uid,
        "euid": facts.euid,
        "gid": facts.gid,
        "unit": facts.unit,
        "container": facts.container,
        "unprivileged": facts.unprivileged,
    }


def change_json(c: Change) -> dict[str, Any]:
    return {
        "request": c.key.request,
        "source": c.key.source.value,
        "requester": _requester(c.key.requester),
        "comms": sorted(c.group.comms),
        "count": c.group.count,
        "first_us": c.group.first_us,
        "last_us": c.group.last_us,
        "before": {"outcome": c.key.before, "rule": c.key.rule},
        "after": {"outcome": c.after, "rule": c.decision.rule, "reason": c.decision.reason},
    }


def _who(c: Change) -> str:
    facts = c.key.requester
    if facts is None:
        return "requester unknown" if c.key.source is Source.KERNEL else c.key.source.value
    comms = f" ({', '.join(sorted(c.group.comms))})" if c.group.comms else ""
    return f"uid {facts.uid}{comms}" + (", in a container" if facts.container else "")


def render_text(replay: Replay, found: list[Change], files: tuple[str, ...]) -> str:
    total = sum(c.group.count for c in found)
    lines = [
        f"policy: {', '.join(files) or '(no files)'}",
        f"replayed {replay.decisions} decision(s), {len(replay.groups)} distinct",
    ]
    if replay.overflow:
        lines.append(f"  ({replay.overflow} decision(s) beyond {DISTINCT_MAX} groups skipped)")
    if not found:
        lines.append("no outcome would change")
        return "\n".join(lines) + "\n"
    lines.append(f"{len(found)} would change ({total} decision(s)):")
    for c in found:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(c.group.last_us / 1e6))
        lines.append(
            f"  {c.key.request} [{c.key.source.value}, {_who(c)}] x{c.group.count}, last {when}:"
            f" {c.key.before} (rule {c.key.rule}) -> {c.after} (rule {c.decision.rule})"
        )
    return "\n".join(lines) + "\n"


def make_decider(ctx: KmodContext, compiled: engine.CompiledPolicy) -> Decider:
    def decide(name: str, source: Source, facts: RequesterFacts | None) -> engine.Decision:
        return engine.decide(engine.Request(name, source, facts), ctx.resolve(name), compiled)

    return decide


def run(args: argparse.Namespace) -> int:
    if not args.since and not args.journal_directory:
        raise SimulateUsageError(
            "simulate needs --since TIME", hint="or --directory DIR (a fleet's collected journal)"
        )
    policy = load_for(args, args.policies)
    compiled = engine.compile_policy(policy)
    query = JournalQuery(args.since, args.until, args.journal_namespace, args.journal_directory)
    replay = group(read_decisions(query))
    with KmodContext.from_paths(paths_from_args(args)) as ctx:
        found = changes(replay, make_decider(ctx, compiled), compiled.mode)
    reports = fleet.per_host(replay, found)
    if wants_json(args):
        print_json(
            {
                "policy": {"files": list(compiled.files), "mode": compiled.mode.value},
                "since": args.since,
                "directory": args.journal_directory,
                "decisions": replay.decisions,
                "distinct": len(replay.groups),
                "changes": [change_json(c) for c in found],
                "summary": fleet.summary(reports, found),
                "hosts": [fleet.host_json(r) for r in reports],
            }
        )
    else:
        sys.stdout.write(render_text(replay, found, compiled.files))
        if args.journal_directory:
            sys.stdout.write(fleet.render_text(reports, found))
    return 1 if found else 0
