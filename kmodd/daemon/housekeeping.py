"""Periodic housekeeping on the core thread: the watchdog ping, the kernel.modprobe tamper
check (and re-assert), the snapshot repair, the manager's STATUS= line and the metrics
file (daemon/metrics_writer.py: on its interval, and after every reload)."""

from __future__ import annotations

from collections.abc import Callable

from kmodd.atomic import write_atomic
from kmodd.contract.journal import Priority
from kmodd.daemon import records
from kmodd.daemon.generation import Generation
from kmodd.daemon.journal import JournalSink
from kmodd.daemon.metrics_writer import MetricsWriter
from kmodd.daemon.ports import Edges, ModprobePathLike, TamperLike
from kmodd.daemon.view import CoreView
from kmodd.errors import KmoddError
from kmodd.paths import Paths


class Housekeeper:
    def __init__(self, paths: Paths, sink: JournalSink, edges: Edges) -> None:
        self.paths = paths
        self.sink = sink
        self.edges = edges
        self.tamper: TamperLike | None = None  # the last kernel.modprobe check
        self.metrics: MetricsWriter | None = None  # set by the composition root
        self._last_status = ""

    def tick(
        self,
        gen: Generation | None,
        building: bool,
        status_line: str,
        view: Callable[[], CoreView] | None = None,
    ) -> None:
        self.edges.notifier.watchdog()
        self.check_tamper()
        if gen is not None and not building:
            # Not while a build runs: its publish may already have written the next one.
            self.repair_snapshot(gen)
        if status_line != self._last_status:  # the manager's queue is finite: no repeats
            self._last_status = status_line
            self.edges.notifier.status(status_line)
        if self.metrics is not None and view is not None:
            self.metrics.tick(view)

    def reloaded(self, ok: bool, view: Callable[[], CoreView]) -> None:
        """A reload finished (OK: a new generation is active): the metrics say so now."""
        if self.metrics is not None:
            self.metrics.reloaded(ok, view())

    def check_tamper(self) -> None:
        mp = self.edges.modprobe_path
        if mp is None:
            return
        state = mp.check()
        if not state.ok and (self.tamper is None or self.tamper.current != state.current):
            reassert = self.edges.reassert and state.current is not None
            self.sink.emit(records.tamper(state.expected, state.current, reassert))
            if reassert:
                self._reassert(mp)
                state = mp.check()
        self.tamper = state

    def _reassert(self, mp: ModprobePathLike) -> None:
        # The helper may have been removed or the write refused: that is news for the
        # journal and status, never a reason for the core loop to die.
        try:
            mp.install()
        except KmoddError as err:
            text = f"cannot re-assert kernel.modprobe: {err.message}"
            self.sink.emit(records.notice(text, Priority.ERR))

    def repair_snapshot(self, gen: Generation) -> None:
        """The snapshot must hold what GEN wrote: the helper ignores a torn or corrupted
        one as a whole (and then falls back to plain modprobe), so anything else is
        rewritten and reported.  Costs one ~100 KB read per tick when all is well."""
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
