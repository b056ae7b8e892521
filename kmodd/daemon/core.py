"""The core: one thread owns all daemon state and serves both sockets.

Other threads (watcher, udev, signal handlers, the kernel layer's reader, the generation
builder) only `post` events; a SimpleQueue (re-entrant, so signal handlers may post) plus
an eventfd wakes the selectors loop.  Why decisions run on this thread rather than under
a lock: libkmod contexts are not thread-safe, a warm decision is a dict hit (~10 us), and
one loop gives a total order between a reload's swap and the decisions around it.
Building a new generation (load + compile + render, ~1 s) is the only slow step, so it
runs on a builder thread with its own libkmod context and the result is swapped in here.
Nothing on this thread waits: every decide.sock request is answered at once (who asked
is known only in-kernel, by the kernel layer; see decide_line).

What the core holds: the loop, the reload state machine and the udev device table.
Decisions: daemon/decider.py; housekeeping: daemon/housekeeping.py; control methods:
daemon/control.py (with a read-only view, daemon/view.py).
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from kmodd import helper, wire
from kmodd.contract.journal import Priority
from kmodd.daemon import control, records
from kmodd.daemon.decider import Decider
from kmodd.daemon.events import (
    Event,
    FilesChanged,
    KernelEvents,
    ReloadCause,
    ReloadRequested,
    Stop,
    UdevAction,
    UdevDevice,
    UdevLost,
)
from kmodd.daemon.generation import BuildOptions, Generation, build_generation, error_lines, publish
from kmodd.daemon.housekeeping import Housekeeper
from kmodd.daemon.journal import JournalSink
from kmodd.daemon.ports import Edges
from kmodd.daemon.server import CONTROL_CALL_TIMEOUT_S, Kind, Peer, Server
from kmodd.daemon.startup import (
    EXIT_START_GAVE_UP,
    CommitGate,
    StartLimits,
    StartOutcome,
    wait_for_first,
)
from kmodd.daemon.treeindex import TreeIndex
from kmodd.daemon.view import CoreView, ReloadResult
from kmodd.paths import Paths
from kmodd.policy.engine import Decision
from kmodd.policy.types import Outcome, Source

DEVICES_MAX = 8192  # devices remembered for status (a server has a few hundred)
TICK_S = 5.0  # tamper check and STATUS= refresh; the watchdog may ask for a shorter one
KERNEL_PASSED = b"allow kernel\n"  # the kernel layer allowed this requester (decide_line)
Reply = Callable[[str | None], None]
Respond = Callable[[bytes], None]


RELOAD_MARGIN_S = 30.0  # on top of two builds: kmodctl's own start, the publish, the reply


@dataclass(frozen=True, slots=True)
class _Built:
    cause: ReloadCause
    detail: str
    generation: Generation | None
    errors: tuple[str, ...]
    duration_s: float


class Core:
    def __init__(
        self,
        paths: Paths,
        options: BuildOptions,
        sink: JournalSink,
        edges: Edges,
        limits: StartLimits | None = None,
    ) -> None:
        self.paths = paths
        self.options = options
        self.sink = sink
        self.edges = edges
        self.started = time.time()
        self.decider = Decider(sink, edges.sys_module)
        self.housekeeper = Housekeeper(paths, sink, edges)
        self.tree_index = TreeIndex()  # what one build keeps for the next
        self.last_reload: ReloadResult | None = None
        self.devices: dict[str, UdevDevice] = {}  # coldplugged/added devices with a MODALIAS
        self.notes: list[str] = []  # plain warnings for status (static usermodehelper...)
        self._queue: queue.SimpleQueue[Event | _Built] = queue.SimpleQueue()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._stopping: str | None = None
        self._building = False
        self._waiting: list[Reply | None] = []  # replies owed by the running build
        self._next: list[Reply | None] = []  # requests that arrived during the build
        self._next_cause: tuple[ReloadCause, str] | None = None
        self._server: Server | None = None
        self._closed = False
        self.limits = StartLimits() if limits is None else limits
        self.gate = CommitGate()  # closed when stopping: no half-published generation
        self._builder: threading.Thread | None = None
        self._slowest_build_s = 0.0  # the reload call's deadline follows it (call_timeout)

    @property
    def generation(self) -> Generation | None:
        return self.decider.generation

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
        first = self._first_build()
        if first is not StartOutcome.BUILT:
            return self._not_started(first)
        lg = self.edges.last_good  # READY only with enforcement in place (lastgood)
        if lg is not None and not lg.enforcing(self.generation):
            return lg.no_enforcement(self.last_reload.errors if self.last_reload else ())
        self.edges.notifier.ready(self.status_line())
        next_tick = self.edges.clock()
        while self._stopping is None:
            now = self.edges.clock()
            if now >= next_tick:
                self.housekeeper.tick(
                    self.generation, self._building, self.status_line(), self.view
                )
                next_tick = now + self._tick_interval()
            deadlines = [next_tick, server.next_deadline()]
            server.poll(max(0.0, min(d for d in deadlines if d is not None) - now))
        self.edges.notifier.stopping(f"stopping: {self._stopping}")
        self.sink.emit(records.lifecycle(False, f"kmodd {os.getpid()} stopping: {self._stopping}"))
        return 0

    @property
    def server_overflows(self) -> int:
        """Connections closed unanswered because a socket's slots were full."""
        return 0 if self._server is None else self._server.overflows

    @property
    def builder_running(self) -> bool:
        """A build thread is still at work (the daemon then exits without waiting)."""
        return self._builder is not None and self._builder.is_alive()

    def close(self) -> None:
        # The eventfd stays open until exit: a builder thread still running may post,
        # and writing to a closed (possibly reused) fd number would be worse than a leak.
        self.gate.close()
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
                self.request_reload(cause, reply)
            case FilesChanged(paths=changed):
                if not self._only_our_own_write(changed):
                    self.request_reload(ReloadCause.WATCH, None, " ".join(changed)[:200])
            case UdevDevice():
                self._udev(event)
            case UdevLost(reason=reason):
                self.sink.emit(
                    records.notice(f"udev monitor recreated ({reason}), re-coldplugging")
                )
                if self.edges.recoldplug is not None:
                    self.edges.recoldplug()
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

    def _build(self, cause: ReloadCause, detail: str) -> _Built:
        start = time.monotonic()
        lg = self.edges.last_good
        try:
            number = self._next_number()
            if lg is not None:  # checks the dirs, publishes and persists too
                gen = lg.build(number, self.generation, self.tree_index, self.gate)
            else:
                gen = build_generation(number, self.paths, self.options, self.tree_index)
                with self.gate.commit():
                    gen = publish(gen)
            if self.edges.kernel is not None:  # the kernel's tables with the files
                self.edges.kernel.apply(gen)
        except Exception as err:  # every failure is reported; the old generation stays
            errors = tuple(error_lines(err))
            shipped = self._shipped(errors)
            return _Built(cause, detail, shipped, errors, time.monotonic() - start)
        return _Built(cause, detail, gen, (), time.monotonic() - start)

    def _shipped(self, errors: tuple[str, ...]) -> Generation | None:
        """Builder thread, after a failed build: with no generation at all (the first
        build; it is None until the core thread swaps one in) and nothing stored, the
        shipped policy stands in (kmodd.daemon.lastgood.build_shipped)."""
        lg = self.edges.last_good
        if self.generation is not None or lg is None or lg.stored is not None:
            return None
        try:
            gen = lg.build_shipped(self._next_number(), errors, self.tree_index, self.gate)
            if gen is not None and self.edges.kernel is not None:
                self.edges.kernel.apply(gen)
        except Exception as err:  # the policy's own errors are what is reported
            lg.refused = f"the shipped policy cannot stand in: {err}"
            return None
        return gen

    def _build_now(self, cause: ReloadCause) -> None:
        """A generation built on this thread (tests; the daemon uses _first_build)."""
        self._built(self._build(cause, ""))

    def _first_build(self) -> StartOutcome:
        """The first generation, built on a builder thread while this one extends the
        start timeout and listens for Stop (kmodd.daemon.startup).  Nothing is served
        before it; other events wait for it, in order."""
        self._builder = threading.Thread(
            target=lambda: self.post(self._build(ReloadCause.START, "")),
            name="kmodd-build",
            daemon=True,
        )
        self._builder.start()
        held: list[Event] = []
        started = self.edges.clock()

        def wait(timeout: float) -> StartOutcome | None:
            select.select([self._wake], [], [], timeout)
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self._wake)
            while True:
                try:
                    event = self._queue.get_nowait()
                except queue.Empty:
                    return None
                if isinstance(event, _Built):
                    self._built(event)
                    return StartOutcome.BUILT
                if isinstance(event, Stop):
                    self._stopping = event.reason
                    return StartOutcome.STOPPED
                held.append(event)

        def extend(usec: int) -> None:
            took = self.edges.clock() - started
            status = f"building the first policy generation ({took:.0f} s)"
            self.edges.notifier.extend_timeout(usec, status)

        outcome = wait_for_first(self.limits, self.edges.clock, wait, extend)
        if outcome is StartOutcome.BUILT:
            for event in held:
                self.handle(event)
            # What was queued behind the build (a Stop, say) waits for no other wake-up.
            with contextlib.suppress(BlockingIOError):
                os.eventfd_write(self._wake, 1)
        return outcome

    def _not_started(self, outcome: StartOutcome) -> int:
        """Stopped, or gave up, before the first generation: publish none of it."""
        ended = self.gate.close()  # False: a publish under way did not end in COMMIT_WAIT_S
        committed = self.gate.committed > 0 or not ended
        pid, lg = os.getpid(), self.edges.last_good
        if outcome is StartOutcome.GAVE_UP:
            text = (
                f"the first policy generation was not built within {self.limits.cap_s:g} s: "
                f"giving up, exit {EXIT_START_GAVE_UP} (kmodd.service does not restart it); "
                "fix what makes the build slow (journalctl -u kmodd), then systemctl restart kmodd"
            )
            self.sink.emit(records.notice(text, Priority.ERR))
            if lg is not None:
                lg.not_started(text, fall_back=True)
            return EXIT_START_GAVE_UP
        what = "its generation was published whole" if committed else "nothing published"
        if not ended:
            what = "a publish under way did not end in time"
        text = f"stopping: {self._stopping} during the first build ({what})"
        self.edges.notifier.stopping(text)
        if lg is not None and not committed:
            lg.not_started(
                f"kmodd stopped ({self._stopping}) before its first generation", fall_back=False
            )
        self.sink.emit(records.lifecycle(False, f"kmodd {pid} {text}"))
        return 0

    def request_reload(self, cause: ReloadCause, reply: Reply | None, detail: str = "") -> None:
        if self._building:  # coalesced: one more build after this one, for all of them
            self._next.append(reply)
            self._next_cause = (cause, detail)
            return
        self._building = True
        self._waiting = [reply]
        self.edges.notifier.reloading()
        self._builder = threading.Thread(
            target=lambda: self.post(self._build(cause, detail)), name="kmodd-build", daemon=True
        )
        self._builder.start()

    def _built(self, built: _Built) -> None:
        error: str | None = None
        self._slowest_build_s = max(self._slowest_build_s, built.duration_s)
        if built.generation is not None and built.errors:  # the shipped policy stands in
            self._swap(built.generation, built)
            error = "\n".join(built.errors)
            self.last_reload = ReloadResult(
                False,
                built.cause,
                built.detail,
                time.time(),
                built.duration_s,
                built.generation.number,
                built.errors,
            )
            self.sink.emit(records.reload_failed(built.errors, self.last_reload.cause_text, None))
            self.sink.emit(records.notice(str(built.generation.stands_in), Priority.ERR))
        elif built.generation is not None:
            self._swap(built.generation, built)
        else:
            error = "\n".join(built.errors)
            kept = None if self.generation is None else self.generation.number
            self.last_reload = ReloadResult(
                False, built.cause, built.detail, time.time(), built.duration_s, kept, built.errors
            )
            self.sink.emit(records.reload_failed(built.errors, self.last_reload.cause_text, kept))
            if kept is None and self.edges.last_good is not None:
                self.edges.last_good.fall_back(built.errors)
        self.housekeeper.reloaded(built.generation is not None and not built.errors, self.view)
        if self._building:
            self.edges.notifier.ready(self.status_line())
        for reply in self._waiting:
            if reply is not None:
                reply(error)
        self._building = False
        self._waiting = []
        if self._next_cause is not None:
            replies, (cause, detail) = self._next, self._next_cause
            self._next, self._next_cause = [], None
            self.request_reload(cause, None, detail)
            self._waiting = replies

    def _swap(self, gen: Generation, built: _Built) -> None:
        old = self.generation
        self.decider.use(gen)
        if old is not None:
            old.close()
        self.last_reload = ReloadResult(
            True, built.cause, built.detail, time.time(), built.duration_s, gen.number
        )
        cause = self.last_reload.cause_text
        files = len(gen.compiled.files)
        self.sink.emit(records.reload_ok(gen.number, gen.hash, cause, gen.mode, files))
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

    # --- kernel requests (decide.sock) ---------------------------------------------

    def decide_line(self, name: bytes, peer: Peer, respond: Respond) -> bytes | None:
        """decide.sock: `allow RULE` / `deny RULE` / `error MESSAGE` (docs/protocol.md),
        always at once: the core never waits for who asked.

        The daemon does not know the requester of a helper request.  When the kernel
        layer decided NAME for its exact requester (policy with requester rules, NAME in
        the tables' domain), the helper runs only because the kernel let the request
        through: the kernel's verdict stands, `allow kernel` (its ring-buffer event is
        journaled as the decision, decided_by kernel).  Otherwise the policy decides
        with the requester unknown: a requester rule decides by `unknown_requester`."""
        if not helper.valid_name(name):
            self.decider.stats.invalid_names += 1
            self.sink.emit(
                records.notice(f"denied invalid request name {name[:120]!r}", Priority.WARNING)
            )
            return b"deny invalid-name\n"
        gen, kernel = self.generation, self.edges.kernel
        text = name.decode("ascii")
        if gen is None or not gen.compiled.uses_requester:
            return self.decider.kernel(name, {})
        if kernel is None:
            return self.decider.kernel(name, records.unknown_requester("no kernel layer"))
        if kernel.decided_in_kernel(text, gen.number):
            self.decider.kernel_passed += 1
            return KERNEL_PASSED
        return self.decider.kernel(name, records.unknown_requester(kernel.unknown_why(text)))

    # --- udev ---------------------------------------------------------------------

    def _udev(self, device: UdevDevice) -> None:
        if device.action is UdevAction.REMOVE:  # gone: no device needing a denied module
            self.devices.pop(device.devpath, None)
            self.decider.forget(device.devpath)
            return
        if not device.modalias:
            return
        if device.devpath not in self.devices and len(self.devices) >= DEVICES_MAX:
            del self.devices[next(iter(self.devices))]  # hotplug churn must not grow us
        self.devices[device.devpath] = device
        # Coldplug at start sees every present device: log only what the policy denies.
        # udev's replay at boot sees them again: the decider records each once.
        coldplug = device.action is UdevAction.COLDPLUG
        self.decider.logged(device.modalias, Source.UDEV, device=device, only_denied=coldplug)

    # --- control ------------------------------------------------------------------

    def control(self, call: wire.Call, peer: Peer, respond: Respond) -> None:
        control.dispatch(self, call, peer, respond)

    def call_timeout(self, call: wire.Call) -> float:
        """A reload may wait for the build under way and then its own (coalesced): twice
        the slowest build seen, plus a margin.  Under TCG builds take 70-480 s, so the
        fixed 120 s failed a real boot's `systemctl reload` after a watched edit (issue 14)
        although its generation was built."""
        if call.method is not wire.Method.RELOAD:
            return CONTROL_CALL_TIMEOUT_S
        return max(CONTROL_CALL_TIMEOUT_S, 2 * self._slowest_build_s + RELOAD_MARGIN_S)

    def accept_removed(self, values: object) -> str | None:
        """`kmodctl reload --accept-removed DIR`: None, or why VALUES are refused."""
        lg = self.edges.last_good
        return None if lg is None else lg.accept(values)

    def refused(self, kind: Kind, peer: Peer, what: str) -> None:
        self.sink.emit(records.refused(kind.value, peer.pid, peer.uid, what))

    def view(self) -> CoreView:
        edges, hk = self.edges, self.housekeeper

        def decide(name: str, source: Source) -> Decision | None:
            found = self.decider.answer(name, source)
            return None if found is None else found.decision

        return CoreView(
            started=self.started,
            paths=self.paths,
            generation=self.generation,
            last_reload=self.last_reload,
            decisions=self.decider.stats.document(),
            journal_dropped=self.sink.dropped,
            journal_failed=self.sink.failed,
            server_overflows=self.server_overflows,
            notify_dropped=edges.notifier.dropped,
            modprobe_managed=edges.modprobe_path is not None,
            tamper=hk.tamper,
            static_usermodehelper=edges.static_usermodehelper,
            devices=tuple(self.devices.values()),
            notes=tuple(self.notes),
            udev=edges.udev,
            watcher=edges.watcher,
            kernel=edges.kernel,
            last_good=None if edges.last_good is None else edges.last_good.status(),
            decide=decide,
            decisions_by_layer=tuple(self.decider.stats.layered.items()),
        )

    def status_line(self) -> str:
        gen = self.generation
        if gen is None:
            return "no policy generation (helper falls back to its snapshot)"
        v = self.decider.stats.verdicts
        shipped = ", POLICY INVALID: shipped policy only" if gen.stands_in else ""
        return (
            f"generation {gen.number} ({gen.mode.value}{shipped}); allowed {v[Outcome.ALLOW]}, "
            f"denied {v[Outcome.DENY]}, would-deny {v[Outcome.WOULD_DENY]}"
        )
