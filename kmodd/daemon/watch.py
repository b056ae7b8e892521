"""Watch modprobe.d, the policy dirs and lib/modules/REL; post one FilesChanged per burst.

What watchdog 7 does not do for us (research python-ecosystem.md §3, measured):
- a watched dir that is deleted and re-created loses its watch silently, and a dir that
  does not exist cannot be watched at all: we watch each target AND its parent, or the
  nearest existing ancestor until the target appears, and re-arm on structural changes;
- one editor save is 4-18 events and 200 files are 1,200 events: we filter to the names
  that matter and debounce (150 ms quiet, at most 1 s) into one event;
- inotify queue overflow drops events without telling the handler: a periodic reconcile
  compares a cheap fingerprint (name, inode, size, mtime) and re-arms the watches.

The core always rescans everything on FilesChanged; the paths are for the log.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from kmodd.daemon.events import FilesChanged, Post
from kmodd.paths import Paths

MAX_DELAY_S = 1.0  # a steady stream of writes still reloads at least once a second
RECONCILE_S = 5.0  # cost: a few stat/listdir calls over ~8 small dirs
# A change the reconcile finds may still have its inotify event on the way (the observer
# thread lags under load; watchdog holds an unpaired rename 0.5 s).  Posted at once, that
# event became a second reload of the same files (seen under TCG: one policy write, two
# generations), so the reconcile's finding waits this long in the debounce for it.
RECONCILE_SETTLE_S = 1.0
PATHS_MAX = 4096  # names carried in one FilesChanged (the log), the rest are counted
# Names editors and tools write next to the real file (vim .swp/~, sed -i's sedXXXXXX,
# depmod's *.tmp, emacs #x#, dpkg leftovers); they never matter by themselves.
IGNORED = ("*~", "*.swp", "*.swx", "*.tmp", "#*#", "*.dpkg-*", "*.ucf-*")
WANTED_EVENTS = (
    FileCreatedEvent,
    FileModifiedEvent,
    FileClosedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
)


@dataclass(frozen=True, slots=True)
class Target:
    """A directory whose files matter, and which of its names do."""

    path: Path
    patterns: tuple[str, ...]
    exclude: frozenset[str] = frozenset()  # names we write ourselves

    def wants(self, name: str) -> bool:
        if name.startswith(".") or name in self.exclude:
            return False
        if any(fnmatch.fnmatchcase(name, p) for p in IGNORED):
            return False
        return any(fnmatch.fnmatchcase(name, p) for p in self.patterns)


def targets_for(paths: Paths) -> tuple[Target, ...]:
    """modprobe.d dirs (*.conf), policy dirs (*.yaml), the module dir (modules.*).

    The daemon's own enforcement file is excluded: every generation rewrites it, and
    watching it would turn each reload into a second one.
    """
    ours = paths.enforcement_file
    found = [
        Target(d, ("*.conf",), frozenset({ours.name}) if d == ours.parent else frozenset())
        for d in paths.modprobe_d_dirs
    ]
    found += [Target(d, ("*.yaml",)) for d in paths.policy_dirs]
    found.append(Target(paths.module_dir, ("modules.*",)))
    return tuple(found)


def resolved(targets: Iterable[Target]) -> tuple[Target, ...]:
    """Targets with symlinks resolved and aliases merged.  On merged-/usr systems
    /lib/modprobe.d IS /usr/lib/modprobe.d: inotify gives both paths one watch descriptor,
    so watching both would report events under either name and unscheduling one would
    silently end the other."""
    out: list[Target] = []
    for target in targets:
        real = Target(target.path.resolve(), target.patterns, target.exclude)
        if real not in out:
            out.append(real)
    return tuple(out)


def nearest_existing(path: Path) -> Path:
    while not path.is_dir() and path != path.parent:
        path = path.parent
    return path


def watch_points(targets: Iterable[Target]) -> set[Path]:
    """Where inotify watches must sit now: each existing target and its parent (to see the
    target deleted, renamed away or re-created), else its nearest existing ancestor."""
    points: set[Path] = set()
    for target in targets:
        if target.path.is_dir():
            points.update((target.path, target.path.parent))
        else:
            points.add(nearest_existing(target.path))
    return points


@dataclass(frozen=True, slots=True)
class Classified:
    relevant: tuple[str, ...]  # changed files that matter
    structural: bool  # a target or one of its ancestors appeared or went away


def classify(event_paths: Iterable[str], is_dir: bool, targets: Iterable[Target]) -> Classified:
    """Pure: which of an event's paths matter.  A directory event is structural when it
    names a target or an ancestor of one (watches must be re-armed)."""
    relevant: list[str] = []
    structural = False
    targets = tuple(targets)
    for raw in event_paths:
        path = Path(raw)
        if is_dir:
            if any(path == t.path or path in t.path.parents for t in targets):
                structural = True
                relevant.append(raw)
            continue
        if any(path.parent == t.path and t.wants(path.name) for t in targets):
            relevant.append(raw)
    return Classified(tuple(relevant), structural)


Fingerprint = frozenset[tuple[str, int, int, int]]


def fingerprint(targets: Iterable[Target]) -> Fingerprint:
    """(path, inode, size, mtime_ns) of every wanted name; lstat, so a /dev/null mask
    symlink counts as itself."""
    entries: set[tuple[str, int, int, int]] = set()
    for target in targets:
        try:
            names = [entry.name for entry in target.path.iterdir()]
        except OSError:
            continue
        for name in names:
            if not target.wants(name):
                continue
            path = target.path / name
            with contextlib.suppress(OSError):
                st = path.lstat()
                entries.add((str(path), st.st_ino, st.st_size, st.st_mtime_ns))
    return frozenset(entries)


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: Watcher) -> None:
        self._watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        if isinstance(event, WANTED_EVENTS):
            self._watcher._observed(event)


class Watcher:
    """Posts FilesChanged(paths) through `post` once per burst of relevant changes.

    `start()` arms the watches and starts two threads (watchdog's observer, and our
    debounce/reconcile worker, the only one that calls `post`); `stop()` ends both.
    """

    def __init__(
        self,
        paths: Paths,
        post: Post,
        debounce_s: float = 0.15,
        *,
        reconcile_s: float = RECONCILE_S,
        max_delay_s: float = MAX_DELAY_S,
        observer_factory: Any = Observer,
    ) -> None:
        self.targets = targets_for(paths)
        # What classification and watches use; re-resolved on every re-arm because a dir
        # may be replaced by a symlink (or the reverse).  Swapped whole: the observer
        # thread reads it without a lock.
        self._real = resolved(self.targets)
        self._post = post
        self._debounce_s = debounce_s
        self._reconcile_s = reconcile_s
        self._max_delay_s = max_delay_s
        self._observer = observer_factory()
        self._watches: dict[Path, tuple[Any, tuple[int, int]]] = {}
        self._cond = threading.Condition()
        self._pending: set[str] = set()
        self._structural = False
        self._first = self._last = 0.0
        self._stopping = False
        self.errors = 0  # failed flush/reconcile rounds (shown in status; retried)
        self._fingerprint: Fingerprint = frozenset()
        self._worker = threading.Thread(target=self._run, name="kmodd-watch", daemon=True)
        self._handler = _Handler(self)

    @property
    def watched(self) -> frozenset[Path]:
        """Where inotify watches sit right now (for status and tests)."""
        return frozenset(self._watches)

    def start(self) -> None:
        self._fingerprint = fingerprint(self._real)
        self._rearm()
        self._observer.start()
        self._worker.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._worker.is_alive():
            self._worker.join()
        self._observer.stop()
        if self._observer.is_alive():
            self._observer.join()

    # -- observer thread ---------------------------------------------------------------

    def _observed(self, event: FileSystemEvent) -> None:
        raw = [os.fsdecode(event.src_path)]
        if event.dest_path:
            raw.append(os.fsdecode(event.dest_path))
        found = classify(raw, event.is_directory, self._real)
        if not found.relevant:
            return
        with self._cond:
            now = time.monotonic()
            if not self._pending:
                self._first = now
            self._last = now
            self._pending.update(found.relevant)
            self._structural |= found.structural
            self._cond.notify_all()

    # -- worker thread -----------------------------------------------------------------

    def _run(self) -> None:
        next_reconcile = time.monotonic() + self._reconcile_s
        while True:
            with self._cond:
                batch = self._wait_for_batch(next_reconcile)
                if self._stopping:
                    return
            try:
                if batch is None:
                    next_reconcile = time.monotonic() + self._reconcile_s
                    self._reconcile()
                else:
                    self._flush(batch)
            except Exception:  # e.g. inotify watch limit; never end the thread: retry later
                self.errors += 1

    def _wait_for_batch(self, next_reconcile: float) -> set[str] | None:
        """Under the lock: the debounced batch, or None when a reconcile is due."""
        while not self._stopping and not self._pending:
            remaining = next_reconcile - time.monotonic()
            if remaining <= 0:
                return None
            self._cond.wait(remaining)
        while not self._stopping:
            due = min(self._last + self._debounce_s, self._first + self._max_delay_s)
            remaining = due - time.monotonic()
            if remaining <= 0:
                break
            self._cond.wait(remaining)
        batch, self._pending = self._pending, set()
        self._structural = False
        return batch

    def _flush(self, batch: set[str]) -> None:
        # Re-arm first, then post: the core's rescan happens after the new watches exist,
        # so a file written into a re-created dir is never missed.
        self._rearm()
        self._fingerprint = fingerprint(self._real)
        self._emit(batch)

    def _reconcile(self) -> None:
        self._rearm()
        now = fingerprint(self._real)
        if now != self._fingerprint:
            changed = {entry[0] for entry in now ^ self._fingerprint}
            self._fingerprint = now
            self._settle(changed)

    def _settle(self, changed: set[str]) -> None:
        """Queue what a reconcile found as a burst due in RECONCILE_SETTLE_S (sooner once
        inotify's own events for it arrive and go quiet): one FilesChanged for both."""
        with self._cond:
            start = time.monotonic()
            if not self._pending:
                self._first = start
            self._last = max(self._last, start + RECONCILE_SETTLE_S - self._debounce_s)
            self._pending.update(changed)
            self._cond.notify_all()

    def _emit(self, changed: set[str]) -> None:
        names = sorted(changed)
        if len(names) > PATHS_MAX:
            names = [*names[:PATHS_MAX], f"... and {len(names) - PATHS_MAX} more"]
        self._post(FilesChanged(tuple(names)))

    def _rearm(self) -> None:
        """Make the inotify watches match watch_points(): drop watches on dirs that are gone
        or were replaced (a dead emitter never recovers), add the missing ones."""
        self._real = resolved(self.targets)
        wanted = watch_points(self._real)
        for path, (watch, identity) in list(self._watches.items()):
            if path not in wanted or _identity(path) != identity:
                del self._watches[path]
                # The emitter of a deleted dir may already be gone; nothing to undo then.
                with contextlib.suppress(Exception):
                    self._observer.unschedule(watch)
        for path in wanted - self._watches.keys():
            current = _identity(path)
            if current is None:
                continue
            try:
                watch = self._observer.schedule(
                    self._handler, str(path), recursive=False, event_filter=list(WANTED_EVENTS)
                )
            except OSError:
                continue  # vanished meanwhile; the next reconcile tries again
            self._watches[path] = (watch, current)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino)
