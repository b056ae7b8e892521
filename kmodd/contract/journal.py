"""The journal schema as data: every record type and every field kmodd writes.

Users filter on these (`journalctl MESSAGE_ID=...`, `KMODD_VERDICT=deny`), `kmodctl
generate/simulate` read them back, and systemd/kmodd.catalog explains them: a value here
never changes, new events get new ids, new facts get new fields.  daemon/records.py writes
records from this table, cli/recorded.py reads them with it, docs/journal.md and the
catalog are checked against it (tests/contract/test_journal_schema.py).

Adding a field is one line in `Field` (see the package docstring for the rest).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum

from kmodd import helper
from kmodd.policy.requester import RequesterFacts
from kmodd.policy.types import Outcome, Source

IDENTIFIER = "kmodd"  # SYSLOG_IDENTIFIER of every daemon record
HELPER_IDENTIFIER = helper.SYSLOG_IDENT  # the helper's syslog lines (no MESSAGE_ID: docs)
REQUESTER_TEXT_MAX = 200  # KMODD_REQUESTER=unknown: WHY


class Priority(IntEnum):
    ERR = 3
    WARNING = 4
    NOTICE = 5
    INFO = 6
    DEBUG = 7


class MessageId(StrEnum):
    """One per record type: (MESSAGE_ID, PRIORITY or None when it varies, the event)."""

    priority: Priority | None
    event: str

    def __new__(cls, value: str, priority: Priority | None, event: str) -> MessageId:
        member = str.__new__(cls, value)
        member._value_ = value
        member.priority = priority
        member.event = event
        return member

    ALLOW = "8bd2e8ad851f41c691d60a6769ff481b", Priority.INFO, "decision: allowed"
    DENY = "3fd47b15f71a497a96fce61bb48c2e03", Priority.WARNING, "decision: denied"
    WOULD_DENY = "9a9705a46d7f4c43be225164cbef514e", Priority.NOTICE, "decision: would deny"
    ALREADY_LOADED = (
        "1a9132d5eeba4de7893bd916082dbcf9",
        Priority.WARNING,
        "decision: denied, but the module was already loaded (nothing was blocked)",
    )
    RELOAD_OK = "e85821c83b0b4d1ea1242595920b38f6", Priority.INFO, "generation activated"
    RELOAD_FAILED = "75f0bddb413247d68fb3ada830a519fa", Priority.ERR, "reload failed"
    CONFLICT = "697fd0b86e9243698e3d137fc76d9920", Priority.WARNING, "modprobe.d conflict"
    FALLBACK = "0413ef2892df42c293ed6b87dbe9063b", Priority.WARNING, "no active generation"
    TAMPER = "6a908a442ccd4ab98a73e91b8ea8091d", Priority.ERR, "kernel.modprobe changed"
    START = "b98b4780cf534ac4bf943b4aa2290c3b", Priority.NOTICE, "daemon starting"
    STOP = "1626f6b5e39b4b398aa0354110b92850", Priority.NOTICE, "daemon stopping"
    REFUSED = "1a6d939937784e3793b6d00de945a7f4", Priority.WARNING, "socket peer refused"
    NOTICE = "b3a56f075e5841ac958992ec21739b68", None, "other notices"

    @classmethod
    def for_outcome(cls, outcome: Outcome) -> MessageId:
        return _BY_OUTCOME[outcome]


_BY_OUTCOME = {
    Outcome.ALLOW: MessageId.ALLOW,
    Outcome.DENY: MessageId.DENY,
    Outcome.WOULD_DENY: MessageId.WOULD_DENY,
}
DECISIONS = (MessageId.ALLOW, MessageId.DENY, MessageId.WOULD_DENY, MessageId.ALREADY_LOADED)
RELOADS = (MessageId.RELOAD_OK, MessageId.RELOAD_FAILED)
ALL_SOURCES = frozenset(Source)
KERNEL = frozenset({Source.KERNEL})
# The requester's fields: on kernel decisions, and on the debug notice of a kernel request
# the BPF program passed to the helper unjudged (daemon/kernel_layer.py).
ASKED = (*DECISIONS, MessageId.NOTICE)


class Field(StrEnum):
    """A journal field: (name, meaning, on which records, from which sources, optional).

    `sources` matters for decision records only (a udev decision has KMODD_DEVPATH, a
    kernel one may have requester fields); `optional` fields may be absent from a record
    of their kind (e.g. the requester was unknown)."""

    meaning: str
    on: tuple[MessageId, ...]
    sources: frozenset[Source]
    optional: bool

    def __new__(
        cls,
        value: str,
        meaning: str,
        on: tuple[MessageId, ...],
        sources: frozenset[Source] = ALL_SOURCES,
        optional: bool = False,
    ) -> Field:
        member = str.__new__(cls, value)
        member._value_ = value
        member.meaning, member.on, member.sources, member.optional = meaning, on, sources, optional
        return member

    # --- decisions (design §5.3)
    REQUEST = "KMODD_REQUEST", "the raw request name", DECISIONS
    VERDICT = "KMODD_VERDICT", "allow or deny: what the policy says", DECISIONS
    RULE = "KMODD_RULE", "the deciding rule's id, or default", DECISIONS
    MODULES = "KMODD_MODULES", "the load set, space-separated, in load order", DECISIONS
    MODULE = "KMODD_MODULE", "the module whose verdict decided", (*DECISIONS, MessageId.CONFLICT)
    SOURCE = "KMODD_SOURCE", "kernel, udev or cli", DECISIONS
    MODE = "KMODD_MODE", "enforce, permissive or learn", (*DECISIONS, MessageId.RELOAD_OK)
    GENERATION = (
        "KMODD_POLICY_GENERATION",
        "the policy generation that decided (or was kept)",
        (*DECISIONS, *RELOADS, MessageId.CONFLICT),
    )
    REASON = "KMODD_REASON", "one human sentence: module, rule, its reason", DECISIONS
    CLASS = "KMODD_CLASS", "the request class (net_protocol, filesystem, ...)", DECISIONS
    DEVPATH = "KMODD_DEVPATH", "the device path", DECISIONS, frozenset({Source.UDEV})
    SUBSYSTEM = "KMODD_SUBSYSTEM", "the device's subsystem", DECISIONS, frozenset({Source.UDEV})
    UDEV_ACTION = "KMODD_UDEV_ACTION", "add or coldplug", DECISIONS, frozenset({Source.UDEV})
    PEER_PID = (
        "KMODD_PEER_PID",
        "the socket peer's pid (io.kmodd.Decide caller, refused peer)",
        (*DECISIONS, MessageId.REFUSED),
        frozenset({Source.CLI}),
    )
    ENFORCED = "KMODD_ENFORCED", "deny decisions: yes, or no: WHY", DECISIONS, ALL_SOURCES, True
    LAYERS = "KMODD_LAYERS", "deny decisions: the enforcing layers", DECISIONS, ALL_SOURCES, True
    LOADED = (
        "KMODD_LOADED",
        "udev denies: the denied modules already loaded (before kmodd decided)",
        DECISIONS,
        frozenset({Source.UDEV}),
        True,
    )
    # --- who asked (kernel requests: the kernel layer's ring buffer; docs/attribution.md)
    DECIDED_BY = (
        "KMODD_DECIDED_BY",
        "kernel (the BPF LSM decided for the exact requester) or daemon",
        DECISIONS,
        KERNEL,
        True,
    )
    OBJECT_PID = (
        "OBJECT_PID",
        "the requesting process (tgid; journald adds OBJECT_*)",
        ASKED,
        KERNEL,
        True,
    )
    REQUESTER_TID = "KMODD_REQUESTER_TID", "the requesting thread", ASKED, KERNEL, True
    REQUESTER_UID = "KMODD_REQUESTER_UID", "its real uid", ASKED, KERNEL, True
    REQUESTER_EUID = "KMODD_REQUESTER_EUID", "its effective uid", ASKED, KERNEL, True
    REQUESTER_GID = "KMODD_REQUESTER_GID", "its real gid", ASKED, KERNEL, True
    REQUESTER_LOGINUID = (
        "KMODD_REQUESTER_LOGINUID",
        "its audit login uid, or unset",
        ASKED,
        KERNEL,
        True,
    )
    REQUESTER_SESSIONID = (
        "KMODD_REQUESTER_SESSIONID",
        "its audit session id, or unset",
        ASKED,
        KERNEL,
        True,
    )
    REQUESTER_COMM = "KMODD_REQUESTER_COMM", "its comm", ASKED, KERNEL, True
    REQUESTER_CGROUP_ID = (
        "KMODD_REQUESTER_CGROUP_ID",
        "its cgroup v2 id (the cgroup directory's inode)",
        ASKED,
        KERNEL,
        True,
    )
    REQUESTER_USERNS = (
        "KMODD_REQUESTER_USERNS",
        "its user namespace inum (4026531837: the initial one)",
        ASKED,
        KERNEL,
        True,
    )
    REQUESTER_CONTAINER = (
        "KMODD_REQUESTER_CONTAINER",
        "yes: a non-initial user namespace; no",
        ASKED,
        KERNEL,
        True,
    )
    REQUESTER = "KMODD_REQUESTER", "unknown: WHY (requester unknown)", DECISIONS, KERNEL, True
    # --- other records
    POLICY_HASH = "KMODD_POLICY_HASH", "the generation's content hash", (MessageId.RELOAD_OK,)
    RELOAD_CAUSE = "KMODD_RELOAD_CAUSE", "start, signal, control or watch: PATHS", RELOADS
    ERRORS = "KMODD_ERRORS", "every problem, one per line", (MessageId.RELOAD_FAILED,)
    CONFLICT = "KMODD_CONFLICT", "install or alias", (MessageId.CONFLICT,)
    EXPECTED = "KMODD_EXPECTED", "the helper path", (MessageId.TAMPER,)
    CURRENT = "KMODD_CURRENT", "what kernel.modprobe holds now", (MessageId.TAMPER,)
    SOCKET = "KMODD_SOCKET", "decide or control", (MessageId.REFUSED,)
    PEER_UID = "KMODD_PEER_UID", "the refused peer's uid", (MessageId.REFUSED,)


_FIELDS = {f.value: f for f in Field}


def lookup_field(name: str) -> Field | None:
    """The schema's Field called NAME (a journal record's key), None for any other."""
    return _FIELDS.get(name)


Fields = dict[str, str]  # keys are Field members (a StrEnum is a str)


@dataclass(frozen=True, slots=True)
class Record:
    """One journal record; the sender adds MESSAGE, MESSAGE_ID, PRIORITY and IDENTIFIER."""

    message_id: MessageId
    priority: Priority
    message: str
    fields: Mapping[str, str] = field(default_factory=dict)  # Field -> value


AUDIT_UNSET = 0xFFFFFFFF  # loginuid/sessionid of a task never logged in


@dataclass(frozen=True, slots=True)
class KernelRequester:
    """The requester as the kernel layer took it in-kernel (kmodd.bpf.layout.KernelEvent)."""

    facts: RequesterFacts
    tgid: int
    tid: int
    comm: str
    loginuid: int | None  # None: unset (never logged in)
    sessionid: int | None
    cgroup_id: int
    userns: int


def _audit(value: int | None) -> str:
    return "unset" if value is None or value == AUDIT_UNSET else str(value)


def requester_fields(who: KernelRequester) -> Fields:
    """OBJECT_PID and the KMODD_REQUESTER_* fields of a decision with a known requester."""
    facts = who.facts
    return {
        Field.OBJECT_PID: str(who.tgid),
        Field.REQUESTER_TID: str(who.tid),
        Field.REQUESTER_UID: str(facts.uid),
        Field.REQUESTER_EUID: str(facts.euid),
        Field.REQUESTER_GID: str(facts.gid),
        Field.REQUESTER_LOGINUID: _audit(who.loginuid),
        Field.REQUESTER_SESSIONID: _audit(who.sessionid),
        Field.REQUESTER_COMM: who.comm,
        Field.REQUESTER_CGROUP_ID: str(who.cgroup_id),
        Field.REQUESTER_USERNS: str(who.userns),
        Field.REQUESTER_CONTAINER: "yes" if facts.container else "no",
    }


def requester_unknown(why: str) -> Fields:
    """The KMODD_REQUESTER field of a kernel decision whose requester is not known."""
    return {Field.REQUESTER: f"unknown: {why}"[:REQUESTER_TEXT_MAX]}


def requester_facts(record: Mapping[str, object]) -> RequesterFacts | None:
    """Facts from a journal record's fields; None when the requester was unknown (or the
    record has no requester, or its fields are not numbers)."""
    try:
        uid = int(str(record[Field.REQUESTER_UID]))
        euid = int(str(record.get(Field.REQUESTER_EUID, uid)))
        gid = int(str(record.get(Field.REQUESTER_GID, -1)))
    except (KeyError, ValueError):
        return None
    container = str(record.get(Field.REQUESTER_CONTAINER, "no")) == "yes"
    return RequesterFacts(uid, euid, gid, container=container)
