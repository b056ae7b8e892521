"""Journal records of the daemon's events, written from the schema (kmodd.contract.journal:
every MESSAGE_ID, priority and field; docs/journal.md lists them for users)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from kmodd.contract.journal import (
    Field,
    Fields,
    MessageId,
    Priority,
    Record,
    requester_unknown,
)
from kmodd.daemon.events import UdevDevice
from kmodd.policy.coverage import Layer
from kmodd.policy.engine import Decision
from kmodd.policy.types import Mode, Outcome


def _priority(message_id: MessageId) -> Priority:
    assert message_id.priority is not None  # only NOTICE varies; it is never decided here
    return message_id.priority


Enforcement = tuple[frozenset[Layer], str | None]  # Generation.enforcement_of: layers, why not


def decision(
    d: Decision,
    generation: int,
    device: UdevDevice | None = None,
    peer_pid: int | None = None,
    *,
    enforcement: Enforcement | None = None,
    loaded: Sequence[str] = (),
) -> Record:
    """One decision.  KMODD_VERDICT is the policy's verdict; the MESSAGE_ID (and KMODD_MODE)
    say whether it was enforced (a permissive deny is a WOULD_DENY and the load proceeds).

    A deny carries KMODD_ENFORCED/KMODD_LAYERS (ENFORCEMENT: which layers hold it).  A udev
    deny whose denied modules are LOADED already is not called denied: nothing was
    blocked, the module came in earlier (initramfs, insmod), and the record says so."""
    outcome = d.outcome
    message_id = MessageId.for_outcome(outcome)
    verb = {Outcome.ALLOW: "allowed", Outcome.DENY: "denied"}.get(outcome, f"would deny ({d.mode})")
    already = bool(loaded) and outcome is Outcome.DENY
    if already:
        message_id = MessageId.ALREADY_LOADED
        verb = "already loaded"
    fields: Fields = {
        Field.REQUEST: d.request,
        Field.VERDICT: d.verdict.value,
        Field.RULE: d.rule,
        Field.MODULES: " ".join(d.load_set or d.modules),
        Field.SOURCE: d.source.value,
        Field.MODE: d.mode.value,
        Field.GENERATION: str(generation),
        Field.REASON: d.reason,
        Field.CLASS: d.request_class.value,
    }
    if d.module is not None:
        fields[Field.MODULE] = d.module
    shown = d.request
    if device is not None:
        fields[Field.DEVPATH] = device.devpath
        fields[Field.SUBSYSTEM] = device.subsystem
        fields[Field.UDEV_ACTION] = device.action
        shown = f"{device.devpath} ({d.request[:80]})"
    if peer_pid is not None:
        fields[Field.PEER_PID] = str(peer_pid)
    if outcome is not Outcome.ALLOW and enforcement is not None:
        fields.update(_enforced(enforcement, loaded))
    why = d.reason
    if already:  # KMODD_REASON keeps the engine's sentence; MESSAGE must not say "denied"
        why = (
            f"{' '.join(loaded)} was in the kernel before kmodd decided; rule {d.rule}"
            " would refuse it (nothing was blocked)"
        )
    return Record(message_id, _priority(message_id), f"{verb} {shown}: {why}", fields)


def _enforced(enforcement: Enforcement, loaded: Sequence[str]) -> Fields:
    layers, why = enforcement
    if loaded:
        why = f"already loaded: {' '.join(loaded)} (before kmodd decided)"
    return {
        Field.ENFORCED: "yes" if why is None else f"no: {why}",
        Field.LAYERS: " ".join(str(layer) for layer in sorted(layers)),
        **({Field.LOADED: " ".join(loaded)} if loaded else {}),
    }


def unknown_requester(why: str) -> Fields:
    """The fields of a kernel decision the daemon made without knowing who asked."""
    return {**requester_unknown(why), Field.DECIDED_BY: "daemon"}


def annotate(record: Record, extra: Mapping[str, str]) -> Record:
    """RECORD (a cached decision record) with this request's fields EXTRA."""
    if not extra:
        return record
    return Record(record.message_id, record.priority, record.message, {**record.fields, **extra})


def reload_ok(generation: int, content_hash: str, cause: str, mode: Mode, files: int) -> Record:
    return Record(
        MessageId.RELOAD_OK,
        _priority(MessageId.RELOAD_OK),
        f"policy generation {generation} active ({mode.value}, {files} file(s), {cause})",
        {
            Field.GENERATION: str(generation),
            Field.POLICY_HASH: content_hash,
            Field.RELOAD_CAUSE: cause,
            Field.MODE: mode.value,
        },
    )


def reload_failed(errors: Sequence[str], cause: str, kept: int | None) -> Record:
    kept_text = f"keeping generation {kept}" if kept is not None else "no generation active"
    return Record(
        MessageId.RELOAD_FAILED,
        _priority(MessageId.RELOAD_FAILED),
        f"reload failed ({cause}), {kept_text}:\n" + "\n".join(errors),
        {
            Field.ERRORS: "\n".join(errors),
            Field.RELOAD_CAUSE: cause,
            Field.GENERATION: "" if kept is None else str(kept),
        },
    )


def conflict(text: str, kind: str, module: str, generation: int) -> Record:
    return Record(
        MessageId.CONFLICT,
        _priority(MessageId.CONFLICT),
        text,
        {
            Field.CONFLICT: kind,
            Field.MODULE: module,
            Field.GENERATION: str(generation),
        },
    )


def fallback(text: str) -> Record:
    return Record(MessageId.FALLBACK, _priority(MessageId.FALLBACK), text, {})


def tamper(expected: str, current: str | None, reasserted: bool) -> Record:
    action = "re-asserted" if reasserted else "left alone"
    return Record(
        MessageId.TAMPER,
        _priority(MessageId.TAMPER),
        f"kernel.modprobe is {current!r}, not the kmodd helper {expected} ({action})",
        {Field.EXPECTED: expected, Field.CURRENT: current or ""},
    )


def refused(socket_kind: str, pid: int, uid: int, what: str) -> Record:
    return Record(
        MessageId.REFUSED,
        _priority(MessageId.REFUSED),
        f"refused {socket_kind} peer pid {pid} uid {uid}: {what}",
        {Field.SOCKET: socket_kind, Field.PEER_PID: str(pid), Field.PEER_UID: str(uid)},
    )


def lifecycle(start: bool, text: str) -> Record:
    message_id = MessageId.START if start else MessageId.STOP
    return Record(message_id, _priority(message_id), text, {})


def notice(text: str, priority: Priority = Priority.NOTICE) -> Record:
    return Record(MessageId.NOTICE, priority, text, {})
