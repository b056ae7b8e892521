"""Who asked, as the policy sees it: requester facts and the compiled `match: requester:`
key.  Pure and stdlib-only (the decision hot path and kmodctl import it).

Only the kernel layer knows the facts (its BPF program takes them in-kernel, in the
requesting task's context); the daemon journals them as KMODD_REQUESTER_* fields
(kmodd.contract.journal owns those) and `kmodctl simulate` reads them back.  A kernel
request whose requester is unknown has no facts (None): a rule with a `requester` key
then decides with the policy's `unknown_requester` verdict (kmodd.policy.engine).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass

GROUPS_MAX = 64  # supplementary groups kept (journal field and facts)


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

    @property
    def in_kernel(self) -> bool:
        """Only keys the BPF program can test exactly (functions of the real uid).  gid
        means supplementary groups too, unit a cgroup's systemd unit name (cgroup ids
        are not stable names), container pid namespaces and container cgroups: the kernel
        layer sees none of those (docs/attribution.md), they stay layer 1 only."""
        return self.gids is None and self.units is None and self.container is None

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
