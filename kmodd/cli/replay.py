"""What `kmodctl simulate` replays and finds: decisions grouped by what the candidate
policy is asked (Key), counted per recording host, and the groups whose outcome changes."""

from __future__ import annotations

from dataclasses import dataclass, field

from kmodd.policy import engine
from kmodd.policy.requester import RequesterFacts
from kmodd.policy.types import Outcome, Source


@dataclass(frozen=True, slots=True, order=True)
class Host:
    """A recording host, as its own journald named it (_HOSTNAME, _MACHINE_ID)."""

    hostname: str  # "" when the record had none
    machine_id: str

    def label(self) -> str:
        name = self.hostname or "(no hostname)"
        return f"{name} ({self.machine_id or 'no machine id'})"


@dataclass(frozen=True, slots=True)
class Key:
    request: str
    source: Source
    requester: RequesterFacts | None
    before: Outcome  # the recorded outcome
    rule: str  # the recorded rule


@dataclass
class Group:
    count: int = 0
    first_us: int = 0
    last_us: int = 0
    comms: set[str] = field(default_factory=set)
    hosts: dict[Host, int] = field(default_factory=dict)  # decisions per recording host


@dataclass(frozen=True, slots=True)
class Change:
    key: Key
    group: Group
    after: Outcome
    decision: engine.Decision


@dataclass
class Replay:
    decisions: int = 0
    groups: dict[Key, Group] = field(default_factory=dict)
    overflow: int = 0  # decisions not grouped (DISTINCT_MAX reached)
    hosts: dict[Host, int] = field(default_factory=dict)  # every host seen, its decisions
