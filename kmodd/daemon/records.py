"""Journal records of the daemon's events (design §5.3; docs/journal.md lists every field)."""

from __future__ import annotations

from collections.abc import Sequence

from kmodd.daemon.events import UdevDevice
from kmodd.daemon.journal import MessageId, Priority, Record
from kmodd.policy.engine import Decision
from kmodd.policy.types import Mode, Verdict

_ALLOW = (MessageId.ALLOW, Priority.INFO, "allowed")
_DENY = (MessageId.DENY, Priority.WARNING, "denied")
_WOULD_DENY = (MessageId.WOULD_DENY, Priority.NOTICE, "would deny (permissive)")


def decision(
    d: Decision, generation: int, device: UdevDevice | None = None, peer_pid: int | None = None
) -> Record:
    """One decision.  KMODD_VERDICT is the policy's verdict; KMODD_MODE says whether it was
    enforced (a permissive deny is logged with the WOULD_DENY id and the load proceeds)."""
    if d.verdict is Verdict.ALLOW:
        message_id, priority, verb = _ALLOW
    elif d.mode is not Mode.ENFORCE:
        message_id, priority, verb = _WOULD_DENY
        verb = f"would deny ({d.mode})"
    else:
        message_id, priority, verb = _DENY
    fields = {
        "KMODD_REQUEST": d.request,
        "KMODD_VERDICT": d.verdict.value,
        "KMODD_RULE": d.rule,
        "KMODD_MODULES": " ".join(d.load_set or d.modules),
        "KMODD_SOURCE": d.source.value,
        "KMODD_MODE": d.mode.value,
        "KMODD_POLICY_GENERATION": str(generation),
        "KMODD_REASON": d.reason,
        "KMODD_CLASS": d.request_class.value,
    }
    if d.module is not None:
        fields["KMODD_MODULE"] = d.module
    shown = d.request
    if device is not None:
        fields["KMODD_DEVPATH"] = device.devpath
        fields["KMODD_SUBSYSTEM"] = device.subsystem
        fields["KMODD_UDEV_ACTION"] = device.action
        shown = f"{device.devpath} ({d.request[:80]})"
    if peer_pid is not None:
        fields["KMODD_PEER_PID"] = str(peer_pid)
    return Record(message_id, priority, f"{verb} {shown}: {d.reason}", fields)


def reload_ok(generation: int, content_hash: str, cause: str, mode: Mode, files: int) -> Record:
    return Record(
        MessageId.RELOAD_OK,
        Priority.INFO,
        f"policy generation {generation} active ({mode.value}, {files} file(s), {cause})",
        {
            "KMODD_POLICY_GENERATION": str(generation),
            "KMODD_POLICY_HASH": content_hash,
            "KMODD_RELOAD_CAUSE": cause,
            "KMODD_MODE": mode.value,
        },
    )


def reload_failed(errors: Sequence[str], cause: str, kept: int | None) -> Record:
    kept_text = f"keeping generation {kept}" if kept is not None else "no generation active"
    return Record(
        MessageId.RELOAD_FAILED,
        Priority.ERR,
        f"reload failed ({cause}), {kept_text}:\n" + "\n".join(errors),
        {
            "KMODD_ERRORS": "\n".join(errors),
            "KMODD_RELOAD_CAUSE": cause,
            "KMODD_POLICY_GENERATION": "" if kept is None else str(kept),
        },
    )


def conflict(text: str, kind: str, module: str, generation: int) -> Record:
    return Record(
        MessageId.CONFLICT,
        Priority.WARNING,
        text,
        {
            "KMODD_CONFLICT": kind,
            "KMODD_MODULE": module,
            "KMODD_POLICY_GENERATION": str(generation),
        },
    )


def fallback(text: str) -> Record:
    return Record(MessageId.FALLBACK, Priority.WARNING, text, {})


def tamper(expected: str, current: str | None, reasserted: bool) -> Record:
    action = "re-asserted" if reasserted else "left alone"
    return Record(
        MessageId.TAMPER,
        Priority.ERR,
        f"kernel.modprobe is {current!r}, not the kmodd helper {expected} ({action})",
        {"KMODD_EXPECTED": expected, "KMODD_CURRENT": current or ""},
    )


def refused(socket_kind: str, pid: int, uid: int, what: str) -> Record:
    return Record(
        MessageId.REFUSED,
        Priority.WARNING,
        f"refused {socket_kind} peer pid {pid} uid {uid}: {what}",
        {"KMODD_SOCKET": socket_kind, "KMODD_PEER_PID": str(pid), "KMODD_PEER_UID": str(uid)},
    )


def lifecycle(start: bool, text: str) -> Record:
    return Record(MessageId.START if start else MessageId.STOP, Priority.NOTICE, text, {})


def notice(text: str, priority: Priority = Priority.NOTICE) -> Record:
    return Record(MessageId.NOTICE, priority, text, {})
