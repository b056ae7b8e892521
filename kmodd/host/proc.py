"""A task as /proc shows it: who asked for a module (docs/attribution.md).

Host facts, read the same way by the daemon (the requester of a kernel autoload) and by
anything else that must know what a pid is.  Every read is bounded (PROC_READ_MAX) and a
task that vanished or is unreadable gives None, never an exception.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kmodd.policy.requester import RequesterFacts

PROC = Path("/proc")
PROC_READ_MAX = 65536  # /proc/PID/status is ~1.5 KB; cgroup a few hundred bytes
_CONTAINER_CGROUP = re.compile(
    r"(docker|libpod|containerd|crio|lxc\.payload|machine\.slice|kubepods)"
)
_UNIT = re.compile(r"[^/]+\.(service|scope|socket|mount|swap|timer|slice)$")
IDENTITY_UID_MAP = ("0", "0", "4294967295")


@dataclass(frozen=True, slots=True)
class Requester:
    """The task that triggered a request, read from /proc while it was blocked."""

    pid: int
    tgid: int
    comm: str
    uid: int  # real
    euid: int
    gid: int
    egid: int
    groups: tuple[int, ...]
    exe: str | None  # None: not readable (the daemon lacks CAP_SYS_PTRACE, kernel thread)
    cgroup: str | None  # the cgroup v2 path ("0::" line), None on a v1-only system
    unit: str | None  # the systemd unit the cgroup path ends in
    userns: bool  # in a user namespace other than the initial one (uid_map not identity)
    pidns: bool  # in a pid namespace below the initial one (NSpid has several entries)
    container: bool  # userns, pidns, or a container manager's cgroup

    @property
    def unprivileged(self) -> bool:
        """The real uid (initial user namespace) is not 0 (see RequesterFacts)."""
        return self.facts().unprivileged

    def facts(self) -> RequesterFacts:
        """What policy rules may test."""
        return RequesterFacts(self.uid, self.euid, self.gid, self.groups, self.unit, self.container)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["groups"] = list(self.groups)
        out["unprivileged"] = self.unprivileged
        return out


def read_bounded(path: Path) -> str | None:
    try:
        with path.open("rb") as f:
            return f.read(PROC_READ_MAX).decode("utf-8", "replace")
    except OSError:
        return None


def _status_fields(text: str) -> dict[str, list[str]]:
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key] = value.split()
    return fields


def _ids(fields: dict[str, list[str]], key: str) -> tuple[int, int]:
    values = fields.get(key) or ["-1", "-1"]
    return int(values[0]), int(values[1] if len(values) > 1 else values[0])


def unit_of(cgroup: str | None) -> str | None:
    """The innermost systemd unit a cgroup path names (`/system.slice/cron.service`)."""
    if not cgroup:
        return None
    for part in reversed(cgroup.strip("/").split("/")):
        if _UNIT.search(part) and not part.endswith(".slice"):
            return part
    last = cgroup.rstrip("/").rsplit("/", 1)[-1]
    return last if last.endswith(".slice") else None


def _cgroup2(text: str | None) -> str | None:
    for line in (text or "").splitlines():
        if line.startswith("0::"):
            return line[3:]
    return None


def _userns(uid_map: str | None) -> bool:
    if uid_map is None:
        return False
    lines = [tuple(line.split()) for line in uid_map.splitlines() if line.strip()]
    return lines != [IDENTITY_UID_MAP]


def read_requester(pid: int, proc: Path = PROC) -> Requester | None:
    """Read task PID from /proc (None if it is gone or unreadable)."""
    base = proc / str(pid)
    status = read_bounded(base / "status")
    if status is None:
        return None
    fields = _status_fields(status)
    try:
        uid, euid = _ids(fields, "Uid")
        gid, egid = _ids(fields, "Gid")
        tgid = int((fields.get("Tgid") or [str(pid)])[0])
        groups = tuple(int(g) for g in fields.get("Groups", []))
    except ValueError:
        return None
    comm = (read_bounded(base / "comm") or " ".join(fields.get("Name", []))).rstrip("\n")
    try:
        exe: str | None = str((base / "exe").readlink())
    except OSError:
        exe = None
    cgroup = _cgroup2(read_bounded(base / "cgroup"))
    userns = _userns(read_bounded(base / "uid_map"))
    pidns = len(fields.get("NSpid", [])) > 1
    in_manager = cgroup is not None and _CONTAINER_CGROUP.search(cgroup) is not None
    return Requester(
        pid=pid,
        tgid=tgid,
        comm=comm,
        uid=uid,
        euid=euid,
        gid=gid,
        egid=egid,
        groups=groups,
        exe=exe,
        cgroup=cgroup,
        unit=unit_of(cgroup),
        userns=userns,
        pidns=pidns,
        container=userns or pidns or in_manager,
    )


def spawned_by_kernel(pid: int, proc: Path = PROC) -> bool:
    """PID's parent is a kernel thread (empty cmdline): a usermode helper the kernel ran.
    Only such a peer has a module_request event to wait for; a helper run by hand (or a
    test client of decide.sock) must not make the decision wait."""
    status = read_bounded(proc / str(pid) / "status")
    if status is None:
        return False
    ppid = (_status_fields(status).get("PPid") or ["0"])[0]
    if ppid in ("0", "1"):  # pid 1 is never the kernel's worker; 0: no parent (pid 1)
        return False
    cmdline = read_bounded(proc / ppid / "cmdline")
    return cmdline == ""
