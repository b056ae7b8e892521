"""The decision port: every decision the daemon makes, counts or journals goes through here.

decide.sock (the kernel), udev events, io.kmodd.Decide/Explain and the status document
all ask the Decider of the current generation.  It owns the one decision cache, the
counters and, per cached decision, the prepared decide.sock reply and journal record.

The cache: per generation, per (name, source, requester facts -- None unless the policy
has requester rules), bounded (FIFO, DECISION_CACHE_MAX).  Request names are
attacker-chosen (`mount -t <anything>` asks for fs-<anything>), so names that resolve to
no module are never cached: deciding one again is a failed index lookup and no probe,
and they are what a flood of made-up names is made of (at 16,384 cached entries those
grew the daemon by ~7 MB over make bench's 100,000 decisions).  A real system's working
set is a few hundred names, which a flood therefore never pushes out
(tests/daemon/test_decider.py).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from kmodd.contract.journal import Fields, Record
from kmodd.contract.status import DecisionCounters
from kmodd.daemon import records
from kmodd.daemon.events import UdevDevice
from kmodd.daemon.generation import Generation
from kmodd.daemon.journal import JournalSink
from kmodd.host import sysmodule
from kmodd.host.sysmodule import SYS_MODULE
from kmodd.policy.engine import Decision
from kmodd.policy.requester import RequesterFacts
from kmodd.policy.types import Outcome, Source, Verdict

DECISION_CACHE_MAX = 4096
LAYERED_MAX = 10_000  # (outcome, rule, source, layers) rows: rule ids are the policy's
DEVICES_RECORDED_MAX = 8192  # = core.DEVICES_MAX: a server has a few hundred devices
NO_GENERATION = b"error no policy generation\n"
_Key = tuple[str, Source, RequesterFacts | None]
Layered = tuple[str, str, str, tuple[str, ...]]  # outcome, rule, source, enforcing layers


@dataclass
class Stats:
    verdicts: Counter[Outcome] = field(default_factory=Counter)
    rules: Counter[str] = field(default_factory=Counter)
    sources: Counter[Source] = field(default_factory=Counter)
    invalid_names: int = 0
    no_generation: int = 0  # decide requests answered "error" (the helper fell back)
    layered: Counter[Layered] = field(default_factory=Counter)  # the metrics' rows

    def count(self, d: Decision, enforcement: records.Enforcement | None = None) -> None:
        self.verdicts[d.outcome] += 1
        self.rules[d.rule] += 1
        self.sources[d.source] += 1
        held = () if enforcement is None else tuple(sorted(str(x) for x in enforcement[0]))
        key = (d.outcome.value, d.rule, d.source.value, held)
        if key in self.layered or len(self.layered) < LAYERED_MAX:
            self.layered[key] += 1

    def document(self) -> DecisionCounters:
        return DecisionCounters(
            verdicts={k.value: v for k, v in self.verdicts.items()},
            rules=dict(self.rules),
            sources={k.value: v for k, v in self.sources.items()},
            invalid_names=self.invalid_names,
            no_generation=self.no_generation,
        )


class Answer:
    """One cached decision, its decide.sock reply and (made on first use, then identical
    for every repeat) its journal record as a kernel request."""

    __slots__ = ("_generation", "_record", "decision", "enforcement", "reply")

    def __init__(self, decision: Decision, generation: Generation) -> None:
        self.decision = decision
        verdict = b"allow " if decision.effective is Verdict.ALLOW else b"deny "
        self.reply = verdict + _token(decision.rule) + b"\n"
        self._generation = generation.number
        # Which layers hold it (KMODD_ENFORCED/KMODD_LAYERS): a few set lookups.
        self.enforcement: records.Enforcement = generation.enforcement_of(decision)
        self._record: Record | None = None

    def record(self) -> Record:
        if self._record is None:
            self._record = records.decision(
                self.decision, self._generation, enforcement=self.enforcement
            )
        return self._record


class Decider:
    """Owned by the core thread (libkmod contexts are not thread-safe)."""

    def __init__(self, sink: JournalSink, sys_module: Path = SYS_MODULE) -> None:
        self.sink = sink
        self.sys_module = sys_module  # where "is this module loaded" is read
        self.stats = Stats()
        self.hits = 0  # cache hits / misses since start (tests, benchmarks)
        self.misses = 0
        self.kernel_passed = 0  # helper requests answered "allow kernel" (core.decide_line)
        self._generation: Generation | None = None
        self._cache: dict[_Key, Answer] = {}
        # devpath -> (MODALIAS, its denied modules found loaded) recorded with this
        # generation: at boot kmodd's coldplug scan and udev's replay (`udevadm trigger`)
        # see every device, which gave 19 deny records for 10 devices (issue 14). One
        # record per device per generation, unless what it says changed: a deny followed
        # by an insmod must be followed by "already loaded", never left standing.
        self._recorded: dict[str, tuple[str, tuple[str, ...]]] = {}

    @property
    def generation(self) -> Generation | None:
        return self._generation

    @property
    def cached(self) -> int:
        return len(self._cache)

    def use(self, generation: Generation) -> None:
        """Decide with GENERATION from now on (its cache starts empty, and every device
        may be recorded once more)."""
        self._generation, self._cache, self._recorded = generation, {}, {}

    def forget(self, devpath: str) -> None:
        """The device went away: when it comes back, it is decided and recorded again."""
        self._recorded.pop(devpath, None)

    def answer(
        self, name: str, source: Source, facts: RequesterFacts | None = None
    ) -> Answer | None:
        """The decision on NAME (cached, uncounted); None without a generation."""
        gen = self._generation
        if gen is None:
            return None
        key = (name, source, facts if gen.compiled.uses_requester else None)
        found = self._cache.get(key)
        if found is not None:
            self.hits += 1
            return found
        self.misses += 1
        found = Answer(gen.decide(name, source, key[2]), gen)
        if found.decision.modules:  # see the module docstring: floods resolve to nothing
            if len(self._cache) >= DECISION_CACHE_MAX:
                del self._cache[next(iter(self._cache))]
            self._cache[key] = found
        return found

    def kernel(self, name: bytes, extra: Fields) -> bytes:
        """decide.sock: the reply to NAME (a valid request name), decided without its
        requester (the daemon never knows who asked; EXTRA: why, for the journal),
        counted and journaled."""
        found = self.answer(name.decode("ascii"), Source.KERNEL)
        if found is None:
            self.stats.no_generation += 1
            text = f"no policy generation: helper decides {name.decode()} from its snapshot"
            self.sink.emit(records.fallback(text))
            return NO_GENERATION
        self.stats.count(found.decision, found.enforcement)
        self.sink.emit(records.annotate(found.record(), extra))
        return found.reply

    def logged(
        self,
        name: str,
        source: Source,
        *,
        device: UdevDevice | None = None,
        peer_pid: int | None = None,
        only_denied: bool = False,
    ) -> Decision | None:
        """A udev or cli decision, counted and journaled (ONLY_DENIED: unless it allows); a
        DEVICE recorded with this generation is not recorded again while its record would
        say the same (its MODALIAS, and which of its denied modules are loaded)."""
        found = self.answer(name, source)
        if found is None:
            return None
        d = found.decision
        loaded = self._already_loaded(d) if device is not None else ()
        if device is not None and self._recorded.get(device.devpath) == (name, loaded):
            return d
        if not only_denied or d.verdict is Verdict.DENY:
            if device is not None:
                self._remember(device.devpath, (name, loaded))
            self.stats.count(d, found.enforcement)
            assert self._generation is not None
            record = records.decision(
                d,
                self._generation.number,
                device,
                peer_pid,
                enforcement=found.enforcement,
                loaded=loaded,
            )
            self.sink.emit(record)
        return d

    def _remember(self, devpath: str, said: tuple[str, tuple[str, ...]]) -> None:
        self._recorded.pop(devpath, None)  # re-inserted last: FIFO by recording time
        if len(self._recorded) >= DEVICES_RECORDED_MAX:
            del self._recorded[next(iter(self._recorded))]
        self._recorded[devpath] = said

    def _already_loaded(self, d: Decision) -> tuple[str, ...]:
        """The denied modules of a device's decision that are in the kernel already (the
        initramfs, an insmod): that record must say so, never "denied"."""
        denied = [t.module for t in d.trace if t.module and t.verdict is Verdict.DENY]
        return sysmodule.loaded(denied, self.sys_module) if denied else ()


def _token(rule: str) -> bytes:
    """A rule id as one word of the decide reply (ids are validated, but never trust)."""
    raw = rule.encode("ascii", "replace")[:200]
    return bytes(b if 0x21 <= b <= 0x7E else 0x5F for b in raw) or b"-"
