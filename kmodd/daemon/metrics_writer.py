"""Writes the metrics file (kmodd.daemon.metrics) for node_exporter's textfile collector:
on every finished reload (a new generation, or a failed reload) and every INTERVAL_S on
the core's housekeeping tick.  Atomic (kmodd.atomic: a `.kmodd.prom.*.tmp` the collector
ignores, renamed over the file), so a scrape never reads half a file.

Runs on the core thread: taking the snapshot asks the Decider (loaded modules the policy
denies: one cached decision per /proc/modules line, ~100 lines) and writing costs one
fsync; at the default 30 s that is noise next to a decision's ~10 us.  A write that fails
(no directory, a full disk) is reported once per distinct error, never fatal.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from kmodd.atomic import write_atomic
from kmodd.contract.journal import Priority
from kmodd.daemon import records
from kmodd.daemon.journal import JournalSink
from kmodd.daemon.metrics import DecisionCount, GenerationMetric, RuleMetric, Snapshot, render
from kmodd.daemon.status import layers, loaded_denied
from kmodd.daemon.view import CoreView
from kmodd.errors import KmoddError

DEFAULT_PATH = Path("/var/lib/prometheus/node-exporter/kmodd.prom")
INTERVAL_S = 30.0  # node_exporter is scraped every 15-60 s; age is exact at each write
MODE = 0o644  # node_exporter runs as its own user


def snapshot(view: CoreView, reloads: tuple[int, int, bool | None], now: float) -> Snapshot:
    """RELOADS: (ok, failed, last ok) as the writer counted them."""
    gen = view.generation
    generation = None
    rules: tuple[RuleMetric, ...] = ()
    if gen is not None:
        generation = GenerationMetric(
            gen.number, gen.hash, gen.policy.hash, gen.mode.value, gen.created
        )
        rules = tuple(RuleMetric(c.rule, c.enforced, len(c.gaps)) for c in gen.coverage)
    decisions = tuple(
        DecisionCount(outcome, rule, source, layer_names, n)
        for (outcome, rule, source, layer_names), n in view.decisions_by_layer
    )
    return Snapshot(
        now=now,
        started=view.started,
        generation=generation,
        decisions=decisions,
        invalid_names=int(view.decisions["invalid_names"]),
        no_generation=int(view.decisions["no_generation"]),
        rules=rules,
        loaded_denied=tuple((m["module"], m["rule"]) for m in loaded_denied(view)),
        layers=tuple((name, bool(state["active"])) for name, state in layers(view).items()),
        journal_dropped=view.journal_dropped,
        journal_failed=view.journal_failed,
        reloads_ok=reloads[0],
        reloads_failed=reloads[1],
        last_reload_ok=reloads[2],
    )


class MetricsWriter:
    def __init__(
        self,
        path: Path,
        sink: JournalSink,
        interval_s: float = INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.sink = sink
        self.interval_s = interval_s
        self.clock = clock
        self.reloads_ok = 0
        self.reloads_failed = 0
        self.last_ok: bool | None = None
        self.writes = 0
        self.errors = 0
        self._due = 0.0
        self._last_error: str | None = None

    def reloaded(self, ok: bool, view: CoreView) -> None:
        """A reload finished: count it and write now (the generation changed, or not)."""
        if ok:
            self.reloads_ok += 1
        else:
            self.reloads_failed += 1
        self.last_ok = ok
        self.write(view)

    def tick(self, view: Callable[[], CoreView]) -> None:
        if self.clock() >= self._due:
            self.write(view())

    def write(self, view: CoreView) -> bool:
        self._due = self.clock() + self.interval_s
        reloads = (self.reloads_ok, self.reloads_failed, self.last_ok)
        data = render(snapshot(view, reloads, time.time())).encode()
        try:
            write_atomic(self.path, data, mode=MODE)
        except (OSError, KmoddError) as err:
            self.errors += 1
            text = f"cannot write metrics to {self.path}: {err}"
            if text != self._last_error:  # every INTERVAL_S otherwise
                self._last_error = text
                self.sink.emit(records.notice(text, Priority.WARNING))
            return False
        self._last_error = None
        self.writes += 1
        return True
