"""`kmodctl simulate --directory DIR`: the what-if of a candidate policy across a fleet.

DIR holds journal files collected the standard way (systemd-journal-upload on each host ->
systemd-journal-remote on a collector).  The replay (kmodd.cli.simulate) decides each
distinct recorded request once; here its changes are split by the host that recorded them
(_HOSTNAME, _MACHINE_ID: trusted fields the host's own journald stamped, which
journal-remote keeps as uploaded) and summed up for a change review: which hosts would
newly deny something they used, which would newly allow something they denied.

Trust: the records counted are the same as on one host (SYSLOG_IDENTIFIER=kmodd, a decision
MESSAGE_ID, _UID=0; kmodd.cli.recorded).  A non-root sender cannot set _UID or _HOSTNAME on
its host, and journal-remote does not rewrite them, so its forgeries stay out.  What DIR
cannot tell is whether the uploader was honest: root on a host, or anyone who can reach a
--listen-http collector, can upload any fields.  Collect over https with client
certificates (journal-remote --trust) so that only enrolled hosts upload (docs/fleet.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from kmodd.cli.replay import Change, Host, Replay
from kmodd.policy.types import Outcome


class Direction(StrEnum):
    """What a change means for the host: the review cares about the first two."""

    DENY = "newly_denied"  # was loaded (allow, would_deny), the candidate blocks it
    ALLOW = "newly_allowed"  # was blocked, the candidate lets it load
    FLAG = "flag_changed"  # still loaded: allow <-> would_deny (a permissive candidate)


def direction(before: Outcome, after: Outcome) -> Direction:
    if before.loaded and not after.loaded:
        return Direction.DENY
    if after.loaded and not before.loaded:
        return Direction.ALLOW
    return Direction.FLAG


@dataclass(frozen=True, slots=True)
class HostChange:
    change: Change
    count: int  # decisions of this group that HOST recorded
    direction: Direction


@dataclass(frozen=True, slots=True)
class HostReport:
    host: Host
    decisions: int  # decisions this host recorded in the window
    changes: tuple[HostChange, ...]

    def of(self, d: Direction) -> tuple[HostChange, ...]:
        return tuple(c for c in self.changes if c.direction is d)


def per_host(replay: Replay, found: list[Change]) -> list[HostReport]:
    """One report per host seen, hosts with a newly denied request first, then by name."""
    split: dict[Host, list[HostChange]] = {h: [] for h in replay.hosts}
    for c in found:
        d = direction(c.key.before, c.after)
        for host, n in c.group.hosts.items():
            split[host].append(HostChange(c, n, d))
    reports = [HostReport(h, replay.hosts[h], tuple(cs)) for h, cs in split.items()]
    return sorted(reports, key=lambda r: (not r.of(Direction.DENY), not r.changes, r.host))


def summary(reports: list[HostReport], found: list[Change]) -> dict[str, Any]:
    out: dict[str, Any] = {"hosts": len(reports)}
    for d in Direction:
        hit = [r for r in reports if r.of(d)]
        changes = [c for c in found if direction(c.key.before, c.after) is d]
        out[d.value] = {
            "hosts": len(hit),
            "requests": sorted({c.key.request for c in changes}),
            "decisions": sum(hc.count for r in hit for hc in r.of(d)),
        }
    out["hosts_unchanged"] = sum(1 for r in reports if not r.changes)
    return out


def host_json(report: HostReport) -> dict[str, Any]:
    def one(hc: HostChange) -> dict[str, Any]:
        c = hc.change
        return {
            "request": c.key.request,
            "source": c.key.source.value,
            "uid": None if c.key.requester is None else c.key.requester.uid,
            "count": hc.count,
            "before": {"outcome": c.key.before, "rule": c.key.rule},
            "after": {"outcome": c.after, "rule": c.decision.rule},
        }

    doc: dict[str, Any] = {
        "hostname": report.host.hostname,
        "machine_id": report.host.machine_id,
        "decisions": report.decisions,
    }
    for d in Direction:
        doc[d.value] = [one(hc) for hc in report.of(d)]
    return doc


def render_text(reports: list[HostReport], found: list[Change]) -> str:
    s = summary(reports, found)
    lines = [f"fleet: {s['hosts']} host(s), {s['hosts_unchanged']} unchanged"]
    for d, what in ((Direction.DENY, "newly denied"), (Direction.ALLOW, "newly allowed")):
        part = s[d.value]
        if part["hosts"]:
            lines.append(
                f"  {what} on {part['hosts']} host(s), {part['decisions']} decision(s):"
                f" {', '.join(part['requests'])}"
            )
    for r in reports:
        if not r.changes:
            continue
        lines.append(f"host {r.host.label()}: {len(r.changes)} change(s), {r.decisions} recorded")
        for hc in r.changes:
            c = hc.change
            uid = "" if c.key.requester is None else f", uid {c.key.requester.uid}"
            lines.append(
                f"  {hc.direction.value}: {c.key.request} [{c.key.source.value}{uid}]"
                f" x{hc.count}: {c.key.before} -> {c.after} (rule {c.decision.rule})"
            )
    return "\n".join(lines) + "\n"
