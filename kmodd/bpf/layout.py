"""The BPF program's map and event layout (kmodd.bpf.c), as ctypes structures, and the
typed values the daemon puts in or reads out.  Pure and stdlib-only: no libbpf here, so
the daemon can build a generation's tables (and tests can check them) without a kernel.

The C side pins every size with a _Static_assert; tests/bpf/test_layout.py reads those
lines and compares them with ctypes.sizeof of the structures below.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from pathlib import Path

NAME_LEN = 56  # MODULE_NAME_LEN on x86_64: request names longer than 55 never reach the hook
COMM_LEN = 16  # TASK_COMM_LEN
CONDS_MAX = 8  # conditions per request name; the verifier unrolls this loop
NO_RULE = 0xFFFFFFFF  # event.rule when no table entry decided
AUDIT_UNSET = 0xFFFFFFFF  # loginuid/sessionid of a task never logged in (AUDIT_UID_UNSET)
USER_NS_INIT_INO = 0xEFFFFFFD  # PROC_USER_INIT_INO: the initial user namespace
UID_MAX = 0xFFFFFFFE  # (uid_t)-1 is "no uid"


class Verdict(IntEnum):
    PASS = 0  # the kernel layer has no verdict: the helper decides
    ALLOW = 1
    DENY = 2


class Action(IntEnum):
    """What the hook did (event.action)."""

    PASSED = 0
    ALLOWED = 1
    DENIED = 2  # returned -EPERM
    WOULD_DENY = 3  # permissive mode: a deny verdict, not enforced


class Kind(IntEnum):
    REQUEST = 1  # lsm/kernel_module_request: request_module() in the requester's context
    READ_FILE = 2  # lsm/kernel_read_file READING_MODULE: finit_module of a file
    LOAD_DATA = 3  # lsm/kernel_load_data LOADING_MODULE: init_module from memory


class Cond(IntFlag):
    UID = 1
    EUID = 2
    GID = 4
    UNPRIVILEGED = 8
    PRIVILEGED = 16
    USERNS = 32
    INIT_USERNS = 64


class Mode(IntEnum):
    ENFORCE = 0
    PERMISSIVE = 1


class Stat(IntEnum):
    """Per-CPU counters (kmodd_stats), summed by the reader."""

    REQUESTS = 0
    DENIED = 1
    WOULD_DENY = 2
    FILES_DENIED = 3
    LOAD_DATA_DENIED = 4
    DROPPED = 5  # events lost because the ring buffer was full (verdicts never are)


_U32 = ctypes.c_uint32
_U64 = ctypes.c_uint64


class ConfigC(ctypes.Structure):
    _fields_ = (("mode", _U32), ("load_data", _U32), ("generation", _U32), ("pad", _U32))


class NameKeyC(ctypes.Structure):
    _fields_ = (("name", ctypes.c_char * NAME_LEN),)


class CondC(ctypes.Structure):
    _fields_ = (
        ("flags", _U32),
        ("verdict", _U32),
        ("rule", _U32),
        ("uid_lo", _U32),
        ("uid_hi", _U32),
        ("euid_lo", _U32),
        ("euid_hi", _U32),
        ("gid_lo", _U32),
        ("gid_hi", _U32),
    )


class NameEntryC(ctypes.Structure):
    _fields_ = (
        ("nconds", _U32),
        ("fallback", _U32),
        ("fallback_rule", _U32),
        ("pad", _U32),
        ("conds", CondC * CONDS_MAX),
    )


class FileKeyC(ctypes.Structure):
    _fields_ = (("dev", _U64), ("ino", _U64))


class FileEntryC(ctypes.Structure):
    _fields_ = (("verdict", _U32), ("rule", _U32))


class EventC(ctypes.Structure):
    _fields_ = (
        ("ktime_ns", _U64),
        ("cgroup_id", _U64),
        ("dev", _U64),
        ("ino", _U64),
        ("kind", _U32),
        ("action", _U32),
        ("verdict", _U32),
        ("rule", _U32),
        ("generation", _U32),
        ("pid", _U32),
        ("tgid", _U32),
        ("uid", _U32),
        ("euid", _U32),
        ("gid", _U32),
        ("loginuid", _U32),
        ("sessionid", _U32),
        ("userns_inum", _U32),
        ("mode", _U32),
        ("comm", ctypes.c_char * COMM_LEN),
        ("name", ctypes.c_char * NAME_LEN),
    )


class LayoutError(ValueError):
    """A table entry the BPF program cannot represent (the daemon's compiler is wrong)."""


# --- what the daemon puts in ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Condition:
    """One requester test and its verdict; None fields are not tested.  Ranges are
    inclusive and in the initial user namespace (kernel kuid values)."""

    verdict: Verdict
    rule: int  # index of the policy rule, echoed in events
    uid: tuple[int, int] | None = None
    euid: tuple[int, int] | None = None
    gid: tuple[int, int] | None = None
    unprivileged: bool | None = None  # True: uid != 0; False: uid == 0
    userns: bool | None = None  # True: non-initial user namespace; False: the initial one

    def encode(self) -> CondC:
        flags, ranges = Cond(0), {}
        for flag, field, value in (
            (Cond.UID, "uid", self.uid),
            (Cond.EUID, "euid", self.euid),
            (Cond.GID, "gid", self.gid),
        ):
            if value is not None:
                lo, hi = value
                if not 0 <= lo <= hi <= UID_MAX:
                    raise LayoutError(f"{field} range {lo}-{hi} outside 0-{UID_MAX}")
                flags |= flag
                ranges[f"{field}_lo"], ranges[f"{field}_hi"] = lo, hi
        if self.unprivileged is not None:
            flags |= Cond.UNPRIVILEGED if self.unprivileged else Cond.PRIVILEGED
        if self.userns is not None:
            flags |= Cond.USERNS if self.userns else Cond.INIT_USERNS
        return CondC(flags=int(flags), verdict=int(self.verdict), rule=self.rule, **ranges)


@dataclass(frozen=True, slots=True)
class NameRules:
    """The in-kernel verdict for one request name ("" = every name not in the table):
    the first matching condition, else the fallback."""

    conditions: tuple[Condition, ...] = ()
    fallback: Verdict = Verdict.PASS
    fallback_rule: int = NO_RULE

    def encode(self) -> NameEntryC:
        if len(self.conditions) > CONDS_MAX:
            raise LayoutError(
                f"{len(self.conditions)} requester conditions for one name; "
                f"the BPF program evaluates at most {CONDS_MAX}"
            )
        entry = NameEntryC(
            nconds=len(self.conditions),
            fallback=int(self.fallback),
            fallback_rule=self.fallback_rule,
        )
        for i, condition in enumerate(self.conditions):
            entry.conds[i] = condition.encode()
        return entry


def encode_name(name: str) -> bytes:
    """The zero-padded hash key of a request name, normalized as kmod looks it up ('-'
    is '_'; the program does the same to the kernel's name before the lookup)."""
    raw = name.encode("utf-8", "surrogateescape")
    if b"\0" in raw or len(raw) >= NAME_LEN:
        raise LayoutError(f"request name {name!r} cannot reach the hook (NUL or >= {NAME_LEN})")
    if b"[" in raw:
        raise LayoutError(f"request name {name!r}: a name with '[' is never looked up by name")
    raw = raw.replace(b"-", b"_")
    return bytes(NameKeyC(raw))


def names_table(rules: dict[str, NameRules]) -> list[tuple[bytes, bytes]]:
    return [(encode_name(name), bytes(entry.encode())) for name, entry in rules.items()]


def kernel_dev(st_dev: int) -> int:
    """stat's st_dev (new_encode_dev) as the kernel's internal dev_t in sb->s_dev
    (MKDEV: major << 20 | minor, include/linux/kdev_t.h)."""
    return (os.major(st_dev) << 20) | os.minor(st_dev)


@dataclass(frozen=True, slots=True)
class FileIdentity:
    """A module file as lsm/kernel_read_file sees it: superblock dev_t and inode."""

    dev: int  # kernel dev_t
    ino: int

    @classmethod
    def of(cls, path: str) -> FileIdentity:
        st = Path(path).stat()
        return cls(kernel_dev(st.st_dev), st.st_ino)


def files_table(denied: Iterable[tuple[FileIdentity, int]]) -> list[tuple[bytes, bytes]]:
    return [
        (bytes(FileKeyC(ident.dev, ident.ino)), bytes(FileEntryC(int(Verdict.DENY), rule)))
        for ident, rule in denied
    ]


def encode_config(mode: Mode, load_data: Verdict, generation: int) -> bytes:
    return bytes(ConfigC(int(mode), int(load_data), generation & 0xFFFFFFFF, 0))


# --- what comes out ------------------------------------------------------------------


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


@dataclass(frozen=True, slots=True)
class KernelEvent:
    """One ring-buffer record: what a hook saw and did, facts taken in-kernel."""

    kind: Kind
    action: Action
    verdict: Verdict
    rule: int | None
    generation: int
    name: str  # request name, or the module file's basename, or "" (init_module)
    pid: int  # thread id (task->pid)
    tgid: int  # process id
    uid: int
    euid: int
    gid: int
    loginuid: int | None
    sessionid: int | None
    userns_inum: int
    cgroup_id: int
    comm: str  # raw task comm; may hold any byte but NUL (escape it when printing)
    mode: Mode
    dev: int
    ino: int
    ktime_ns: int  # CLOCK_BOOTTIME

    @property
    def in_init_userns(self) -> bool:
        return self.userns_inum == USER_NS_INIT_INO

    @classmethod
    def decode(cls, data: bytes) -> KernelEvent:
        if len(data) < ctypes.sizeof(EventC):
            raise LayoutError(f"ring-buffer record of {len(data)} bytes, expected {EVENT_SIZE}")
        ev = EventC.from_buffer_copy(data[: ctypes.sizeof(EventC)])
        return cls(
            kind=Kind(ev.kind),
            action=Action(ev.action),
            verdict=Verdict(ev.verdict),
            rule=None if ev.rule == NO_RULE else ev.rule,
            generation=ev.generation,
            name=_text(ev.name),
            pid=ev.pid,
            tgid=ev.tgid,
            uid=ev.uid,
            euid=ev.euid,
            gid=ev.gid,
            loginuid=None if ev.loginuid == AUDIT_UNSET else ev.loginuid,
            sessionid=None if ev.sessionid == AUDIT_UNSET else ev.sessionid,
            userns_inum=ev.userns_inum,
            cgroup_id=ev.cgroup_id,
            comm=_text(ev.comm),
            mode=Mode(ev.mode),
            dev=ev.dev,
            ino=ev.ino,
            ktime_ns=ev.ktime_ns,
        )


EVENT_SIZE = ctypes.sizeof(EventC)
