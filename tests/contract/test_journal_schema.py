"""The journal schema (kmodd.contract.journal) against what writes it (daemon/records.py),
what reads it back (the requester round trip) and what documents it (docs/journal.md,
systemd/kmodd.catalog): a field or id added in one place and not the others fails here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kmodd.bpf.layout import USER_NS_INIT_INO
from kmodd.contract.journal import (
    AUDIT_UNSET,
    DECISIONS,
    Field,
    KernelRequester,
    MessageId,
    lookup_field,
    requester_facts,
    requester_fields,
)
from kmodd.daemon import records
from kmodd.daemon.events import UdevAction, UdevDevice
from kmodd.policy.engine import Decision
from kmodd.policy.requester import RequesterFacts
from kmodd.policy.requests import RequestClass
from kmodd.policy.types import Mode, Outcome, Source, Verdict

REPO = Path(__file__).resolve().parents[2]
DOCS = (REPO / "docs/journal.md").read_text()
CATALOG = (REPO / "systemd/kmodd.catalog").read_text()
NOBODY = RequesterFacts(uid=65534, euid=65534, gid=65534)
CONTAINED = RequesterFacts(uid=100000, euid=100000, gid=100000, container=True)
NAMES = frozenset(f.value for f in Field)


def test_values_are_unique() -> None:
    assert len({m.value for m in MessageId}) == len(MessageId)
    assert len(NAMES) == len(Field)
    assert all(f.value.startswith("KMODD_") or f is Field.OBJECT_PID for f in Field)


def test_every_message_id_is_in_the_docs_table_with_its_priority() -> None:
    for m in MessageId:
        row = re.search(rf"^\| `{m.value}` \| [^|]+ \| (\S+)[^|]*\|$", DOCS, re.M)
        assert row is not None, f"{m.name} has no row in docs/journal.md"
        expected = "varies" if m.priority is None else str(int(m.priority))
        assert row[1] == expected, m


def test_the_catalog_explains_exactly_the_message_ids() -> None:
    assert set(re.findall(r"^-- ([0-9a-f]{32})$", CATALOG, re.M)) == {m.value for m in MessageId}


def test_every_field_is_documented_and_the_docs_name_no_other() -> None:
    documented = set(re.findall(r"`((?:KMODD_[A-Z_]+)|OBJECT_PID)`", DOCS))
    assert NAMES - documented == set(), "fields missing from docs/journal.md"
    mentioned = set(re.findall(r"\bKMODD_[A-Z][A-Z_]*[A-Z]\b", DOCS))
    assert mentioned - NAMES == set(), "docs/journal.md names fields the schema lacks"


def test_the_catalog_uses_only_schema_fields() -> None:
    used = set(re.findall(r"@([A-Z_]+)@", CATALOG))
    assert used
    assert used - NAMES == set()


def _decision(source: Source, verdict: Verdict, mode: Mode) -> Decision:
    return Decision(
        request="fs-vfat",
        source=source,
        request_class=RequestClass.FILESYSTEM,
        verdict=verdict,
        mode=mode,
        rule="r",
        reason="because",
        modules=("vfat",),
        load_set=("fat", "vfat"),
        trace=(),
        module="vfat",
    )


@pytest.mark.parametrize("source", list(Source))
@pytest.mark.parametrize(
    ("verdict", "mode", "outcome"),
    [
        (Verdict.ALLOW, Mode.ENFORCE, Outcome.ALLOW),
        (Verdict.DENY, Mode.ENFORCE, Outcome.DENY),
        (Verdict.DENY, Mode.PERMISSIVE, Outcome.WOULD_DENY),
        (Verdict.DENY, Mode.LEARN, Outcome.WOULD_DENY),
    ],
)
def test_decision_records_follow_the_schema(
    source: Source, verdict: Verdict, mode: Mode, outcome: Outcome
) -> None:
    d = _decision(source, verdict, mode)
    assert d.outcome is outcome
    device = (
        UdevDevice(UdevAction.ADD, "/devices/x", "usb", "usb:v1") if source is Source.UDEV else None
    )
    peer = 42 if source is Source.CLI else None
    record = records.decision(d, 3, device, peer)
    assert record.message_id is MessageId.for_outcome(outcome)
    assert record.priority == record.message_id.priority
    fields = {lookup_field(k) for k in record.fields}
    assert None not in fields, "a name the schema lacks"
    for f in fields:
        assert f is not None
        assert record.message_id in f.on, f
        assert source in f.sources, f
    required = {
        f for f in Field if record.message_id in f.on and source in f.sources and not f.optional
    }
    assert required - fields == set()


def test_every_decision_field_is_on_every_decision_id() -> None:
    for f in Field:
        on = set(f.on) & set(DECISIONS)
        assert on in (set(), set(DECISIONS)), f


def test_requester_fields_round_trip() -> None:
    who = KernelRequester(NOBODY, 42, 43, "python3", 1000, 3, 7788, USER_NS_INIT_INO)
    record = requester_fields(who)
    assert (record[Field.OBJECT_PID], record[Field.REQUESTER_TID]) == ("42", "43")
    assert record["KMODD_REQUESTER_UID"] == "65534"
    assert record["KMODD_REQUESTER_COMM"] == "python3"
    assert (record[Field.REQUESTER_LOGINUID], record[Field.REQUESTER_SESSIONID]) == ("1000", "3")
    assert (record[Field.REQUESTER_CGROUP_ID], record[Field.REQUESTER_USERNS]) == (
        "7788",
        "4026531837",
    )
    assert requester_facts(record) == NOBODY
    bare = requester_fields(KernelRequester(CONTAINED, 1, 1, "x", None, AUDIT_UNSET, 1, 5))
    assert (bare[Field.REQUESTER_LOGINUID], bare[Field.REQUESTER_SESSIONID]) == ("unset", "unset")
    assert requester_facts(bare) == CONTAINED


@pytest.mark.parametrize(
    "record",
    [{}, {"KMODD_REQUESTER": "unknown: no event"}, {"KMODD_REQUESTER_UID": "root"}],
)
def test_unknown_or_garbled_is_none(record: dict[str, str]) -> None:
    assert requester_facts(record) is None
