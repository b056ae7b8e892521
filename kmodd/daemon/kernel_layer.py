"""The kernel layer as a daemon edge: load or adopt the pinned BPF programs, fill their
tables from each generation, read the ring buffer on a thread of its own, and turn the
kernel's refusals into journal records with the exact requester.

Threads: the reader thread only posts KernelEvents (a queue put: never blocks, and the
kernel never waits for it -- a full ring drops events, never verdicts).  apply() runs
where the generation is built (the build thread, or the core thread for the first one);
records() runs on the core thread (it decides with the generation's libkmod context).

Lifetime: stop() closes this process's fds; the pins under /sys/fs/bpf/kmodd keep the
programs attached with the last generation's tables (docs/operations.md: stopping the
service does not drop kernel enforcement; `kmodctl uninstall` or `kmodd.mode=permissive`
are the ways out).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from pathlib import Path

from kmodd.bpf.detect import Support, detect
from kmodd.bpf.layer import PIN_DIR, KernelLayer, Tables
from kmodd.bpf.layout import Action, KernelEvent, Kind, Mode, NameRules, Verdict
from kmodd.contract.journal import (
    Field,
    KernelRequester,
    MessageId,
    Priority,
    Record,
    requester_fields,
)
from kmodd.contract.status import LayerState
from kmodd.daemon import records
from kmodd.daemon.events import KernelEvents
from kmodd.daemon.generation import Generation
from kmodd.daemon.kernel_tables import compile_tables
from kmodd.errors import KmoddError
from kmodd.helper import normalize
from kmodd.policy.requester import RequesterFacts
from kmodd.policy.types import Source

POLL_MS = 250  # how long stop() may wait for the reader thread


class KernelEdge:
    """The kernel layer of one daemon: inactive (with the reason) or attached."""

    def __init__(self, support: Support, layer: KernelLayer | None = None) -> None:
        self.support = support
        self._layer = layer
        self._reason = support.reason
        self._rule_ids: tuple[str, ...] = ()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.events = 0  # ring-buffer events read
        self.failed: str | None = None  # the last apply() failure
        self._in_kernel = "no generation applied yet"
        # (generation, names it decides in-kernel): replaced whole by apply() on the build
        # thread, read by the core thread (one reference: never half of each)
        self._domain: tuple[int, frozenset[str]] = (0, frozenset())

    @classmethod
    def start(cls, post: Callable[[KernelEvents], None], pin_dir: Path = PIN_DIR) -> KernelEdge:
        """Detect, then adopt the pinned layer or load it; start the reader thread."""
        support = detect()
        if not support.active:
            return cls(support)
        try:
            layer = KernelLayer.load_or_adopt(pin_dir)
        except KmoddError as err:
            return cls(Support(False, f"cannot load the BPF programs: {err.message}"))
        edge = cls(support, layer)
        how = "adopted from" if layer.adopted else "loaded and pinned under"
        edge._reason = f"{support.reason}; programs {how} {pin_dir}"
        edge._thread = threading.Thread(
            target=edge._read, args=(post,), name="kmodd-kernel-events", daemon=True
        )
        edge._thread.start()
        return edge

    @property
    def active(self) -> bool:
        return self._layer is not None

    def _read(self, post: Callable[[KernelEvents], None]) -> None:
        assert self._layer is not None
        with self._layer.events() as reader:
            while not self._stop.is_set():
                try:
                    batch = reader.read(POLL_MS)
                except KmoddError:
                    self._stop.wait(1.0)  # e.g. EINTR storms; never spin
                    continue
                if batch:
                    self.events += len(batch)
                    post(KernelEvents(tuple(batch)))

    def apply(self, gen: Generation) -> None:
        """Swap in GEN's tables.  On failure, the tables are emptied (no in-kernel
        verdict at all, the helper decides): stale tables could deny what GEN allows."""
        if self._layer is None:
            return
        try:
            compiled = compile_tables(gen)
            self._layer.apply(compiled.tables)
        except (KmoddError, OSError, ValueError) as err:
            self.failed = f"generation {gen.number}: {err}"
            self._domain = (gen.number, frozenset())
            with contextlib.suppress(KmoddError, OSError):
                empty = Tables({"": NameRules()}, (), Mode.PERMISSIVE, Verdict.ALLOW, gen.number)
                self._layer.apply(empty)
            return
        self.failed = None
        self._rule_ids = compiled.rule_ids
        self._in_kernel = compiled.in_kernel
        self._domain = (gen.number, compiled.domain)

    def decided_in_kernel(self, name: str, generation: int) -> bool:
        """The program decided NAME for its exact requester with GENERATION's tables: a
        request of it that reaches the helper was allowed (or would-denied) in-kernel."""
        number, domain = self._domain
        return self._layer is not None and number == generation and normalize(name) in domain

    def unknown_why(self, name: str) -> str:
        """Why the requester of a helper request for NAME is unknown (journal, status)."""
        if self._layer is None:
            return f"kernel layer inactive: {self._reason}"
        if self.failed is not None:
            return f"kernel layer tables emptied: {self.failed}"
        if not self._domain[1]:
            return "a requester rule tests gid, unit or container: not decided in-kernel"
        return f"{name[:60]} has no in-kernel verdict (not an exact name of the module tree)"

    def state(self) -> LayerState:
        if self._layer is None:
            return LayerState(active=False, reason=self._reason)
        if self.failed is not None:
            return LayerState(active=False, reason=f"tables emptied: {self.failed}")
        return LayerState(active=True, reason=f"{self._reason}; {self._in_kernel}")

    def rule(self, event: KernelEvent) -> str:
        if event.rule is None or event.rule >= len(self._rule_ids):
            return "unknown"
        return self._rule_ids[event.rule]

    def records(self, batch: KernelEvents, gen: Generation | None) -> list[Record]:
        """A journal record for every ring-buffer event, with the requester the kernel
        took: a decision record (decided_by kernel) or a debug notice (_is_decision)."""
        out = []
        for event in batch.events:
            if event.kind is not Kind.REQUEST:
                if event.action in (Action.DENIED, Action.WOULD_DENY):
                    out.append(self._load_record(event))
            elif gen is None:
                continue
            elif self._is_decision(event, gen):
                out.append(self._request_record(event, gen))
            else:
                out.append(_passed_record(event))
        return out

    def _is_decision(self, event: KernelEvent, gen: Generation) -> bool:
        """The event is the request's decision record: refused in-kernel (no helper
        runs), or the kernel's verdict stands for its requester (core.decide_line answers
        the helper `allow kernel` and journals nothing).  Otherwise the helper's request
        is journaled by the daemon's decision and the event is a debug notice."""
        if event.action is Action.DENIED:
            return True
        uses = gen.compiled.uses_requester
        return uses and self.decided_in_kernel(event.name, gen.number)

    def _request_record(self, event: KernelEvent, gen: Generation) -> Record:
        rec = records.decision(gen.decide(event.name, Source.KERNEL, facts_of(event)), gen.number)
        fields = dict(rec.fields)
        fields.update(requester_fields(kernel_requester(event)))
        fields[Field.DECIDED_BY] = "kernel"
        if event.action is Action.DENIED:
            fields[Field.LAYERS] = "kernel"
            fields[Field.ENFORCED] = "yes"
        who = f" (requested by {event.comm!r}[{event.tgid}] uid {event.uid})"
        return Record(rec.message_id, rec.priority, f"in-kernel: {rec.message}{who}", fields)

    def _load_record(self, event: KernelEvent) -> Record:
        what = f"{event.name} (dev {event.dev >> 20}:{event.dev & 0xFFFFF} inode {event.ino})"
        if event.kind is Kind.LOAD_DATA:
            what = "a module image from memory (init_module)"
        verb = "refused" if event.action is Action.DENIED else "would refuse (permissive)"
        text = (
            f"kernel layer {verb} loading {what} by {event.comm!r}[{event.tgid}] "
            f"uid {event.uid}, rule {self.rule(event)}"
        )
        return records.notice(text, Priority.WARNING)

    def stop(self) -> None:
        """Stop reading and close our fds; the pinned programs keep enforcing."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._layer is not None:
            self._layer.close()


def _passed_record(event: KernelEvent) -> Record:
    text = (
        f"kernel request {event.name} by {event.comm!r}[{event.tgid}] uid {event.uid} "
        "passed to the helper (no in-kernel verdict for this name)"
    )
    fields = requester_fields(kernel_requester(event))
    return Record(MessageId.NOTICE, Priority.DEBUG, text, fields)


def kernel_requester(event: KernelEvent) -> KernelRequester:
    return KernelRequester(
        facts=facts_of(event),
        tgid=event.tgid,
        tid=event.pid,
        comm=event.comm,
        loginuid=event.loginuid,
        sessionid=event.sessionid,
        cgroup_id=event.cgroup_id,
        userns=event.userns_inum,
    )


def facts_of(event: KernelEvent) -> RequesterFacts:
    """The requester as the policy sees it.  `container` is the user namespace only: the
    kernel layer does not see pid namespaces or container cgroups (docs/attribution.md)."""
    return RequesterFacts(
        uid=event.uid, euid=event.euid, gid=event.gid, container=not event.in_init_userns
    )
