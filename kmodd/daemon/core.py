"""The core: one thread owns all daemon state and serves both sockets.

Other threads (watcher, udev, signal handlers, the generation builder) only `post` events;
a SimpleQueue (re-entrant, so signal handlers may post) plus an eventfd wakes the
selectors loop.  Why decisions run on this thread rather than under a lock: libkmod
contexts are not thread-safe, a warm decision is a dict hit (~10 us), and one loop gives
a total order between a reload's swap and the decisions around it.  Building a new
generation (load + compile + render, ~1 s) is the only slow step, so it runs on a builder
thread with its own libkmod context and the result is swapped in here.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kmodd import helper, wire
from kmodd.atomic import write_atomic
from kmodd.contract.journal import Priority, Record
from kmodd.daemon import records
from kmodd.daemon.attribution import Attributor
from kmodd.daemon.events import (
    Event,
    FilesChanged,
    KernelEvents,
    ReloadCause,
    ReloadRequested,
    Stop,
    Tick,
    UdevDevice,
    UdevLost,
)
from kmodd.daemon.generation import (
    DECISION_CACHE_MAX,
    BuildOptions,
    Generation,
    build_generation,
    error_lines,
    publish,
)
from kmodd.daemon.journal import JournalSink
from kmodd.daemon.ports import (
    KernelLike,
    ModprobePathLike,
    NotifierLike,
    TamperLike,
    UdevLike,
    WatcherLike,
)
from kmodd.daemon.server import Kind, Peer, Server
from kmodd.errors import KmoddError
from kmodd.host.proc import Requester
from kmodd.paths import Paths
from kmodd.policy.engine import Decision
from kmodd.policy.types import Source, Verdict

if TYPE_CHECKING:
    from kmodd.daemon.lastgood import LastGood

DEVICES_MAX = 8192  # devices remembered for status (a server has a few hundred)
TICK_S = 5.0  # tamper check and STATUS= refresh; the watchdog may ask for a shorter one
Reply = Callable[[str | None], None]


@dataclass(frozen=True, slots=True)
class ReloadResult:
    ok: bool
    cause: str
    at: float  # wall clock
    duration_s: float
    generation: int | None  # the new one on success, the kept one on failure
    errors: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class _Built:
    cause: str
    generation: Generation | None
    errors: tuple[str, ...]
    duration_s: float


@dataclass
class Stats:
    verdicts: Counter[str] = field(default_factory=Counter)  # allow, deny, would_deny
    rules: Counter[str] = field(default_factory=Counter)
    sources: Counter[str] = field(default_factory=Counter)
    invalid_names: int = 0
    no_generation: int = 0  # decide requests answered "error" (the helper fell back)

    def count(self, d: Decision) -> None:
        self.count_keys(verdict_key(d), d.rule, d.source.value)

    def count_keys(self, verdict: str, rule: str, source: str) -> None:
        self.verdicts[verdict] += 1
        self.rules[rule] += 1
        self.sources[source] += 1


def verdict_key(d: Decision) -> str:
    """allow, deny, or would_deny (a deny in permissive mode)."""
    return d.outcome.value


@dataclass(frozen=True, slots=True)
class _Answer:
    """Everything decide.sock needs for one name in one generation, computed once: the
    reply line, the journal record (identical for every repeat) and the counter keys."""

    reply: bytes
    record: Record
    verdict: str
    rule: str


@dataclass
class Edges:
    """The I/O edges the composition root injects (None: not available / disabled)."""

    notifier: NotifierLike
    modprobe_path: ModprobePathLike | None = None
    recoldplug: Callable[[], None] | None = None
    reassert: bool = False  # re-point kernel.modprobe at the helper after tampering
    attributor: Attributor | None = None  # who asked (tracefs); None: not attempted
    last_good: LastGood | None = None  # the persisted store (kmodd.daemon.lastgood)
    udev: UdevLike | None = None  # the running uevent monitor
    watcher: WatcherLike | None = None  # the running file watcher
    kernel: KernelLike | None = None  # the BPF LSM layer (daemon/kernel_layer.py)
    static_usermodehelper: str | None = None  # the kernel bypasses kernel.modprobe: why
    clock: Callable[[], float] = time.monotonic


class Core:
    def __init__(
        self, paths: Paths, options: BuildOptions, sink: JournalSink, edges: Edges
    ) -> None:
        self.paths = paths
        self.options = options
        self.sink = sink
        self.edges = edges
        self.started = time.time()
        self.generation: Generation | None = None
        self.last_reload: ReloadResult | None = None
        self.stats = Stats()
        self.devices: dict[str, UdevDevice] = {}  # coldplugged/added devices with a MODALIAS
        self.tamper: TamperLike | None = None
        self.notes: list[str] = []  # plain warnings for status (static usermodehelper...)
        self._queue: queue.SimpleQueue[Event | _Built] = queue.SimpleQueue()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._stopping: str | None = None
        self._building = False
        self._waiting: list[Reply | None] = []  # replies owed by the running build
        self._next: list[Reply | None] = []  # requests that arrived during the build
        self._next_cause: str | None = None
        self._server: Server | None = None
        # decide.sock answers of the current generation (see _Answer), bounded like the
        # generation's decision cache; replaced wholesale when the generation changes.
        self._answers: dict[bytes, _Answer] = {}
        self._answers_gen: Generation | None = None
        self._last_status = ""
        self._closed = False

    # --- posting (any thread) ------------------------------------------------------

    def post(self, event: Event | _Built) -> None:
        if self._closed:
            return
        self._queue.put(event)
        with contextlib.suppress(BlockingIOError):  # counter saturated: the loop is awake
            os.eventfd_write(self._wake, 1)

    # --- the loop -----------------------------------------------------------------

    def run(self, server: Server) -> int:
        self._server = server
        server.add_reader(self._wake, self._drain)
        self.sink.emit(records.lifecycle(True, f"kmodd {os.getpid()} starting"))
        self._build_now(ReloadCause.START)
        lg = self.edges.last_good  # READY only with enforcement in place (lastgood)
        if lg is not None and not lg.enforcing(self.generation):
            return lg.no_enforcement(self.last_reload.errors if self.last_reload else ())
        status = self.status_line()
        self.edges.notifier.ready(status)
        next_tick = self.edges.clock()
        while self._stopping is None:
            now = self.edges.clock()
            if now >= next_tick:
                self._tick()
                next_tick = now + self._tick_interval()
            deadline = server.next_deadline()
            timeout = next_tick - now if deadline is None else min(next_tick, deadline) - now
            server.poll(max(0.0, timeout))
        self.edges.notifier.stopping(f"stopping: {self._stopping}")
        self.sink.emit(records.lifecycle(False, f"kmodd {os.getpid()} stopping: {self._stopping}"))
        return 0

    @property
    def server_overflows(self) -> int:
        """Connections closed unanswered because a socket's slots were full."""
        return 0 if self._server is None else self._server.overflows

    def close(self) -> None:
        # The eventfd stays open until exit: a builder thread still running may post,
        # and writing to a closed (possibly reused) fd number would be worse than a leak.
        self._closed = True
        if self.generation is not None:
            self.generation.close()

    def _tick_interval(self) -> float:
        ping = self.edges.notifier.watchdog_ping_interval_s
        return TICK_S if ping is None else min(TICK_S, ping)

    def _drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._wake)
        while True:
            try:
                event = self._queue.get_nowait()
            except queue.Empty:
                return
            self.handle(event)

    def handle(self, event: Event | _Built) -> None:
        match event:
            case _Built():
                self._built(event)
            case ReloadRequested(cause=cause, reply=reply):
                self.request_reload(cause.value, reply)
            case FilesChanged(paths=changed):
                if not self._only_our_own_write(changed):
                    self.request_reload(
                        f"{ReloadCause.WATCH.value}: {' '.join(changed)[:200]}", None
                    )
            case UdevDevice():
                self._udev(event)
            case UdevLost(reason=reason):
                self.sink.emit(
                    records.notice(f"udev monitor recreated ({reason}), re-coldplugging")
                )
                if self.edges.recoldplug is not None:
                    self.edges.recoldplug()
            case Tick():
                self._tick()
            case Stop(reason=reason):
                self._stopping = reason
            case KernelEvents():
                if self.edges.kernel is not None:
                    for record in self.edges.kernel.records(event, self.generation):
                        self.sink.emit(record)

    # --- generations --------------------------------------------------------------

    def _next_number(self) -> int:
        if self.edges.last_good is not None:
            return self.edges.last_good.next_number(self.generation)
        return 1 if self.generation is None else self.generation.number + 1

    def _build(self, cause: str) -> _Built:
        start = time.monotonic()
        lg = self.edges.last_good
        try:
            if lg is not None:
                gen = lg.build(self._next_number(), self.generation)
            else:
                gen = publish(build_generation(self._next_number(), self.paths, self.options))
            if self.edges.kernel is not None:  # the kernel's tables with the files
                self.edges.kernel.apply(gen)
        except Exception as err:  # every failure is reported; the old generation stays
            return _Built(cause, None, tuple(error_lines(err)), time.monotonic() - start)
        return _Built(cause, gen, (), time.monotonic() - start)

    def _build_now(self, cause: str) -> None:
        """The first generation is built on this thread: nothing to serve before it."""
        self._built(self._build(cause))

    def request_reload(self, cause: str, reply: Reply | None) -> None:
        if self._building:
            self._next.append(reply)
            self._next_cause = cause
            return
        self._building = True
        self._waiting = [reply]
        self.edges.notifier.reloading()
        threading.Thread(
            target=lambda: self.post(self._build(cause)), name="kmodd-build", daemon=True
        ).start()

    def _built(self, built: _Built) -> None:
        error: str | None = None
        if built.generation is not None:
            self._swap(built.generation, built)
        else:
            error = "\n".join(built.errors)
            kept = None if self.generation is None else self.generation.number
            self.last_reload = ReloadResult(
                False, built.cause, time.time(), built.duration_s, kept, built.errors
            )
            self.sink.emit(records.reload_failed(built.errors, built.cause, kept))
            if kept is None and self.edges.last_good is not None:
                self.edges.last_good.fall_back(built.errors)
        if self._building:
            self.edges.notifier.ready(self.status_line())
        for reply in self._waiting:
            if reply is not None:
                reply(error)
        self._building = False
        self._waiting = []
        if self._next or self._next_cause is not None:
            replies, cause = self._next, self._next_cause or "coalesced"
            self._next, self._next_cause = [], None
            self.request_reload(cause, None)
            self._waiting = replies

    def _swap(self, gen: Generation, built: _Built) -> None:
        old, self.generation = self.generation, gen
        if old is not None:
            old.close()
        self.last_reload = ReloadResult(
            True, built.cause, time.time(), built.duration_s, gen.number
        )
        self.sink.emit(
            records.reload_ok(gen.number, gen.hash, built.cause, gen.mode, len(gen.compiled.files))
        )
        for c in gen.conflicts:
            self.sink.emit(records.conflict(str(c), c.kind, c.module, gen.number))

    def _only_our_own_write(self, changed: tuple[str, ...]) -> bool:
        """Publishing a generation rewrites run/modprobe.d/00-kmodd.conf, which the watcher
        reports: no reload for that, unless the file no longer holds what we wrote."""
        ours = str(self.paths.enforcement_file)
        gen = self.generation
        if gen is None or any(path != ours for path in changed):
            return False
        try:
            return self.paths.enforcement_file.read_text() == gen.enforcement
        except OSError:
            return False

    # --- decisions ----------------------------------------------------------------

    def decide_line(self, name: bytes, peer: Peer) -> bytes:
        """decide.sock: `allow RULE` / `deny RULE` / `error MESSAGE` (see docs/protocol.md)."""
        if not helper.valid_name(name):
            self.stats.invalid_names += 1
            self.sink.emit(
                records.notice(f"denied invalid request name {name[:120]!r}", Priority.WARNING)
            )
            return b"deny invalid-name\n"
        gen = self.generation
        if gen is None:
            self.stats.no_generation += 1
            self.sink.emit(
                records.fallback(
                    f"no policy generation: helper decides {name.decode()} from its snapshot"
                )
            )
            return b"error no policy generation\n"
        who, extra = self._attribute(name, peer)
        if who is not None and gen.compiled.uses_requester:
            # Who asked decides: no per-name answer (the generation still caches by facts).
            answer = _make_answer(gen, gen.decide(name.decode("ascii"), Source.KERNEL, who.facts()))
        else:
            answer = self._cached_answer(gen, name)
        self.stats.count_keys(answer.verdict, answer.rule, "kernel")
        self.sink.emit(records.annotate(answer.record, who, extra))
        return answer.reply

    def _cached_answer(self, gen: Generation, name: bytes) -> _Answer:
        answer = self._answers.get(name)
        if answer is None or self._answers_gen is not gen:
            answer = self._answer(gen, name)
        return answer

    def _attribute(self, name: bytes, peer: Peer) -> tuple[Requester | None, dict[str, str]]:
        """The requester of a kernel request (docs/attribution.md) and its journal fields;
        (None, {}) without an attributor, (None, KMODD_REQUESTER=unknown...) when not known.
        Waits (at most attribution.LOOKUP_TIMEOUT_S) only for a helper the kernel ran."""
        at = self.edges.attributor
        if at is None:
            return None, {}
        found = at.availability()
        if not found.available:
            return None, records.unknown_requester(found)
        if not at.kernel_spawned(peer.pid):
            return None, records.unknown_requester(found, "the helper was not run by the kernel")
        who = at.lookup(name.decode("ascii"))
        if who is None:
            return None, records.unknown_requester(found, "no module_request event matched")
        return who, records.requester(who)

    def _answer(self, gen: Generation, name: bytes) -> _Answer:
        if self._answers_gen is not gen:
            self._answers, self._answers_gen = {}, gen
        answer = _make_answer(gen, gen.decide(name.decode("ascii"), Source.KERNEL))
        if len(self._answers) >= DECISION_CACHE_MAX:
            del self._answers[next(iter(self._answers))]
        self._answers[name] = answer
        return answer

    def decide(
        self, name: str, source: Source, *, log: bool, device: UdevDevice | None = None
    ) -> Decision | None:
        gen = self.generation
        if gen is None:
            return None
        d = gen.decide(name, source)
        if log:
            self.stats.count(d)
            self.sink.emit(records.decision(d, gen.number, device))
        return d

    def _udev(self, device: UdevDevice) -> None:
        if device.action == "remove":  # gone: no longer a device needing a denied module
            self.devices.pop(device.devpath, None)
            return
        if not device.modalias:
            return
        if device.devpath not in self.devices and len(self.devices) >= DEVICES_MAX:
            del self.devices[next(iter(self.devices))]  # hotplug churn must not grow us
        self.devices[device.devpath] = device
        gen = self.generation
        if gen is None:
            return
        d = gen.decide(device.modalias, Source.UDEV)
        # Coldplug at start sees every present device: log only what the policy denies.
        if device.action != "coldplug" or d.verdict is Verdict.DENY:
            self.stats.count(d)
            self.sink.emit(records.decision(d, gen.number, device))

    # --- control ------------------------------------------------------------------

    def control(self, call: wire.Call, peer: Peer, respond: Callable[[bytes], None]) -> None:
        from kmodd.daemon import status  # noqa: PLC0415 -- keeps the import graph one-way

        status.dispatch(self, call, peer, respond)

    def refused(self, kind: Kind, peer: Peer, what: str) -> None:
        self.sink.emit(records.refused(kind.value, peer.pid, peer.uid, what))

    # --- housekeeping -------------------------------------------------------------

    def _tick(self) -> None:
        self.edges.notifier.watchdog()
        mp = self.edges.modprobe_path
        if mp is not None:
            state = mp.check()
            if not state.ok and (self.tamper is None or self.tamper.current != state.current):
                reassert = self.edges.reassert and state.current is not None
                self.sink.emit(records.tamper(state.expected, state.current, reassert))
                if reassert:
                    self._reassert(mp)
                    state = mp.check()
            self.tamper = state
        self._check_snapshot()
        line = self.status_line()
        if line != self._last_status:  # the manager's queue is finite: no repeats
            self._last_status = line
            self.edges.notifier.status(line)

    def _reassert(self, mp: ModprobePathLike) -> None:
        # The helper may have been removed or the write refused: that is news for the
        # journal and status, never a reason for the core loop to die.
        try:
            mp.install()
        except KmoddError as err:
            text = f"cannot re-assert kernel.modprobe: {err.message}"
            self.sink.emit(records.notice(text, Priority.ERR))

    def _check_snapshot(self) -> None:
        """The snapshot must hold what this generation wrote: the helper ignores a torn or
        corrupted one as a whole (and then falls back to plain modprobe), so anything else
        is rewritten and reported.  Costs one ~100 KB read per tick when all is well.
        Not while a build runs: its publish may already have written the next snapshot."""
        gen = self.generation
        if gen is None or self._building:
            return
        path = self.paths.snapshot
        try:
            rewritten = write_atomic(path, gen.snapshot, mode=0o600)
        except (OSError, KmoddError) as err:
            self.sink.emit(
                records.notice(f"cannot restore the snapshot {path}: {err}", Priority.ERR)
            )
            return
        if rewritten:
            text = f"snapshot {path} did not hold generation {gen.number}: rewritten"
            self.sink.emit(records.notice(text, Priority.WARNING))

    def status_line(self) -> str:
        gen = self.generation
        if gen is None:
            return "no policy generation (helper falls back to its snapshot)"
        v = self.stats.verdicts
        return (
            f"generation {gen.number} ({gen.mode.value}); allowed {v['allow']}, "
            f"denied {v['deny']}, would-deny {v['would_deny']}"
        )


def _make_answer(gen: Generation, d: Decision) -> _Answer:
    verdict = b"allow " if d.effective is Verdict.ALLOW else b"deny "
    return _Answer(
        verdict + _token(d.rule) + b"\n", records.decision(d, gen.number), verdict_key(d), d.rule
    )


def _token(rule: str) -> bytes:
    """A rule id as one word of the decide reply (ids are validated, but never trust)."""
    raw = rule.encode("ascii", "replace")[:200]
    return bytes(b if 0x21 <= b <= 0x7E else 0x5F for b in raw) or b"-"
