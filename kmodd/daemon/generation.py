"""Policy generations: load -> validate -> compile -> render, all or nothing, then publish.

A Generation is immutable (apart from its decision cache) and owned by the core thread: it
holds the libkmod context the decisions resolve against, the compiled policy, the rendered
enforcement text and the helper snapshot.  A failed build raises and leaves nothing
behind; the core keeps serving the last good generation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from kmodd import helper
from kmodd.atomic import write_atomic
from kmodd.errors import InvalidInputError, KmoddError
from kmodd.host.cmdline import PROC_CMDLINE, read_mode_override
from kmodd.kmod.context import KmodContext, config_dirs, config_key, index_key
from kmodd.kmod.model import Resolution
from kmodd.kmod.provenance import Provenance
from kmodd.paths import ENFORCEMENT_FILE, Paths
from kmodd.policy import compiler, engine
from kmodd.policy.loader import load_policy
from kmodd.policy.model import PolicySet
from kmodd.policy.requester import RequesterFacts
from kmodd.policy.types import Mode, Source

# Distinct (name, source) decisions remembered per generation.  Request names are
# attacker-chosen (`mount -t <anything>` asks for fs-<anything>), so the cache is bounded
# (FIFO); the working set of a real system is a few hundred names.  Names that resolve to
# no module are not cached at all: deciding one again is a failed index lookup and no
# probe, and they are what a flood of made-up names is made of (at 16,384 entries those
# grew the daemon by ~7 MB over make bench's 100,000 decisions).
DECISION_CACHE_MAX = 4096
MASK_DIR = "kmod-mask"  # in the runtime dir: hides our own enforcement file from decisions


@dataclass(frozen=True, slots=True)
class BuildOptions:
    modprobe: str = helper.DEFAULT_MODPROBE  # the real modprobe, for the snapshot header
    deny_stub: str = compiler.DEFAULT_DENY_STUB  # `install NAME STUB NAME` (layer 2)
    cmdline: Path = PROC_CMDLINE  # kmodd.mode=permissive escape hatch


@dataclass(frozen=True, slots=True)
class Conflict:
    """A modprobe.d line that would bypass or reshape a deny (reported, not fatal)."""

    kind: str  # "install" (another install command wins) or "alias" (maps onto a denied module)
    module: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind} conflict for {self.module}: {self.detail}"


@dataclass(frozen=True)
class Generation:
    number: int
    hash: str  # sha256 of policy + effective mode + rendered enforcement
    paths: Paths
    kmod: KmodContext
    policy: PolicySet
    compiled: engine.CompiledPolicy
    mode_overridden: bool  # the kernel command line set the mode
    enforcement: str
    snapshot: bytes
    conflicts: tuple[Conflict, ...]
    denied_modules: frozenset[str]  # modules rendered as denied (enforce mode)
    created: float = field(default_factory=time.time)
    # what the build resolved (the snapshot's names): the kernel layer's tables reuse it
    resolutions: Mapping[str, Resolution] = field(default_factory=dict, compare=False, repr=False)
    _decisions: dict[tuple[str, Source, RequesterFacts | None], engine.Decision] = field(
        default_factory=dict, compare=False, repr=False
    )

    @property
    def mode(self) -> Mode:
        return self.compiled.mode

    def decide(
        self, name: str, source: Source, requester: RequesterFacts | None = None
    ) -> engine.Decision:
        """Decide NAME for SOURCE and REQUESTER (cached; core thread only: libkmod is not
        thread-safe).  A policy without requester rules ignores the requester, so its
        cache holds one entry per name whoever asks."""
        if not self.compiled.uses_requester:
            requester = None
        key = (name, source, requester)
        found = self._decisions.get(key)
        if found is None:
            request = engine.Request(name, source, requester)
            found = engine.decide(request, self.kmod.resolve(name), self.compiled)
            if not found.modules:
                return found
            if len(self._decisions) >= DECISION_CACHE_MAX:
                del self._decisions[next(iter(self._decisions))]
            self._decisions[key] = found
        return found

    def close(self) -> None:
        self.kmod.close()


def error_lines(err: BaseException) -> list[str]:
    """Every problem of a failed build, one FILE:LINE:COL: message per line."""
    if isinstance(err, InvalidInputError):
        return [str(issue) for issue in err.issues]
    if isinstance(err, KmoddError):
        return [str(err)]
    if isinstance(err, OSError) and err.filename is not None:
        return [f"{err.filename}: {err.strerror}"]
    return [f"internal error: {type(err).__name__}: {err}"]


def _config_paths(paths: Paths) -> tuple[str, ...]:
    return (str(paths.runtime_dir / MASK_DIR), *config_dirs(paths.root))


def _decision_context(paths: Paths) -> KmodContext:
    """A libkmod context that sees every modprobe.d file except our own enforcement file
    (_write_mask first: an empty file of the same basename in a dir listed first masks it, as kmod's
    first-basename-wins rule says): decisions must see the real module graph, not the
    install stubs of the previous generation."""
    return KmodContext.from_paths(paths, config_paths=_config_paths(paths))


def _write_mask(paths: Paths) -> None:
    mask = paths.runtime_dir / MASK_DIR
    write_atomic(mask / Path(ENFORCEMENT_FILE).name, b"", create_dir=True)


# --- resolutions kept from one build to the next -----------------------------------------
#
# Resolving the ~4,700 snapshot names through libkmod is about half of a build, and a
# policy edit does not change what a name resolves to: only modprobe.d or the module
# tree (depmod) does.  So the last build's resolutions are kept, keyed by a digest of
# the modprobe.d files (kmod's view, content included: libkmod itself only notices dir
# mtimes) and the identity of every index file, taken BEFORE the build opens its
# context: a change that races the build makes the key differ next time, never the
# reverse.  Plain data, not the libkmod context: that one belongs to the core thread
# while the builder runs.
RESOLUTIONS_MAX = 32_768  # the snapshot's names plus the policy's exact request names


@dataclass(frozen=True, slots=True)
class _Resolutions:
    key: tuple[object, ...]
    by_name: dict[str, Resolution]


_kept: _Resolutions | None = None
_kept_lock = threading.Lock()


def _resolution_key(paths: Paths) -> tuple[object, ...] | None:
    config = config_key(_config_paths(paths))
    tree = index_key(paths.root / "lib/modules" / paths.release)
    return None if config is None or tree is None else (config, tree)


class _Resolver:
    """The context for the compiler, answering resolve() from the kept resolutions."""

    def __init__(self, ctx: KmodContext, known: dict[str, Resolution]) -> None:
        self.ctx = ctx
        self.known = known  # a copy: grows with what this build resolves

    def resolve(self, name: str) -> Resolution:
        found = self.known.get(name)
        if found is None:
            found = self.known[name] = self.ctx.resolve(name)
        return found

    def module_names(self) -> tuple[str, ...]:
        return self.ctx.module_names()

    def alias_patterns(self) -> tuple[tuple[str, str], ...]:
        return self.ctx.alias_patterns()

    def config_aliases(self) -> tuple[tuple[str, str], ...]:
        return self.ctx.config_aliases()


def _kept_for(key: tuple[object, ...] | None) -> dict[str, Resolution]:
    with _kept_lock:
        kept = _kept
    return dict(kept.by_name) if key is not None and kept is not None and kept.key == key else {}


def _keep(key: tuple[object, ...] | None, by_name: dict[str, Resolution]) -> None:
    global _kept  # noqa: PLW0603 -- one slot per process, see above
    if key is not None and len(by_name) <= RESOLUTIONS_MAX:
        with _kept_lock:
            _kept = _Resolutions(key, by_name)


def build_generation(number: int, paths: Paths, options: BuildOptions) -> Generation:
    """Build generation NUMBER (raises InvalidInputError/KmoddError; nothing published)."""
    policy = load_policy(paths)
    override = read_mode_override(options.cmdline)
    compiled = engine.compile_policy(policy, mode=override)
    _write_mask(paths)
    key = _resolution_key(paths)
    ctx = _decision_context(paths)
    tree = _Resolver(ctx, _kept_for(key))
    try:
        enforcement = compiler.render_enforcement(compiled, tree, deny_stub=options.deny_stub)
        digest = hashlib.sha256()
        for part in (policy.hash, compiled.mode.value, enforcement):
            digest.update(part.encode() + b"\0")
        content_hash = digest.hexdigest()
        snapshot = compiler.render_snapshot(compiled, tree, engine.decide, number, options.modprobe)
    except BaseException:
        ctx.close()
        raise
    _keep(key, tree.known)
    return Generation(
        number=number,
        hash=content_hash,
        paths=paths,
        kmod=ctx,
        policy=policy,
        compiled=compiled,
        mode_overridden=override is not None and override is not policy.mode,
        enforcement=enforcement,
        snapshot=snapshot,
        conflicts=(),
        denied_modules=frozenset(_rendered_denials(enforcement)),
        resolutions=tree.known,
    )


def _rendered_denials(enforcement: str) -> dict[str, str]:
    """module -> install command, from the `install NAME CMD` lines we rendered."""
    found = {}
    for line in enforcement.splitlines():
        words = line.split(None, 2)
        if len(words) == 3 and words[0] == "install":
            found[words[1]] = words[2]
    return found


def publish(gen: Generation) -> Generation:
    """Write the enforcement file and the snapshot atomically, then check (with a fresh
    context that sees exactly what modprobe sees) which modprobe.d lines conflict.

    Both or neither: when the snapshot cannot be written (a full runtime dir), the previous
    enforcement file is put back, so the published files keep describing the generation
    that still decides."""
    previous = _read_nofollow(gen.paths.enforcement_file)
    write_atomic(gen.paths.enforcement_file, gen.enforcement.encode(), create_dir=True)
    try:
        write_atomic(gen.paths.snapshot, gen.snapshot, mode=0o600)  # the helper runs as root
    except BaseException:
        if previous is not None:
            with contextlib.suppress(OSError, KmoddError):
                write_atomic(gen.paths.enforcement_file, previous)
        raise
    conflicts = find_conflicts(gen.paths, _rendered_denials(gen.enforcement))
    return dataclasses.replace(gen, conflicts=tuple(conflicts))


def _read_nofollow(path: Path) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as handle:
        return handle.read()


def find_conflicts(paths: Paths, denials: dict[str, str]) -> list[Conflict]:
    """modprobe.d lines that bypass or reshape a rendered deny, located FILE:LINE by
    kmodd.kmod.provenance (kmod's own parse and first-match rules)."""
    if not denials:
        return []
    prov = Provenance.from_paths(paths, kernel_cmdline=False)
    ours = str(paths.enforcement_file)
    conflicts = []
    for module in sorted(denials):
        line = prov.install_line(module)
        if line is not None and line.path != ours:
            detail = f"{line.location()}: `{line.text}` is what kmod runs, not kmodd's deny stub"
            conflicts.append(Conflict("install", module, detail))
        for alias in prov.aliases_onto(module):
            if alias.path != ours:
                detail = f"{alias.location()}: `{alias.text}` maps {alias.target} onto it"
                conflicts.append(Conflict("alias", module, detail))
    return conflicts
