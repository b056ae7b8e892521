"""Last good generation: the daemon's side of persistence (docs/operations.md "Last good").

- Every generation built and published is persisted (kmodd.daemon.persist), except one
  whose mode the kernel command line overrode: the escape hatch is for one boot.
- Generation numbers continue from the store across restarts.
- A generation that lost a policy dir the last good one had files in is refused, unless
  the admin accepted it (`kmodctl reload --accept-removed DIR`).
- With an invalid policy at start, the stored generation is published (the helper decides
  from its snapshot, modprobe reads its file) and READY means just that.  With no stored
  generation (a first boot), the shipped policy alone is built and enforced in its place
  (build_shipped): the machine keeps the baseline's denies rather than fail open.  With
  none of these the daemon says so and exits EXIT_NO_ENFORCEMENT rather than claim
  enforcement.
- The first build after a boot publish is renumbered to the stored generation when its
  output is the same, so nothing is swapped and one generation keeps one number.

Builds run on the builder thread (one at a time); accept() and fall_back() on the core
thread; the accepted set is the only state both touch (under a lock).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from kmodd import bootpublish
from kmodd.atomic import write_atomic
from kmodd.contract.journal import Priority
from kmodd.contract.status import FallbackInfo, LastGoodInfo
from kmodd.daemon import persist, records
from kmodd.daemon.generation import BuildOptions, Generation, build_generation, publish
from kmodd.daemon.journal import JournalSink
from kmodd.daemon.startup import CommitGate
from kmodd.daemon.treeindex import TreeIndex
from kmodd.errors import KmoddError
from kmodd.host.cmdline import read_mode_override
from kmodd.paths import POLICY_DIRS, Paths
from kmodd.policy.loader import check_lost_dirs, dirs_in_use
from kmodd.policy.types import Mode

EXIT_NO_ENFORCEMENT = 78  # EX_CONFIG; kmodd.service: RestartPreventExitStatus=78


def renumber(gen: Generation, number: int) -> Generation:
    """GEN as generation NUMBER (the snapshot header names it; nothing else does)."""
    head, sep, rows = gen.snapshot.partition(b"\n\n")
    lines = [
        b"generation %d" % number if line.startswith(b"generation ") else line
        for line in head.split(b"\n")
    ]
    return dataclasses.replace(gen, number=number, snapshot=b"\n".join(lines) + sep + rows)


class LastGood:
    def __init__(self, paths: Paths, options: BuildOptions, sink: JournalSink) -> None:
        self.paths = paths
        self.options = options
        self.sink = sink
        self.kernel_modprobe: str | None = None  # set when the daemon manages the sysctl
        self.stored: persist.Stored | None = None
        self.refused: str | None = None
        self.fallback: FallbackInfo | None = None
        self.verified: str | None = None
        self.persist_note: str | None = None
        self.boot_published = self._read_published()
        self.last_dirs: tuple[str, ...] = ()
        self._highest = 0
        self._accepted: set[str] = set()
        self._lock = threading.Lock()

    def load(self) -> None:
        """Read the store at start (a refusal is loud, and then nothing is trusted)."""
        try:
            self.stored = persist.load(self.paths)
        except persist.StoreError as err:
            self.refused = str(err)
            self.sink.emit(records.notice(f"{err} ({err.hint})", Priority.ERR))
            return
        if self.stored is None:
            return
        self._highest = self.stored.number  # numbers continue even if a payload is bad
        self.last_dirs = self.stored.policy_dirs
        try:
            persist.payloads(self.paths, self.stored)  # ~1 ms: refuse now, not at fallback
        except persist.StoreError as err:
            self.refused = str(err)
            self.stored = None
            self.sink.emit(records.notice(str(err), Priority.ERR))

    # --- builds (builder thread) ----------------------------------------------------

    def next_number(self, current: Generation | None) -> int:
        return max(0 if current is None else current.number, self._highest) + 1

    def build(
        self,
        number: int,
        current: Generation | None,
        index: TreeIndex | None = None,
        gate: CommitGate | None = None,
    ) -> Generation:
        """Check the dirs, build (with what INDEX kept of the last build), publish and
        persist generation NUMBER (raises like build_generation; nothing is published or
        persisted then).  Publishing and persisting happen through GATE, all or nothing
        (a stopping daemon closes it: kmodd.daemon.startup)."""
        built_from = persist.inputs(self.paths, self.options.cmdline)  # before: see persist
        with self._lock:
            accepted = frozenset(self._accepted)
        check_lost_dirs(self.paths, self.last_dirs, accepted)
        dirs = dirs_in_use(self.paths)
        gen = build_generation(number, self.paths, self.options, index)
        with CommitGate().commit() if gate is None else gate.commit():
            try:
                if current is None:
                    gen = self._same_as_stored(gen, built_from)
                gen = publish(gen)
            except BaseException:
                gen.close()
                raise
            self._highest = max(self._highest, gen.number)
            self.last_dirs = dirs
            self.fallback = None  # a generation of the policy decides again
            with self._lock:
                self._accepted -= accepted
            self._persist(gen, dirs, built_from)
            self._mark_published(f"daemon generation {gen.number} hash {gen.hash}")
        return gen

    def build_shipped(
        self,
        number: int,
        errors: Sequence[str],
        index: TreeIndex | None = None,
        gate: CommitGate | None = None,
    ) -> Generation | None:
        """The policy is invalid (ERRORS) and no generation was ever stored: build and
        publish generation NUMBER from the shipped files alone (a higher dir's masks
        honoured), never persisted (it is not the admin's policy).  None when there is
        nothing shipped or that fails too (said in `refused`).  A broken file at first boot
        otherwise left the helper with no snapshot: it ran modprobe for every request
        (issue 14's real boot: nobody's AF_ALG bind loaded algif_aead)."""
        try:
            gen = build_generation(number, self.paths, self.options, index, shipped_only=True)
        except Exception as err:  # said in refused; the caller exits not ready
            self.refused = f"the shipped policy cannot stand in: {err}"
            return None
        if not gen.policy.files:
            gen.close()
            self.refused = f"no shipped policy files in /{POLICY_DIRS[0]} to stand in"
            return None
        shown = ", ".join(Path(f.path).name for f in gen.policy.files)
        verb = (
            "enforcing"
            if gen.mode is Mode.ENFORCE
            else f"deciding in {gen.mode.value} mode (nothing blocked) by"
        )
        why = (
            f"policy invalid ({len(errors)} error(s)) and no last good generation: {verb} "
            f"the shipped policy only (/{POLICY_DIRS[0]}: {shown}) as generation {number}; "
            "fix the policy, check it with `kmodctl validate`, then `kmodctl reload`"
        )
        gen = dataclasses.replace(gen, stands_in=why)
        with CommitGate().commit() if gate is None else gate.commit():
            try:
                gen = publish(gen)
            except BaseException:
                gen.close()
                raise
            self._highest = max(self._highest, gen.number)
            self._mark_published(f"daemon shipped-policy generation {gen.number} hash {gen.hash}")
        return gen

    def _same_as_stored(self, gen: Generation, built_from: persist.Inputs) -> Generation:
        stored = self.stored
        if stored is None or stored.hash != gen.hash or stored.inputs != built_from:
            return gen
        same = renumber(gen, stored.number)
        try:
            data = persist.payloads(self.paths, stored)
        except persist.StoreError:
            return gen
        if data["snapshot"] != same.snapshot or data["enforcement"] != gen.enforcement.encode():
            return gen
        self.verified = (
            f"generation {stored.number} rebuilt from the policy matches the last good one:"
            " kept its number, nothing swapped"
        )
        self.sink.emit(records.notice(self.verified))
        return same

    def _persist(self, gen: Generation, dirs: Sequence[str], built_from: persist.Inputs) -> None:
        if gen.mode_overridden:
            self.persist_note = "not persisted: the kernel command line set the mode"
            return
        stored = self.stored
        if stored is not None and (stored.number, stored.hash) == (gen.number, gen.hash):
            return
        record = persist.Record(
            number=gen.number,
            hash=gen.hash,
            policy_hash=gen.policy.hash,
            mode=gen.mode.value,
            enforcement=gen.enforcement.encode(),
            snapshot=gen.snapshot,
            policy_dirs=tuple(dirs),
            kernel_modprobe=self.kernel_modprobe,
        )
        try:
            persist.save(self.paths, record, built_from)
            self.stored = persist.load(self.paths)
            self.persist_note = None
        except (OSError, KmoddError) as err:
            self.persist_note = f"cannot persist generation {gen.number}: {err}"
            self.sink.emit(records.notice(self.persist_note, Priority.WARNING))

    # --- start without a policy (core thread) -----------------------------------------

    def fall_back(self, errors: Sequence[str], why: str | None = None) -> bool:
        """The policy is invalid (or, WHY, the first build never finished) and no
        generation is active: publish the stored one."""
        stored = self.stored
        if stored is None:
            return False
        override = read_mode_override(self.options.cmdline)
        if override is not None and override is not Mode.ENFORCE:
            # The escape hatch says block nothing: the stored generation would block.
            self.refused = f"kmodd.mode={override.value} on the kernel command line: not enforced"
            return False
        try:
            data = persist.payloads(self.paths, stored)
            write_atomic(self.paths.enforcement_file, data["enforcement"], create_dir=True)
            write_atomic(self.paths.snapshot, data["snapshot"], mode=0o600)
        except (OSError, KmoddError) as err:
            self.refused = str(err)
            self.sink.emit(records.notice(f"cannot enforce the last good: {err}", Priority.ERR))
            return False
        built = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stored.created))
        other = "" if stored.release == self.paths.release else f", for {stored.release}"
        why = why or f"policy invalid ({len(errors)} error(s))"
        text = (
            f"{why}: enforcing the last good generation "
            f"{stored.number} (built {built}{other}) from {self.paths.store_dir}; fix the "
            "policy, check it with `kmodctl validate`, then `kmodctl reload`"
        )
        self.fallback = FallbackInfo(generation=stored.number, hash=stored.hash, message=text)
        self.sink.emit(records.notice(text, Priority.ERR))
        self._mark_published(f"daemon last-good generation {stored.number} hash {stored.hash}")
        return True

    def enforcing(self, current: Generation | None) -> bool:
        return current is not None or self.fallback is not None

    def no_enforcement(self, errors: Sequence[str]) -> int:
        why = "" if self.refused is None else f" ({self.refused})"
        text = (
            f"no enforcement: the policy is invalid ({len(errors)} error(s)) and there is no "
            f"last good generation{why}; exiting {EXIT_NO_ENFORCEMENT} (not ready)"
        )
        self.sink.emit(records.notice(text, Priority.ERR))
        self._mark_published("none: " + text)
        return EXIT_NO_ENFORCEMENT

    def not_started(self, text: str, *, fall_back: bool) -> None:
        """The first build never finished (stopped, gave up: kmodd.daemon.startup).  What
        this boot published stays; else (FALL_BACK) the stored generation is published;
        else `none: TEXT` tells kmodd-boot-wait to let udev go now, not after its 90 s."""
        if self.boot_published is not None and not self.boot_published.startswith("none"):
            return
        if fall_back and self.fall_back([text], why=text):
            return
        self._mark_published("none: " + text)

    # --- kmodctl reload --accept-removed (core thread) --------------------------------

    def accept(self, values: object) -> str | None:
        """Accept the removal of policy dirs for the next build; an error text or None."""
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            return "'accept_removed' must be a list of policy dir paths"
        rels = []
        for value in values:
            rel = self._policy_rel(value)
            if rel is None:
                known = ", ".join(f"/{d}" for d in POLICY_DIRS)
                return f"{value[:200]!r} is not a policy dir (one of {known})"
            rels.append(rel)
        if rels:
            with self._lock:
                self._accepted.update(rels)
            shown = ", ".join(f"/{r}" for r in rels)
            self.sink.emit(records.notice(f"reload accepts the removal of {shown}"))
        return None

    def _policy_rel(self, value: str) -> str | None:
        wanted = value.rstrip("/")
        for rel in POLICY_DIRS:
            if wanted in (rel, f"/{rel}", str(self.paths.root / rel)):
                return rel
        return None

    # --- status and the runtime marker --------------------------------------------------

    def _read_published(self) -> str | None:
        try:
            text = (self.paths.runtime_dir / bootpublish.PUBLISHED_FILE).read_text()
        except (OSError, UnicodeDecodeError):
            return None
        return text.strip()[:500] or None

    def _mark_published(self, text: str) -> None:
        path = self.paths.runtime_dir / bootpublish.PUBLISHED_FILE
        try:
            write_atomic(path, text.encode() + b"\n")
        except (OSError, KmoddError) as err:
            self.sink.emit(records.notice(f"cannot write {path}: {err}", Priority.WARNING))

    def status(self) -> LastGoodInfo:
        s = self.stored
        with self._lock:
            pending = sorted(f"/{rel}" for rel in self._accepted)
        return {
            "store": str(self.paths.store_dir),
            "stored": None
            if s is None
            else {
                "generation": s.number,
                "hash": s.hash,
                "release": s.release,
                "created": s.created,
                "inputs": s.inputs.digest,
                "policy_dirs": [f"/{d}" for d in s.policy_dirs],
            },
            "refused": self.refused,
            "boot_published": self.boot_published,
            "fallback": self.fallback,
            "verified": self.verified,
            "persist_note": self.persist_note,
            "accept_removed_pending": pending,
        }
