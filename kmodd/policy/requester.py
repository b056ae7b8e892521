"""Who asked, as the policy sees it: requester facts, their journal fields, and the
compiled `match: requester:` key.  Pure and stdlib-only (the decision hot path and
kmodctl import it).

The daemon learns the facts from tracefs and /proc (kmodd.daemon.attribution) and writes
them to the journal as KMODD_REQUESTER_* fields; `kmodctl simulate` reads them back from
there.  A request whose requester is unknown has no facts (None): a rule with a
`requester` key never matches it, whatever the key says (docs/policy.md).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

# Journal fields of a decision with a known requester (docs/journal.md).  OBJECT_PID makes
# journald add the requester's OBJECT_COMM, OBJECT_EXE, OBJECT_UID... (trusted fields).
F_PID = "OBJECT_PID"
F_UID = "KMODD_REQUESTER_UID"
F_EUID = "KMODD_REQUESTER_EUID"
F_GID = "KMODD_REQUESTER_GID"
F_GROUPS = "KMODD_REQUESTER_GROUPS"
F_COMM = "KMODD_REQUESTER_COMM"
F_EXE = "KMODD_REQUESTER_EXE"
F_UNIT = "KMODD_REQUESTER_UNIT"
F_CGROUP = "KMODD_REQUESTER_CGROUP"
F_CONTAINER = "KMODD_REQUESTER_CONTAINER"
F_UNKNOWN = "KMODD_REQUESTER"  # "unknown: WHY" when attribution found nobody
GROUPS_MAX = 64


@dataclass(frozen=True, slots=True)
class RequesterFacts:
    """What a rule may test about the requesting task (ids in the initial user namespace)."""

    uid: int
    euid: int
    gid: int
    groups: tuple[int, ...] = ()
    unit: str | None = None  # systemd unit of its cgroup
    container: bool = False  # in a user or pid namespace, or a container manager's cgroup

    @property
    def unprivileged(self) -> bool:
        """The real uid is not 0.  As grsecurity's MODHARDEN: a set-uid-root program run
        by a user counts as that user (mount(8) by a user must not autoload fs-*)."""
        return self.uid != 0


def fields(facts: RequesterFacts, *, pid: int, comm: str, exe: str | None) -> dict[str, str]:
    """The KMODD_REQUESTER_* journal fields (plus OBJECT_PID) of a known requester."""
    out = {
        F_PID: str(pid),
        F_UID: str(facts.uid),
        F_EUID: str(facts.euid),
        F_GID: str(facts.gid),
        F_GROUPS: " ".join(str(g) for g in facts.groups[:GROUPS_MAX]),
        F_COMM: comm,
        F_UNIT: facts.unit or "",
        F_CONTAINER: "yes" if facts.container else "no",
    }
    if exe is not None:
        out[F_EXE] = exe
    return out


def from_fields(record: Mapping[str, object]) -> RequesterFacts | None:
    """Facts from a journal record's fields; None when the requester was unknown (or the
    record predates attribution, or its fields are not numbers)."""
    try:
        uid = int(str(record[F_UID]))
        euid = int(str(record.get(F_EUID, uid)))
        gid = int(str(record.get(F_GID, -1)))
        groups = tuple(int(g) for g in str(record.get(F_GROUPS, "")).split()[:GROUPS_MAX])
    except (KeyError, ValueError):
        return None
    unit = str(record.get(F_UNIT) or "") or None
    container = str(record.get(F_CONTAINER, "no")) == "yes"
    return RequesterFacts(uid, euid, gid, groups, unit, container)


@dataclass(frozen=True, slots=True)
class RequesterMatcher:
    """A compiled `requester:` key: every given item must hold (AND), a list is OR."""

    uids: frozenset[int] | None = None  # real uid
    gids: frozenset[int] | None = None  # real gid or a supplementary group
    unprivileged: bool | None = None
    units: re.Pattern[str] | None = None  # globs on the unit name (case-sensitive)
    container: bool | None = None

    @classmethod
    def compile(
        cls,
        *,
        uid: Iterable[int] | None = None,
        gid: Iterable[int] | None = None,
        unprivileged: bool | None = None,
        unit: Iterable[str] | None = None,
        container: bool | None = None,
    ) -> RequesterMatcher:
        units = None
        if unit is not None:
            units = re.compile("|".join(f"(?:{fnmatch.translate(u)})" for u in unit))
        return cls(
            uids=None if uid is None else frozenset(uid),
            gids=None if gid is None else frozenset(gid),
            unprivileged=unprivileged,
            units=units,
            container=container,
        )

    def matches(self, facts: RequesterFacts | None) -> bool:
        """Unknown requester: never (a rule about who asked cannot apply to nobody)."""
        if facts is None:
            return False
        return (
            (self.uids is None or facts.uid in self.uids)
            and (self.gids is None or not self.gids.isdisjoint((facts.gid, *facts.groups)))
            and (self.unprivileged is None or facts.unprivileged is self.unprivileged)
            and (self.container is None or facts.container is self.container)
            and (self.units is None or _unit_matches(self.units, facts.unit))
        )


def _unit_matches(units: re.Pattern[str], unit: str | None) -> bool:
    return unit is not None and units.match(unit) is not None
