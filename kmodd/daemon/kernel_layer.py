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
from kmodd.contract.journal import Field, Priority, Record, requester_fields
from kmodd.contract.status import LayerState
from kmodd.daemon import records
from kmodd.daemon.events import KernelEvents
from kmodd.daemon.generation import Generation
from kmodd.daemon.kernel_tables import compile_tables
from kmodd.errors import KmoddError
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
            with contextlib.suppress(KmoddError, OSError):
                empty = Tables({"": NameRules()}, (), Mode.PERMISSIVE, Verdict.ALLOW, gen.number)
                self._layer.apply(empty)
            return
        self.failed = None
        self._rule_ids = compiled.rule_ids
        self._in_kernel = compiled.in_kernel

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
        """Journal records for what the kernel refused (or would have, permissive).
        Requests it let through are journaled by the helper's decision, not here."""
        out = []
        for event in batch.events:
            if event.action not in (Action.DENIED, Action.WOULD_DENY):
                continue
            if event.kind is Kind.REQUEST and event.action is Action.DENIED and gen is not None:
                out.append(self._request_record(event, gen))
            elif event.kind is not Kind.REQUEST:
                out.append(self._load_record(event))
        return out

    def _request_record(self, event: KernelEvent, gen: Generation) -> Record:
        facts = facts_of(event)
        rec = records.decision(gen.decide(event.name, Source.KERNEL, facts), gen.number)
        fields = dict(rec.fields)
        fields.update(
            requester_fields(facts, pid=event.tgid, comm=event.comm, exe=None, cgroup=None)
        )
        fields[Field.LAYERS] = "kernel"
        fields[Field.ENFORCED] = "yes"
        return Record(rec.message_id, rec.priority, f"in-kernel: {rec.message}", fields)

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


def facts_of(event: KernelEvent) -> RequesterFacts:
    """The requester as the policy sees it.  `container` is the user namespace only: the
    kernel layer does not see pid namespaces or container cgroups (docs/attribution.md)."""
    return RequesterFacts(
        uid=event.uid, euid=event.euid, gid=event.gid, container=not event.in_init_userns
    )
