"""The file watcher with the real inotify observer on a temporary --root."""

from __future__ import annotations

import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from watchdog.events import FileMovedEvent

from kmodd.daemon.events import Event, FilesChanged
from kmodd.daemon.watch import (
    RECONCILE_SETTLE_S,
    Target,
    Watcher,
    classify,
    fingerprint,
    targets_for,
    watch_points,
)
from kmodd.paths import Paths

RELEASE = "6.1.0-test"
DEADLINE_S = 10.0


class Inbox:
    """What the watcher posted, with deadline-bounded waits (no bare sleeps)."""

    def __init__(self) -> None:
        self.events: queue.Queue[Event] = queue.Queue()

    def post(self, event: Event) -> None:
        self.events.put(event)

    def next(self) -> FilesChanged:
        event = self.events.get(timeout=DEADLINE_S)
        assert isinstance(event, FilesChanged)
        return event

    def until(self, wanted: Callable[[set[str]], bool]) -> set[str]:
        """Collect posted paths until `wanted` holds for their union."""
        seen: set[str] = set()
        while not wanted(seen):
            seen.update(self.next().paths)
        return seen


def make_root(tmp_path: Path) -> Paths:
    root = tmp_path / "root"
    for sub in ("etc/modprobe.d", "usr/lib/modprobe.d", "etc/kmodd/policy.d", "lib/modules"):
        (root / sub).mkdir(parents=True)
    (root / "lib/modules" / RELEASE).mkdir()
    return Paths(root=root, release=RELEASE, runtime_dir=tmp_path / "run-kmodd")


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    return make_root(tmp_path)


@pytest.fixture
def inbox() -> Inbox:
    return Inbox()


@pytest.fixture
def watcher(paths: Paths, inbox: Inbox) -> Iterator[Watcher]:
    w = Watcher(paths, inbox.post)
    w.start()
    yield w
    w.stop()


def test_in_place_write(paths: Paths, inbox: Inbox, watcher: Watcher) -> None:
    conf = paths.root / "etc/modprobe.d/local.conf"
    conf.write_text("blacklist dccp\n")
    assert inbox.next().paths == (str(conf),)


def test_atomic_rename(paths: Paths, inbox: Inbox, watcher: Watcher) -> None:
    policy = paths.root / "etc/kmodd/policy.d/10-base.yaml"
    tmp = policy.with_name(".10-base.yaml.XXXX")
    tmp.write_text("kmodd: 1\n")
    tmp.replace(policy)
    assert inbox.next().paths == (str(policy),)


def test_sed_in_place(paths: Paths, inbox: Inbox, watcher: Watcher) -> None:
    conf = paths.root / "usr/lib/modprobe.d/dist.conf"
    conf.write_text("options foo bar=1\n")
    inbox.until(lambda seen: str(conf) in seen)
    subprocess.run(["sed", "-i", "s/bar=1/bar=2/", str(conf)], check=True)
    event = inbox.next()
    assert event.paths == (str(conf),)  # sed's sedXXXXXX temp file is not reported


def test_ignored_names_post_nothing(paths: Paths, inbox: Inbox, watcher: Watcher) -> None:
    d = paths.root / "etc/modprobe.d"
    for name in (".hidden.conf", "x.conf~", ".x.conf.swp", "notes.txt", "x.conf.dpkg-new"):
        (d / name).write_text("junk\n")
    (paths.root / "etc/kmodd/policy.d/a.conf").write_text("wrong dir pattern\n")
    sentinel = d / "zz.conf"
    sentinel.write_text("\n")
    # Had any ignored write produced an event, it would arrive first or ride along.
    assert inbox.next().paths == (str(sentinel),)


def test_own_enforcement_file_is_not_a_change(paths: Paths, inbox: Inbox, watcher: Watcher) -> None:
    ours = paths.enforcement_file
    ours.parent.mkdir(parents=True)
    inbox.next()  # ROOT/run/modprobe.d appeared: structural
    tmp = ours.with_name(f".{ours.name}.tmp1")  # how the daemon writes it: temp + rename
    tmp.write_text("install dccp /bin/false\n")
    tmp.replace(ours)
    other = ours.with_name("50-admin.conf")
    other.write_text("\n")
    assert inbox.next().paths == (str(other),)


def test_burst_of_200_is_one_event(paths: Paths, inbox: Inbox) -> None:
    # Wide windows so the 200 writes (a few ms here) fall in one burst even on a loaded
    # CI machine: only a 1 s stall between two writes could split it.
    w = Watcher(paths, inbox.post, debounce_s=1.0, max_delay_s=60.0)
    w.start()
    try:
        d = paths.root / "etc/kmodd/policy.d"
        expected = {str(d / f"{i:03}.yaml") for i in range(200)}
        for name in expected:
            Path(name).write_text("kmodd: 1\n")
        assert set(inbox.next().paths) == expected
    finally:
        w.stop()


def test_deleted_and_recreated_dir_keeps_being_watched(
    paths: Paths, inbox: Inbox, watcher: Watcher
) -> None:
    d = paths.root / "etc/kmodd/policy.d"
    (d / "a.yaml").write_text("kmodd: 1\n")
    inbox.until(lambda seen: str(d / "a.yaml") in seen)
    shutil.rmtree(d)
    inbox.until(lambda seen: str(d) in seen)
    d.mkdir()
    (d / "b.yaml").write_text("kmodd: 1\n")
    inbox.until(lambda seen: str(d / "b.yaml") in seen or str(d) in seen)
    # And again, well after the re-arm: the new dir itself is watched.
    (d / "c.yaml").write_text("kmodd: 1\n")
    inbox.until(lambda seen: str(d / "c.yaml") in seen)
    assert d in watcher.watched


def test_dir_renamed_away_and_replaced(paths: Paths, inbox: Inbox, watcher: Watcher) -> None:
    d = paths.root / "etc/modprobe.d"
    d.rename(d.with_name("modprobe.d.old"))
    d.mkdir()
    inbox.until(lambda seen: str(d) in seen)
    (d / "new.conf").write_text("\n")
    inbox.until(lambda seen: str(d / "new.conf") in seen)


def test_dirs_that_do_not_exist_yet(paths: Paths, inbox: Inbox, watcher: Watcher) -> None:
    run_policy = paths.root / "run/kmodd/policy.d"
    assert paths.root in watcher.watched  # nearest existing ancestor of run/...
    run_policy.mkdir(parents=True)
    (run_policy / "99-runtime.yaml").write_text("kmodd: 1\n")
    # Seen as the creation of ROOT/run (the only watch that existed); the core rescans.
    assert inbox.next().paths
    (run_policy / "98-more.yaml").write_text("kmodd: 1\n")
    inbox.until(lambda seen: str(run_policy / "98-more.yaml") in seen)
    assert run_policy in watcher.watched


def test_depmod_style_replace_of_modules_dep_bin(
    paths: Paths, inbox: Inbox, watcher: Watcher
) -> None:
    dep = paths.module_dir / "modules.dep.bin"
    tmp = paths.module_dir / "modules.dep.bin.tmp"  # depmod writes NAME.tmp, then renames
    tmp.write_bytes(b"\xb0\x07\xf4\x57")
    tmp.replace(dep)
    assert inbox.next().paths == (str(dep),)


def test_module_dir_appearing_after_start(tmp_path: Path, inbox: Inbox) -> None:
    paths = make_root(tmp_path)
    paths.module_dir.rmdir()
    w = Watcher(paths, inbox.post)
    w.start()
    try:
        paths.module_dir.mkdir()
        (paths.module_dir / "modules.dep").write_text("")
        inbox.until(
            lambda seen: (
                str(paths.module_dir / "modules.dep") in seen or str(paths.module_dir) in seen
            )
        )
    finally:
        w.stop()


def test_merged_usr_aliases_share_one_watch(tmp_path: Path, inbox: Inbox) -> None:
    # Debian 12 layout: ROOT/lib -> usr/lib, so lib/modprobe.d and lib/modules/REL are
    # the same dirs as usr/lib/modprobe.d and usr/lib/modules/REL.
    root = tmp_path / "root"
    (root / "usr/lib/modprobe.d").mkdir(parents=True)
    (root / "usr/lib/modules" / RELEASE).mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "lib").symlink_to("usr/lib")
    paths = Paths(root=root, release=RELEASE, runtime_dir=tmp_path / "run-kmodd")
    w = Watcher(paths, inbox.post)
    w.start()
    try:
        inodes = [(p.stat().st_dev, p.stat().st_ino) for p in w.watched]
        assert len(inodes) == len(set(inodes))  # one watch per directory, whatever its name
        (root / "lib/modprobe.d/a.conf").write_text("\n")
        assert inbox.next().paths == (str(root / "usr/lib/modprobe.d/a.conf"),)
        dep = root / "usr/lib/modules" / RELEASE / "modules.dep"
        (root / "lib/modules" / RELEASE / "modules.dep").write_text("")
        # Reported under the one real path (a slow machine may repeat a.conf first).
        assert inbox.until(lambda seen: str(dep) in seen) <= {
            str(root / "usr/lib/modprobe.d/a.conf"),
            str(dep),
        }
    finally:
        w.stop()


class DeafObserver:
    """An observer that never reports anything: inotify overflow at its worst."""

    def schedule(self, *_: Any, **__: Any) -> object:
        return object()

    def unschedule(self, _: object) -> None:
        pass

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def is_alive(self) -> bool:
        return False

    def join(self) -> None:
        pass


def test_periodic_reconcile_catches_lost_events(paths: Paths, inbox: Inbox) -> None:
    w = Watcher(paths, inbox.post, reconcile_s=0.05, observer_factory=DeafObserver)
    w.start()
    try:
        conf = paths.root / "etc/modprobe.d/lost.conf"
        conf.write_text("install dccp /bin/false\n")
        assert inbox.next().paths == (str(conf),)
        conf.unlink()
        assert inbox.next().paths == (str(conf),)
    finally:
        w.stop()


def test_a_late_inotify_event_joins_what_the_reconcile_found(paths: Paths, inbox: Inbox) -> None:
    # The reconcile sees the new file first; its inotify event, late (observer lag under
    # TCG), arrives 0.3 s after.  Before RECONCILE_SETTLE_S these were two FilesChanged,
    # so one policy write built two generations (the VM scenario test_6 failed on it).
    w = Watcher(paths, inbox.post, reconcile_s=0.05, observer_factory=DeafObserver)
    w.start()
    try:
        policy = paths.root / "etc/kmodd/policy.d/05-late.yaml"
        tmp = policy.with_name(".05-late.yaml.tmp")
        tmp.write_text("kmodd: 1\n")
        tmp.rename(policy)
        time.sleep(0.3)  # the lag itself: the reconcile (every 0.05 s) has seen the file
        w._observed(FileMovedEvent(str(tmp), str(policy)))
        assert inbox.next().paths == (str(policy),)
        with pytest.raises(queue.Empty):
            inbox.events.get(timeout=RECONCILE_SETTLE_S + 0.5)
    finally:
        w.stop()


class FailingOnce:
    """A post that fails the first time (a core queue gone wrong, say)."""

    def __init__(self, inbox: Inbox) -> None:
        self.inbox = inbox
        self.calls = 0

    def __call__(self, event: Event) -> None:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("boom")
        self.inbox.post(event)


def test_worker_survives_a_failing_round(paths: Paths, inbox: Inbox) -> None:
    w = Watcher(paths, FailingOnce(inbox))
    w.start()
    try:
        (paths.root / "etc/modprobe.d/a.conf").write_text("\n")
        # The first round's post raised; a later write is still delivered.
        b = paths.root / "etc/modprobe.d/b.conf"
        event: Event | None = None
        for _ in range(int(DEADLINE_S)):  # rewrite until a round gets through, bounded
            b.write_text("\n")
            try:
                event = inbox.events.get(timeout=1)
                break
            except queue.Empty:
                continue
        assert isinstance(event, FilesChanged)
        assert w.errors == 1
    finally:
        w.stop()


def test_stop_is_prompt_and_final(paths: Paths, inbox: Inbox) -> None:
    w = Watcher(paths, inbox.post)
    w.start()
    w.stop()
    (paths.root / "etc/modprobe.d/after.conf").write_text("\n")
    assert not any(t.name == "kmodd-watch" for t in threading.enumerate())
    assert inbox.events.empty()


# -- pure parts ---------------------------------------------------------------------------


def test_targets_cover_all_dirs(paths: Paths) -> None:
    targets = {t.path: t.patterns for t in targets_for(paths)}
    excluded = {t.path: t.exclude for t in targets_for(paths) if t.exclude}
    assert excluded == {paths.enforcement_file.parent: {paths.enforcement_file.name}}
    for d in paths.modprobe_d_dirs:
        assert targets[d] == ("*.conf",)
    for d in paths.policy_dirs:
        assert targets[d] == ("*.yaml",)
    assert targets[paths.module_dir] == ("modules.*",)


def test_watch_points_are_parents_or_nearest_ancestors(paths: Paths) -> None:
    points = watch_points(targets_for(paths))
    root = paths.root
    assert {root / "etc/modprobe.d", root / "etc"} <= points
    assert root / "run" not in points  # does not exist: its nearest ancestor is watched
    assert root in points
    assert {paths.module_dir, root / "lib/modules"} <= points


@pytest.mark.parametrize(
    ("name", "wanted"),
    [
        ("a.yaml", True),
        (".a.yaml", False),
        ("a.yaml~", False),
        ("a.yaml.swp", False),
        ("#a.yaml#", False),
        ("a.yaml.tmp", False),
        ("a.yml", False),
        ("a.conf", False),
    ],
)
def test_policy_name_filter(name: str, wanted: bool) -> None:
    assert Target(Path("/p"), ("*.yaml",)).wants(name) is wanted


def test_classify_structural_and_file_events() -> None:
    targets = (Target(Path("/r/etc/modprobe.d"), ("*.conf",)),)
    assert classify(["/r/etc"], True, targets).structural
    assert classify(["/r/etc/modprobe.d"], True, targets).structural
    assert not classify(["/r/etc/other"], True, targets).relevant
    moved = classify(["/r/etc/modprobe.d/sedAb12", "/r/etc/modprobe.d/x.conf"], False, targets)
    assert moved.relevant == ("/r/etc/modprobe.d/x.conf",)
    assert not moved.structural
    assert not classify(["/r/etc/x.conf"], False, targets).relevant


def test_fingerprint_sees_mask_symlinks(paths: Paths) -> None:
    targets = targets_for(paths)
    before = fingerprint(targets)
    (paths.root / "etc/kmodd/policy.d/10-base.yaml").symlink_to("/dev/null")
    after = fingerprint(targets)
    assert {e[0] for e in after ^ before} == {str(paths.root / "etc/kmodd/policy.d/10-base.yaml")}
