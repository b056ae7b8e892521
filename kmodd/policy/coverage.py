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
- `kernel`: the BPF LSM program (branch bpf), only when the caller says it is active.
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
    modules: tuple[str, ...] = ()  # modules of the tree the rule denies in modprobe.d
    builtins: tuple[str, ...] = ()  # built-in modules the rule matches

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


def rule_coverage(
    policy: CompiledPolicy,
    tree: CoverageTree,
    *,
    kernel_active: bool = False,
    remedy: RemedyFn = default_remedy,
) -> tuple[RuleCoverage, ...]:
    """One RuleCoverage per deny rule of POLICY, in rule order."""
    builtins = frozenset(tree.builtin_names())
    rendered = rendered_modules(policy, tree)
    requests = {name for name, _rule in compiler.denied_requests(policy, tree, decide)}
    out = []
    for index, rule in enumerate(policy.rules):
        if rule.info.verdict is Verdict.DENY:
            out.append(
                _one(
                    policy,
                    tree,
                    index,
                    builtins=builtins,
                    rendered=rendered,
                    requests=requests,
                    kernel_active=kernel_active,
                    remedy=remedy,
                )
            )
    if policy.default is Verdict.DENY:
        out.append(
            _default(
                policy,
                tree,
                builtins=builtins,
                rendered=rendered,
                kernel_active=kernel_active,
                remedy=remedy,
            )
        )
    return tuple(out)


def rendered_modules(policy: CompiledPolicy, tree: compiler.ModuleTree) -> dict[str, str]:
    """module → rule for the modules 00-kmodd.conf denies (enforce mode only)."""
    if policy.mode is not Mode.ENFORCE:
        return {}
    out = {}
    for module in tree.module_names():
        found = compiler.module_verdict(policy, module)
        if found is not None and found[0] is Verdict.DENY:
            out[module] = found[1]
    return out


def _matched_modules(rule: CompiledRule, names: Iterable[str]) -> tuple[str, ...]:
    if rule.modules is None:
        return ()
    return tuple(m for m in names if rule.modules.matches(normalize(m)))


def _kernel_layers(rule: CompiledRule, kernel_active: bool) -> set[Layer]:
    if rule.sources is not None and Source.KERNEL not in rule.sources:
        return set()
    return {Layer.HELPER, Layer.KERNEL} if kernel_active else {Layer.HELPER}


def _one(
    policy: CompiledPolicy,
    tree: CoverageTree,
    index: int,
    *,
    builtins: frozenset[str],
    rendered: dict[str, str],
    requests: set[str],
    kernel_active: bool,
    remedy: RemedyFn,
) -> RuleCoverage:
    rule = policy.rules[index]
    rid = rule.info.id
    if policy.mode is not Mode.ENFORCE:
        return RuleCoverage(
            rid,
            frozenset(),
            (f"{policy.mode} mode: nothing is enforced",),
            None,
            rule.info.location,
        )
    layers = _kernel_layers(rule, kernel_active)
    gaps: list[str] = []
    matched = _matched_modules(rule, tree.module_names())
    mine = tuple(m for m in matched if rendered.get(m) == rid and m not in builtins)
    built = tuple(m for m in matched if m in builtins)
    libkmod_sources = rule.sources is None or not rule.sources.isdisjoint(compiler.LIBKMOD_SOURCES)
    if mine:
        layers.add(Layer.MODPROBE_D)
    if rule.modules is None and rule.requests is not None:
        exact = sorted(n for n in requests if rule.requests.matches(normalize(n)))
        if exact:
            layers.add(Layer.MODPROBE_D)
        if libkmod_sources:
            gaps.append(_request_gap(rule, exact))
    elif libkmod_sources:
        gaps.extend(
            _module_gaps(policy, rule, matched=matched, mine=mine, built=built, rendered=rendered)
        )
    if built:
        gaps.append(f"built into the kernel: {_few(built)}; no module layer can stop built-in code")
    if rule.requester is not None:
        gaps.append(
            "requester rule: only kernel autoloads with attribution are matched (udev and "
            "admin loads have no requester; the rule never applies to them)"
        )
    loadable = tuple(m for m in matched if m not in builtins)
    fix = remedy(built, loadable) if built or (gaps and loadable) else None
    return RuleCoverage(rid, frozenset(layers), tuple(gaps), fix, rule.info.location, mine, built)


def _module_gaps(
    policy: CompiledPolicy,
    rule: CompiledRule,
    *,
    matched: tuple[str, ...],
    mine: tuple[str, ...],
    built: tuple[str, ...],
    rendered: dict[str, str],
) -> list[str]:
    gaps = []
    conditional = rule.requests is not None or rule.classes is not None
    if conditional and rule.requester is None:
        gaps.append(
            "request/class keys: modprobe.d cannot tell which request loads a module, so "
            "udev and admin loads of these modules are not held by this rule"
        )
    elif rule.requester is None:
        other = sorted(
            m for m in matched if m not in mine and m not in built and rendered.get(m) is None
        )
        if other:
            gaps.append(
                f"{_few(other)}: an earlier conditional allow decides first, so "
                "modprobe.d cannot hold the deny for udev and admin loads"
            )
    if rule.sources is not None and Source.KERNEL not in rule.sources and mine:
        gaps.append(
            "modprobe.d also stops kernel requests for "
            f"{_few(mine)} that the policy allows (kmod cannot tell the helper's modprobe "
            "from udev's); add source kernel or make the rule unconditional to agree"
        )
    del policy
    return gaps


def _request_gap(rule: CompiledRule, exact: list[str]) -> str:
    assert rule.requests is not None
    if rule.requests.globs or rule.classes is not None or rule.sources is not None:
        return (
            "request globs, class and source keys are seen by the helper only: udev and "
            "admin loads by other names are not held"
            + (f" (exact names rendered: {_few(exact)})" if exact else "")
        )
    return "module names are left to module rules: loading the module by its name is not held"


def _default(
    policy: CompiledPolicy,
    tree: CoverageTree,
    *,
    builtins: frozenset[str],
    rendered: dict[str, str],
    kernel_active: bool,
    remedy: RemedyFn,
) -> RuleCoverage:
    layers = {Layer.HELPER, Layer.KERNEL} if kernel_active else {Layer.HELPER}
    mine = tuple(m for m, r in rendered.items() if r == "default" and m not in builtins)
    if mine:
        layers.add(Layer.MODPROBE_D)
    denied_builtins = tuple(
        m
        for m in sorted(builtins)
        if compiler.module_verdict(policy, m) == (Verdict.DENY, "default")
    )
    gaps = []
    if denied_builtins:
        gaps.append(f"built into the kernel: {_few(denied_builtins)}; no module layer can stop it")
    del tree
    return RuleCoverage(
        "default",
        frozenset(layers),
        tuple(gaps),
        remedy(denied_builtins, ()) if denied_builtins else None,
        None,
        mine,
        denied_builtins,
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
) -> frozenset[Layer]:
    """The layers that make DECISION hold for a request from SOURCE.

    RENDERED: modules (and exact request names) of the current 00-kmodd.conf
    (Generation.denied_modules); BUILTINS: the tree's built-in modules.  An allow, a
    permissive/learn decision or a deny of built-in code is enforced by nothing."""
    if decision.verdict is not Verdict.DENY or decision.mode is not Mode.ENFORCE:
        return frozenset()
    module = decision.module
    if module is not None and module in builtins:
        return frozenset()
    layers: set[Layer] = set()
    if source is Source.KERNEL:
        layers.add(Layer.HELPER)
        if kernel_active:
            layers.add(Layer.KERNEL)
    held = (module is not None and module in rendered) or (normalize(decision.request) in rendered)
    if held:
        layers.add(Layer.MODPROBE_D)
    return frozenset(layers)


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
    "Layer",
    "Request",
    "RuleCoverage",
    "check",
    "enforcing_layers",
    "not_enforced_reason",
    "rendered_modules",
    "rule_coverage",
]
