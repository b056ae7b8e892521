"""Policy generations: load -> validate -> compile -> render, all or nothing, then publish.

A Generation is immutable and owned by the core thread (its decisions are cached by the
core's Decider, kmodd.daemon.decider): it
holds the libkmod context the decisions resolve against, the compiled policy, the rendered
enforcement text and the helper snapshot.  A failed build raises and leaves nothing
behind; the core keeps serving the last good generation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from kmodd import helper
from kmodd.atomic import write_atomic
from kmodd.daemon.treeindex import TreeIndex
from kmodd.errors import InvalidInputError, KmoddError
from kmodd.host.cmdline import PROC_CMDLINE, read_mode_override
from kmodd.kmod.context import KmodContext, config_dirs, config_key, index_key
from kmodd.kmod.initramfs import PolicyRecord, policy_record
from kmodd.kmod.model import Resolution
from kmodd.kmod.provenance import Provenance
from kmodd.paths import ENFORCEMENT_FILE, MASK_DIR, Paths
from kmodd.policy import compiler, engine
from kmodd.policy.coverage import (
    Layer,
    RuleCoverage,
    enforcing_layers,
    not_enforced_reason,
    rule_coverage,
)
from kmodd.policy.loader import load_policy
from kmodd.policy.model import PolicySet
from kmodd.policy.requester import RequesterFacts
from kmodd.policy.types import Mode, Source


@dataclass(frozen=True, slots=True)
class BuildOptions:
    modprobe: str = helper.DEFAULT_MODPROBE  # the real modprobe, for the snapshot header
    deny_stub: str = compiler.DEFAULT_DENY_STUB  # `install NAME STUB NAME` (layer 2)
    cmdline: Path = PROC_CMDLINE  # kmodd.mode=permissive escape hatch


class ConflictKind(StrEnum):
    INSTALL = "install"  # another install command for a denied module wins
    ALIAS = "alias"  # a modprobe.d alias maps a name onto a denied module


@dataclass(frozen=True, slots=True)
class Conflict:
    """A modprobe.d line that would bypass or reshape a deny (reported, not fatal)."""

    kind: ConflictKind
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
    # Which layers hold each deny rule (kmodd.policy.coverage; status, journal) and the
    # tree's built-ins (nothing can deny those): computed by the builder, ~30 ms.
    coverage: tuple[RuleCoverage, ...] = ()
    builtins: frozenset[str] = frozenset()
    initramfs: PolicyRecord | None = None  # what the current initramfs carries (status)
    created: float = field(default_factory=time.time)
    # what the build resolved (the snapshot's names): the kernel layer's tables reuse it
    resolutions: Mapping[str, Resolution] = field(default_factory=dict, compare=False, repr=False)
    # The snapshot's work, which the kernel layer's tables would otherwise redo (~250 ms
    # of a ~930 ms build natively, ~20 s under TCG): the tree's snapshot names (key ->
    # name, compiler.snapshot_names) and each snapshot key's decision as a kernel request
    # with no requester (the decision for every requester when no rule has a requester key)
    table_names: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)
    kernel_decisions: Mapping[str, engine.Decision] = field(
        default_factory=dict, compare=False, repr=False
    )
    # Built from the shipped policy alone, standing in for an invalid one: why (status)
    stands_in: str | None = None

    @property
    def mode(self) -> Mode:
        return self.compiled.mode

    def decide(
        self, name: str, source: Source, requester: RequesterFacts | None = None
    ) -> engine.Decision:
        """Decide NAME for SOURCE and REQUESTER (uncached: the Decider caches; core thread
        only, libkmod is not thread-safe)."""
        request = engine.Request(name, source, requester)
        return engine.decide(request, self.kmod.resolve(name), self.compiled)

    def enforcement_of(self, d: engine.Decision) -> tuple[frozenset[Layer], str | None]:
        """The layers that hold deny D, and why it is not enforced (None: it is)."""
        layers = enforcing_layers(d, d.source, rendered=self.denied_modules, builtins=self.builtins)
        return layers, not_enforced_reason(d, d.source, layers, self.builtins)

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
    # No resolution cache of its own (cache_size=0): the core's Decider is the one
    # decision cache, and it keeps no name that resolves to nothing (a flood).
    return KmodContext(paths.root, paths.release, config_paths=_config_paths(paths), cache_size=0)


def _write_mask(paths: Paths) -> None:
    mask = paths.runtime_dir / MASK_DIR
    write_atomic(mask / Path(ENFORCEMENT_FILE).name, b"", create_dir=True)


def _resolution_key(paths: Paths) -> tuple[object, ...] | None:
    """What the kept resolutions are valid for (see kmodd.daemon.treeindex)."""
    config = config_key(_config_paths(paths))
    tree = index_key(paths.module_dir)  # lib/modules or usr/lib/modules (kmodd.paths)
    return None if config is None or tree is None else (config, tree)


class _Resolver:
    """The context for the compiler: resolve() from the kept resolutions, the alias index
    as the TreeIndex keeps it (the request-shaped part: all the compiler reads of it)."""

    def __init__(self, ctx: KmodContext, known: dict[str, Resolution], index: TreeIndex) -> None:
        self.ctx = ctx
        self.known = known  # a copy: grows with what this build resolves
        self.index = index

    def resolve(self, name: str) -> Resolution:
        found = self.known.get(name)
        if found is None:
            found = self.known[name] = self.ctx.resolve(name)
        return found

    def module_names(self) -> tuple[str, ...]:
        return self.ctx.module_names()

    def builtin_names(self) -> tuple[str, ...]:
        return self.ctx.builtin_names()

    def alias_patterns(self) -> tuple[tuple[str, str], ...]:
        return self.index.alias_patterns(self.ctx)

    def config_aliases(self) -> tuple[tuple[str, str], ...]:
        return self.ctx.config_aliases()

    def config_softdeps(self) -> tuple[tuple[str, str], ...]:
        return self.ctx.config_softdeps()


def build_generation(
    number: int,
    paths: Paths,
    options: BuildOptions,
    index: TreeIndex | None = None,
    *,
    shipped_only: bool = False,
) -> Generation:
    """Build generation NUMBER (raises InvalidInputError/KmoddError; nothing published).
    INDEX: what the previous build kept (the Core passes its own; None: start afresh).
    SHIPPED_ONLY: from the shipped policy files alone (kmodd.daemon.lastgood)."""
    index = TreeIndex() if index is None else index
    policy = load_policy(paths, shipped_only=shipped_only)
    override = read_mode_override(options.cmdline)
    compiled = engine.compile_policy(policy, mode=override)
    _write_mask(paths)
    key = _resolution_key(paths)
    ctx = _decision_context(paths)
    tree = _Resolver(ctx, index.resolutions(key), index)
    try:
        enforcement = compiler.render_enforcement(compiled, tree, deny_stub=options.deny_stub)
        digest = hashlib.sha256()
        for part in (policy.hash, compiled.mode.value, enforcement):
            digest.update(part.encode() + b"\0")
        content_hash = digest.hexdigest()
        decided: dict[str, engine.Decision] = {}
        snapshot = compiler.render_snapshot(
            compiled, tree, engine.decide, number, options.modprobe, decided=decided
        )
        table_names = compiler.snapshot_names(tree)  # the tree's alone (kernel_tables)
        covered = rule_coverage(compiled, tree)
        builtins = frozenset(tree.builtin_names())
        initramfs = policy_record(paths.root, paths.release)
    except BaseException:
        ctx.close()
        raise
    index.keep(key, tree.known)
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
        coverage=covered,
        builtins=builtins,
        initramfs=initramfs,
        resolutions=tree.known,
        table_names=table_names,
        kernel_decisions=decided,
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
            conflicts.append(Conflict(ConflictKind.INSTALL, module, detail))
        for alias in prov.aliases_onto(module):
            if alias.path != ours:
                detail = f"{alias.location()}: `{alias.text}` maps {alias.target} onto it"
                conflicts.append(Conflict(ConflictKind.ALIAS, module, detail))
    return conflicts
