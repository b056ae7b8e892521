"""Decisions the daemon recorded, read back from the journal (kmodctl generate, simulate).

`journalctl -o json` is the reader: it knows every journal format, --since syntax,
namespaces and directories, and costs no binding.  Only records that can be trusted as
the daemon's are read: SYSLOG_IDENTIFIER=kmodd, a decision MESSAGE_ID and _UID=0 (a
trusted field journald sets from the sender's credentials -- any local user may send a
record claiming SYSLOG_IDENTIFIER=kmodd, none can fake _UID=0).  Output is streamed line
by line and each line is bounded: a journal is large and its text is not ours.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import IO

from kmodd.contract.journal import DECISIONS, IDENTIFIER, Field, requester_facts
from kmodd.errors import KmoddError
from kmodd.policy.requester import RequesterFacts
from kmodd.policy.types import Mode, Outcome, Source, Verdict

LINE_MAX = 65536  # one decision record in JSON is ~1.5 KB
RECORDS_MAX = 5_000_000  # a week of a busy fleet node; stop (and say so) beyond
STDERR_KEPT = 8192  # of journalctl's warnings, for the error message
FIELDS = (  # what is read back (journalctl --output-fields)
    Field.REQUEST,
    Field.VERDICT,
    Field.RULE,
    Field.MODULES,
    Field.SOURCE,
    Field.MODE,
    Field.REQUESTER_UID,
    Field.REQUESTER_EUID,
    Field.REQUESTER_GID,
    Field.REQUESTER_COMM,
    Field.REQUESTER_CONTAINER,
)
# Trusted fields the recording journald stamped; systemd-journal-remote keeps them as the
# uploader sent them, so in a collected directory they name the host (kmodctl simulate).
HOST_FIELDS = ("_HOSTNAME", "_MACHINE_ID")
HOST_MAX = 256  # a hostname is <= 64 bytes, a machine id 32 hex digits
_SOURCES = frozenset(s.value for s in Source)
_VERDICTS = frozenset(v.value for v in Verdict)
_MODES = frozenset(m.value for m in Mode)


class JournalReadError(KmoddError):
    """journalctl is missing or refused the query."""


@dataclass(frozen=True, slots=True)
class JournalQuery:
    since: str | None = None  # anything journalctl --since takes
    until: str | None = None
    namespace: str | None = None  # journalctl --namespace (a journald namespace)
    directory: str | None = None  # journalctl --directory (an exported journal)


@dataclass(frozen=True, slots=True)
class Recorded:
    """One recorded decision."""

    request: str
    source: Source
    verdict: Verdict  # what the policy said
    mode: Mode
    rule: str
    modules: tuple[str, ...]  # the load set at the time
    requester: RequesterFacts | None
    comm: str | None  # the requester's comm, for humans
    at_us: int  # __REALTIME_TIMESTAMP
    hostname: str = ""  # _HOSTNAME of the recording journald ("" if absent)
    machine_id: str = ""  # _MACHINE_ID

    @property
    def outcome(self) -> Outcome:
        return Outcome.of(self.verdict, self.mode)

    @property
    def loaded(self) -> bool:
        return self.outcome.loaded


def journalctl_argv(query: JournalQuery) -> list[str]:
    exe = shutil.which("journalctl")
    if exe is None:
        raise JournalReadError(
            "journalctl not found", hint="install systemd, or pass --no-journal to generate"
        )
    fields = ",".join(("MESSAGE_ID", *HOST_FIELDS, *FIELDS))
    argv = [exe, "-o", "json", "--no-pager", f"--output-fields={fields}"]
    if query.since:
        argv.append(f"--since={query.since}")
    if query.until:
        argv.append(f"--until={query.until}")
    if query.namespace:
        argv.append(f"--namespace={query.namespace}")
    if query.directory:
        argv.append(f"--directory={query.directory}")
    argv += [f"SYSLOG_IDENTIFIER={IDENTIFIER}", "_UID=0"]
    return argv + [f"MESSAGE_ID={m.value}" for m in DECISIONS]


def parse_record(record: Mapping[str, object]) -> Recorded | None:
    """A decision record, or None if it is not one we understand (older, garbled)."""
    source, verdict = record.get(Field.SOURCE), record.get(Field.VERDICT)
    request, mode = record.get(Field.REQUEST), record.get(Field.MODE) or Mode.ENFORCE.value
    if source not in _SOURCES or verdict not in _VERDICTS or not isinstance(request, str):
        return None
    if mode not in _MODES:
        return None
    try:
        at_us = int(str(record.get("__REALTIME_TIMESTAMP", "0")))
    except ValueError:
        at_us = 0
    comm = record.get(Field.REQUESTER_COMM)
    return Recorded(
        request=request,
        source=Source(str(source)),
        verdict=Verdict(str(verdict)),
        mode=Mode(str(mode)),
        rule=str(record.get(Field.RULE) or "?"),
        modules=tuple(str(record.get(Field.MODULES) or "").split()),
        requester=requester_facts(record),
        comm=comm if isinstance(comm, str) and comm else None,
        at_us=at_us,
        hostname=_short(record.get("_HOSTNAME")),
        machine_id=_short(record.get("_MACHINE_ID")),
    )


def _short(value: object) -> str:
    return value[:HOST_MAX] if isinstance(value, str) else ""


def read_decisions(query: JournalQuery) -> Iterator[Recorded]:
    """Every decision record matching QUERY, oldest first (streamed)."""
    argv = journalctl_argv(query)
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    # Drained while stdout is read: a journalctl that warns more than a pipe buffer
    # (64 KiB; e.g. about many corrupt journal files) would otherwise block, and us too.
    stderr = _Drain(proc.stderr)
    stderr.start()
    count, complete = 0, False
    try:
        for raw in proc.stdout:
            if count >= RECORDS_MAX:
                raise JournalReadError(
                    f"more than {RECORDS_MAX} decision records",
                    hint="narrow the window with --since/--until",
                )
            if len(raw) > LINE_MAX:
                continue
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            if isinstance(record, dict) and (found := parse_record(record)) is not None:
                count += 1
                yield found
        complete = True
    finally:
        proc.stdout.close()
        if not complete:  # the caller stopped early (or failed): no verdict on journalctl
            proc.kill()
            proc.wait()
            stderr.join()
    _finish(proc, argv, stderr)


class _Drain(threading.Thread):
    """Reads a pipe to its end, keeping the first STDERR_KEPT bytes."""

    def __init__(self, pipe: IO[bytes]) -> None:
        super().__init__(name="kmodctl-journalctl-stderr", daemon=True)
        self._pipe = pipe
        self.kept = bytearray()

    def run(self) -> None:
        with self._pipe:
            while chunk := os.read(self._pipe.fileno(), 65536):
                if len(self.kept) < STDERR_KEPT:
                    self.kept += chunk[: STDERR_KEPT - len(self.kept)]


def _finish(proc: subprocess.Popen[bytes], argv: list[str], stderr: _Drain) -> None:
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    stderr.join()
    # 1 with "-- No entries --" is not an error; anything on stderr with a failure is.
    text = stderr.kept.decode(errors="replace").strip()[:2000]
    if proc.returncode not in (0, None) and text and "No entries" not in text:
        raise JournalReadError(
            f"journalctl failed ({proc.returncode}): {text}",
            hint=f"the query was: {' '.join(argv[1:])}",
        )
