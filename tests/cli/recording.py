"""Write decision records into a test journald the way the daemon does: real engine
Decisions, kmodd.daemon.records.decision, the daemon's JournalSink and journal sender.

`python -m tests.cli.recording SPEC.json` runs inside `Journald.wrap` (so libsystemd talks
to the namespaced instance); SPEC is a list of Entry dicts.  The engine decides each entry
against a one-rule policy over a hand-made resolution, so verdict and rule are the
engine's own, not typed in.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from kmodd.contract.journal import KernelRequester, Record, requester_fields
from kmodd.daemon import records
from kmodd.daemon.journal import JournalSink, journal_sender
from kmodd.kmod.model import LoadStep, Resolution, StepKind
from kmodd.policy import engine
from kmodd.policy.engine import CompiledRule, RuleInfo
from kmodd.policy.requester import RequesterFacts
from kmodd.policy.types import Mode, Source, Verdict
from tests.journald import Journald

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Entry:
    request: str
    modules: list[str]  # the load set, in order; the last one is "the" module
    deny: bool = False  # decided by a deny rule on the last module, else by the default
    mode: str = "enforce"
    source: str = "kernel"
    uid: int | None = None  # None: requester unknown
    comm: str = "python3"
    container: bool = False


def _policy(entry: Entry) -> engine.CompiledPolicy:
    rule = CompiledRule(
        RuleInfo("test-deny", Verdict.DENY, "test rule"),
        engine.Globs.compile([entry.modules[-1]]),
        None,
        None,
        None,
    )
    return engine.CompiledPolicy((rule,) if entry.deny else (), Mode(entry.mode), Verdict.ALLOW)


def record_of(entry: Entry) -> Record:
    steps = tuple(LoadStep(m, StepKind.INSMOD, f"/x/{m}.ko") for m in entry.modules)
    resolution = Resolution(entry.request, (entry.modules[-1],), steps)
    request = engine.Request(entry.request, Source(entry.source))
    d = engine.decide(request, resolution, _policy(entry))
    rec = records.decision(d, 1)
    if entry.uid is None:
        return rec
    facts = RequesterFacts(entry.uid, entry.uid, entry.uid, container=entry.container)
    who = KernelRequester(facts, 1, 1, entry.comm, None, None, 1, 4026531837)
    extra = requester_fields(who)
    return Record(rec.message_id, rec.priority, rec.message, {**rec.fields, **extra})


def write(jd: Journald, entries: list[Entry], scratch: Path) -> None:
    """Send ENTRIES to JD through the daemon's sink (a separate, wrapped process)."""
    spec = scratch / "entries.json"
    spec.write_text(json.dumps([asdict(e) for e in entries]))
    argv = jd.wrap([sys.executable, "-m", "tests.cli.recording", str(spec)])
    subprocess.run(argv, check=True, cwd=REPO, timeout=60)
    jd.wait_for(lambda r: True, "SYSLOG_IDENTIFIER=kmodd", count=len(entries))


def main() -> None:
    entries = [Entry(**e) for e in json.loads(Path(sys.argv[1]).read_text())]
    sink = JournalSink(journal_sender())
    sink.start()
    for entry in entries:
        sink.emit(record_of(entry))
    assert sink.flush()
    sink.stop()


if __name__ == "__main__":
    main()
