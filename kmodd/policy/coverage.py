"""Which enforcement layer holds each deny rule, and what no layer holds (design §4).

A verdict is only worth its enforcement.  The layers (docs/policy.md "What each layer
can enforce"):

- `helper`: the kernel's request_module() runs kmodd-modprobe, which asks the daemon
  (the whole policy: request, class, source, requester keys) or, with the daemon down,
  the snapshot.  Only kernel autoloads pass here.
- `modprobe_d`: the rendered 00-kmodd.conf (`softdep NAME pre:` + `install NAME STUB`
  + `blacklist NAME`).  udev's kmod builtin, systemd-modules-load, an admin's modprobe
  and the real modprobe the helper runs all read it.  It knows module names and exact
  request names only: no source, class, requester or request glob.
- `kernel`: the BPF LSM program (kmodd/bpf): request names of the tree's table decided
  in-kernel, and the files of denied modules refused by identity (kmodd.policy.kernelcov
  says which).  Listed in `layers` only when the caller says it is active (detection, or
  the daemon's status); `RuleCoverage.kernel` says what it holds either way, so offline
  it reads "would enforce if active".
- `cmdline`: `module_blacklist=` / `initcall_blacklist=` (`kmodctl cmdline`); never
  reported as active here (kmodd cannot tell what the next boot's command line holds),
  only offered as the remedy.
- `udev`: the daemon's uevent listener records what udev asks for; it enforces nothing
  by itself (udev's loads are held by modprobe_d), so it is never an enforcing layer.

Nothing stops a built-in module: it is part of the kernel image.  The remedy is the
kernel command line (kmodd.kmod.builtin computes it for the tree).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from kmodd.helper import normalize
from kmodd.policy import compiler
from kmodd.policy.engine import CompiledPolicy, CompiledRule, Decision, Request, decide
from kmodd.policy.kernelcov import (
    KernelCoverage,
    blocking_rule,
    holds_decision,
    kernel_coverage,
    table_names,
)
from kmodd.policy.types import Mode, Source, Verdict


class Layer(StrEnum):
    KERNEL = "kernel"
    HELPER = "helper"
    MODPROBE_D = "modprobe_d"
    UDEV = "udev"
    CMDLINE = "cmdline"


@dataclass(frozen=True, slots=True)
class RuleCoverage:
    """How one deny rule is enforced on the tree."""

    rule: str
    layers: frozenset[Layer]  # layers that enforce this deny rule's denies
    gaps: tuple[str, ...]  # human sentences: what is NOT enforced and why
    remedy: str | None  # e.g. "add initcall_blacklist=algif_aead_init to the ..."
    location: str | None = None  # FILE:LINE of the rule
    modules: tuple[str, ...] = ()  # modules 00-kmodd.conf denies for this rule
    builtins: tuple[str, ...] = ()  # built-in modules the rule denies: nothing stops them
    unheld: tuple[str, ...] = ()  # modules it denies for some udev/cli loads, not held
    overblocks: tuple[str, ...] = ()  # rendered for udev/cli only: kernel requests too
    snapshot_gap: bool = False  # with the daemon down, the helper cannot hold it all
    kernel: KernelCoverage | None = None  # the kernel layer's share, active or not

    @property
    def enforced(self) -> bool:
        """Every deny of the rule is held by some layer."""
        return bool(self.layers) and not self.gaps


class CoverageTree(compiler.ModuleTree, Protocol):
    """What coverage needs from kmodd.kmod.context.KmodContext."""

    def builtin_names(self) -> tuple[str, ...]: ...


# Remedies are computed by kmodd.kmod.builtin for a tree; coverage only needs the text.
class RemedyFn(Protocol):
    def __call__(self, builtins: Collection[str], loadable: Collection[str]) -> str | None: ...


def default_remedy(builtins: Collection[str], loadable: Collection[str]) -> str | None:
    """The command-line arguments for BUILTINS (initcall_blacklist, by the <name>_init
    convention) and LOADABLE (module_blacklist); `kmodctl cmdline` says how sure."""
    args = []
    if builtins:
        args.append("initcall_blacklist=" + ",".join(f"{m}_init" for m in sorted(builtins)))
    if loadable:
        args.append("module_blacklist=" + ",".join(sorted(loadable)))
    if not args:
        return None
    return f"add {' '.join(args)} to the kernel command line (see `kmodctl cmdline`)"


@dataclass(frozen=True)
class _Generation:
    """What every rule's coverage is computed from, once per call."""

    policy: CompiledPolicy
    tree: CoverageTree
    walks: dict[str, compiler.Walk]
    rendered: dict[str, str]  # module -> rule, what 00-kmodd.conf denies
    builtins: frozenset[str]
    requests: frozenset[str]  # exact request names 00-kmodd.conf denies
    reach: compiler.Reach
    snapshot_rules: frozenset[str]  # request-glob deny rules the snapshot carries
    kernel_active: bool
    remedy: RemedyFn
    blocker: str | None  # the rule that keeps every request name out of the kernel table

    @classmethod
    def of(
        cls, policy: CompiledPolicy, tree: CoverageTree, kernel_active: bool, remedy: RemedyFn
    ) -> _Generation:
        reach = compiler.request_reach(tree)
        rendered, _builtin = compiler.rendered_denies(policy, tree, reach)
        walks = {m: compiler.module_walk(policy, m, reach) for m in tree.module_names()}
        requests = frozenset(n for n, _ in compiler.denied_requests(policy, tree, decide))
        carried = frozenset(r.info.id for r in compiler.kernel_request_denies(policy))
        return cls(
            policy, tree, walks, rendered, frozenset(tree.builtin_names()), requests, reach,
            carried, kernel_active, remedy, blocking_rule(policy),
        )  # fmt: skip

    def kernel(self, rule: CompiledRule, mine: Iterable[str]) -> KernelCoverage:
        return kernel_coverage(
            rule,
            in_kernel=self.blocker is None,
            mine=tuple(mine),
            builtins=self.builtins,
            blocker=self.blocker,
        )


def rule_coverage(
    policy: CompiledPolicy,
    tree: CoverageTree,
    *,
    kernel_active: bool = False,
    remedy: RemedyFn = default_remedy,
) -> tuple[RuleCoverage, ...]:
    """One RuleCoverage per deny rule of POLICY, in rule order, then the default when it
    denies."""
    if policy.mode is not Mode.ENFORCE:
        gap = (f"{policy.mode} mode: nothing is enforced",)
        rules = [r for r in policy.rules if r.info.verdict is Verdict.DENY]
        out = [RuleCoverage(r.info.id, frozenset(), gap, None, r.info.location) for r in rules]
        if policy.default is Verdict.DENY:
            out.append(RuleCoverage("default", frozenset(), gap, None))
        return tuple(out)
    gen = _Generation.of(policy, tree, kernel_active, remedy)
    out = [
        _one(gen, index)
        for index, rule in enumerate(policy.rules)
        if rule.info.verdict is Verdict.DENY
    ]
    if policy.default is Verdict.DENY:
        out.append(_default(gen))
    return tuple(out)


def rendered_modules(policy: CompiledPolicy, tree: compiler.ModuleTree) -> dict[str, str]:
    """module → rule for the modules the policy denies in modprobe.d's terms: those
    00-kmodd.conf renders plus the built-in ones it cannot (enforce mode only)."""
    denied, builtin = compiler.rendered_denies(policy, tree)
    return {**denied, **builtin}


def _subjects(gen: _Generation, rule: CompiledRule) -> tuple[str, ...]:
    """The modules RULE can deny: its `module` matches, else what its requests reach."""
    if rule.modules is not None:
        return tuple(m for m in gen.walks if rule.modules.matches(normalize(m)))
    reached = gen.reach(rule) if rule.requests is not None else None
    return tuple(sorted(reached)) if reached is not None else tuple(gen.walks)


def _libkmod(rule: CompiledRule) -> bool:
    """The rule applies to loads that go through libkmod only (udev, cli)."""
    if rule.requester is not None:  # udev and admin loads have no requester
        return False
    return rule.sources is None or not rule.sources.isdisjoint(compiler.LIBKMOD_SOURCES)


def _unheld(gen: _Generation, index: int, subjects: Iterable[str]) -> tuple[str, ...]:
    """Subjects rule INDEX may deny for a udev/cli load that modprobe.d does not stop:
    not rendered, not built in, and the walk did not stop at an unconditional rule
    before INDEX (an earlier allow decides every load; None: a conditional allow stopped
    it, so later rules still decide other loads)."""
    out = []
    for module in subjects:
        walk = gen.walks[module]
        if module in gen.rendered or module in gen.builtins:
            continue
        if walk.verdict is None or index < walk.index:
            out.append(module)
    return tuple(out)


def _layers(gen: _Generation, rule: CompiledRule, held: bool, kernel: KernelCoverage) -> set[Layer]:
    layers = set()
    if rule.sources is None or Source.KERNEL in rule.sources:
        layers.add(Layer.HELPER)
    if gen.kernel_active and kernel.holds:
        layers.add(Layer.KERNEL)
    if held:
        layers.add(Layer.MODPROBE_D)
    return layers


def _one(gen: _Generation, index: int) -> RuleCoverage:
    rule = gen.policy.rules[index]
    rid = rule.info.id
    subjects = _subjects(gen, rule)
    mine = tuple(m for m in subjects if gen.rendered.get(m) == rid)
    names = sorted(n for n in gen.requests if rule.requests and rule.requests.matches(n))
    built = tuple(
        m
        for m in subjects
        if m in gen.builtins and gen.walks[m].rule == rid and gen.walks[m].verdict is Verdict.DENY
    )
    unheld = _unheld(gen, index, subjects) if _libkmod(rule) else ()
    over = mine if rule.sources is not None and Source.KERNEL not in rule.sources else ()
    from_kernel = rule.sources is None or Source.KERNEL in rule.sources
    snap = from_kernel and (
        rule.requester is not None
        or (rule.modules is None and bool(rule.requests and rule.requests.globs)
            and rid not in gen.snapshot_rules)
    )  # fmt: skip
    gaps = _gaps(rule, unheld=unheld, built=built, over=over, names=names, snapshot=snap)
    fix = gen.remedy(built, unheld) if built or unheld else None
    in_kernel = gen.kernel(rule, (*mine, *built))
    layers = _layers(gen, rule, bool(mine or names), in_kernel)
    return RuleCoverage(
        rid, frozenset(layers), gaps, fix, rule.info.location, mine, built, unheld, over, snap,
        in_kernel,
    )  # fmt: skip


def _gaps(
    rule: CompiledRule,
    *,
    unheld: tuple[str, ...],
    built: tuple[str, ...],
    over: tuple[str, ...],
    names: list[str],
    snapshot: bool,
) -> tuple[str, ...]:
    gaps = []
    if unheld:
        why = (
            "its request/class keys are invisible to kmod"
            if rule.requests is not None or rule.classes is not None
            else "an earlier conditional allow decides first"
        )
        held = f" (exact request names held: {_few(names)})" if names else ""
        gaps.append(
            f"udev and admin loads of {_few(unheld)} are not held by modprobe.d: {why}{held}"
        )
    if built:
        gaps.append(f"built into the kernel: {_few(built)}; no module layer can stop built-in code")
    if over:
        gaps.append(
            f"modprobe.d also refuses kernel requests for {_few(over)} that the policy may "
            "allow (kmod cannot tell the helper's modprobe from udev's); add source kernel "
            "or make the rule unconditional to agree"
        )
    if rule.requester is not None:
        gaps.append(
            "requester rule: decided for the exact requester in-kernel when the kernel layer "
            "is active (uid, unprivileged, user namespace; never gid/unit/container keys); "
            "otherwise by unknown_requester, in the daemon and the helper's snapshot alike"
        )
    elif snapshot:
        gaps.append(
            "with the daemon down, the helper's snapshot does not carry these request globs "
            "(an earlier request/class allow rule may decide first): names outside the "
            "snapshot are left to modprobe.d"
        )
    return tuple(gaps)


def _default(gen: _Generation) -> RuleCoverage:
    rule = CompiledRule(gen.policy.default_info, None, None, None, None)
    mine = tuple(m for m, r in gen.rendered.items() if r == "default")
    built = tuple(
        m
        for m, w in gen.walks.items()
        if m in gen.builtins and w.rule == "default" and w.verdict is Verdict.DENY
    )
    kernel = gen.kernel(rule, (*mine, *built))
    layers = _layers(gen, rule, bool(mine), kernel)
    unheld = _unheld(gen, len(gen.policy.rules), gen.walks)
    gaps = []
    if unheld:
        gaps.append(
            f"udev and admin loads of {_few(unheld)} are not held by modprobe.d: an earlier "
            "conditional allow decides first, the default deny holds for the other loads"
        )
    if built:
        gaps.append(f"built into the kernel: {_few(built)}; no module layer can stop it")
    fix = gen.remedy(built, unheld) if built or unheld else None
    return RuleCoverage(
        "default", frozenset(layers), tuple(gaps), fix, None, mine, built, unheld, kernel=kernel
    )


def _few(names: Iterable[str], limit: int = 5) -> str:
    items = list(names)
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def enforcing_layers(
    decision: Decision,
    source: Source,
    *,
    rendered: Collection[str] = (),
    builtins: Collection[str] = (),
    kernel_active: bool = False,
    kernel_names: Collection[str] | None = None,
    kernel_in_table: bool = True,
) -> frozenset[Layer]:
    """The layers that make DECISION hold for a request from SOURCE.

    RENDERED: modules (and exact request names) of the current 00-kmodd.conf
    (Generation.denied_modules); BUILTINS: the tree's built-in modules.  An allow, a
    permissive/learn decision or a deny of built-in code is enforced by nothing.
    KERNEL_NAMES: the kernel layer's table names (kernelcov.table_names; None: every
    kernel request counts), KERNEL_IN_TABLE: the generation decides names in-kernel."""
    if decision.verdict is not Verdict.DENY or decision.mode is not Mode.ENFORCE:
        return frozenset()
    module = decision.module
    if module is not None and module in builtins:
        return frozenset()
    layers: set[Layer] = set()
    if source is Source.KERNEL:
        layers.add(Layer.HELPER)
    if kernel_active and _kernel_holds(
        decision, source, rendered, kernel_names, in_table=kernel_in_table
    ):
        layers.add(Layer.KERNEL)
    held = (module is not None and module in rendered) or (normalize(decision.request) in rendered)
    if held:
        layers.add(Layer.MODPROBE_D)
    return frozenset(layers)


def _kernel_holds(
    decision: Decision,
    source: Source,
    rendered: Collection[str],
    names: Collection[str] | None,
    *,
    in_table: bool,
) -> bool:
    if names is None:
        return source is Source.KERNEL
    module = decision.module
    return holds_decision(
        source, decision.request, module, names=names, in_kernel=in_table, files=rendered
    )


def not_enforced_reason(
    decision: Decision, source: Source, layers: frozenset[Layer], builtins: Collection[str] = ()
) -> str | None:
    """Why a deny DECISION is not enforced (journal `KMODD_ENFORCED=no: …`), or None."""
    if decision.verdict is not Verdict.DENY:
        return None
    if decision.mode is not Mode.ENFORCE:
        return f"{decision.mode} mode"
    if decision.module is not None and decision.module in builtins:
        return f"coverage: {decision.module} is built into the kernel"
    if layers:
        return None
    return (
        f"coverage: no layer holds rule {decision.rule} for {source} requests "
        "(modprobe.d cannot express its conditions)"
    )


def check(policy: CompiledPolicy, tree: CoverageTree, **kwargs: bool) -> list[str]:
    """`coverage: RULE (FILE:LINE): GAP` lines for every gap (validate warnings)."""
    lines = []
    for cov in rule_coverage(policy, tree, kernel_active=kwargs.get("kernel_active", False)):
        where = f" ({cov.location})" if cov.location else ""
        for gap in cov.gaps:
            text = f"coverage: rule {cov.rule}{where}: {gap}"
            lines.append(text + (f"; remedy: {cov.remedy}" if cov.remedy else ""))
    return lines


__all__ = [
    "CoverageTree",
    "KernelCoverage",
    "Layer",
    "Request",
    "RuleCoverage",
    "check",
    "enforcing_layers",
    "not_enforced_reason",
    "rendered_modules",
    "rule_coverage",
    "table_names",
]
