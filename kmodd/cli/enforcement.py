"""Which layers enforce each deny rule, for `validate`, `explain` and `status`.

kmodd.policy.coverage (the renderer's own account: what it rendered into modprobe.d and
the helper snapshot, what kmod or the kernel makes impossible) says it per rule; this
module turns that into the operator's words: located warnings for `validate`, a line for
`explain`, a list for `status`.  Computing coverage needs the module tree (built-ins and
softdeps are facts of the tree): without one, callers say so rather than guess.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from kmodd.errors import Issue, KmoddError
from kmodd.helper import normalize
from kmodd.kmod.context import KmodContext
from kmodd.paths import Paths
from kmodd.policy import compiler
from kmodd.policy.coverage import (
    Layer,
    RuleCoverage,
    enforcing_layers,
    not_enforced_reason,
    rendered_modules,
    rule_coverage,
)
from kmodd.policy.engine import CompiledPolicy, Decision, decide
from kmodd.policy.model import PolicySet
from kmodd.policy.types import Verdict

# What each layer stops, in the words of docs/policy.md "what each layer can enforce".
LAYER_WORDS = {
    Layer.KERNEL: "kernel (BPF LSM: every request_module)",
    Layer.HELPER: "kernel requests (the modprobe helper)",
    Layer.MODPROBE_D: "modprobe.d (udev, systemd-modules-load, modprobe)",
    Layer.UDEV: "udev device decisions",
    Layer.CMDLINE: "kernel command line (module_blacklist=, initcall_blacklist=)",
}
LAYER_ORDER = (Layer.KERNEL, Layer.HELPER, Layer.MODPROBE_D, Layer.UDEV, Layer.CMDLINE)


@dataclass(frozen=True, slots=True)
class Coverage:
    """Coverage of every deny rule, or why it could not be computed."""

    rules: tuple[RuleCoverage, ...] = ()
    unavailable: str | None = None  # e.g. "no module tree for 6.1.0-1-amd64 under /"

    def of(self, rule: str) -> RuleCoverage | None:
        return next((c for c in self.rules if c.rule == rule), None)

    def incomplete(self) -> tuple[RuleCoverage, ...]:
        return tuple(c for c in self.rules if c.gaps)


def compute(paths: Paths, policy: CompiledPolicy) -> Coverage:
    """Coverage on the tree of PATHS; `unavailable` says why when there is no tree."""
    try:
        with KmodContext.from_paths(paths) as ctx:
            return Coverage(rule_coverage(policy, ctx))
    except KmoddError as err:
        return Coverage(unavailable=err.message)


@dataclass(frozen=True, slots=True)
class DecisionEnforcement:
    """Who holds one decision: its rule's coverage and the layers for its source."""

    rule: RuleCoverage | None
    layers: frozenset[Layer]
    not_enforced: str | None  # why not (None: enforced, or not a deny)


def of_decision(policy: CompiledPolicy, ctx: KmodContext, d: Decision) -> DecisionEnforcement:
    """As the daemon journals it (KMODD_ENFORCED/KMODD_LAYERS), from the rendering this
    policy gets on CTX's tree: its modules and its exact request names."""
    if d.verdict is not Verdict.DENY:
        return DecisionEnforcement(None, frozenset(), None)
    rendered = set(rendered_modules(policy, ctx))
    rendered |= {normalize(n) for n, _rule in compiler.denied_requests(policy, ctx, decide)}
    builtins = frozenset(ctx.builtin_names())
    layers = enforcing_layers(d, d.source, rendered=rendered, builtins=builtins)
    cov = next((c for c in rule_coverage(policy, ctx) if c.rule == d.rule), None)
    return DecisionEnforcement(cov, layers, not_enforced_reason(d, d.source, layers, builtins))


def ordered(layers: Iterable[Layer]) -> list[Layer]:
    found = set(layers)
    return [layer for layer in LAYER_ORDER if layer in found]


def layers_text(layers: Iterable[Layer]) -> str:
    names = [LAYER_WORDS[layer] for layer in ordered(layers)]
    return ", ".join(names) if names else "nothing (not enforced at all)"


def warnings(policy: PolicySet, coverage: Coverage) -> list[Issue]:
    """One located warning per deny rule that no layer fully enforces."""
    where = {r.rule.id: r for r in policy.rules}
    out = []
    for cov in coverage.incomplete():
        located = where.get(cov.rule)
        path, line, column = (
            (located.path, located.line, located.column) if located else ("<policy>", 0, 0)
        )
        enforced = layers_text(cov.layers)
        message = f"warning: rule {cov.rule!r} is not fully enforced: " + "; ".join(cov.gaps)
        message += f" (enforced by: {enforced})"
        out.append(Issue(path, line, column, message, cov.remedy))
    return out


def rule_json(cov: RuleCoverage) -> dict[str, object]:
    return {
        "rule": cov.rule,
        "layers": [str(layer) for layer in ordered(cov.layers)],
        "enforced": not cov.gaps,
        "gaps": list(cov.gaps),
        "remedy": cov.remedy,
    }


def coverage_json(coverage: Coverage) -> dict[str, object]:
    return {
        "available": coverage.unavailable is None,
        "unavailable": coverage.unavailable,
        "rules": [rule_json(c) for c in coverage.rules],
    }


def explain_lines(found: DecisionEnforcement) -> list[str]:
    """`explain`'s lines for a deny: who holds it, and what its rule leaves open."""
    if found.rule is None and not found.layers and found.not_enforced is None:
        return []
    out = [f"  enforced by: {layers_text(found.layers)}"]
    if found.not_enforced:
        out.append(f"  not enforced: {found.not_enforced}")
    if found.rule is not None:
        out += [f"  rule {found.rule.rule} leaves open: {gap}" for gap in found.rule.gaps]
        if found.rule.remedy:
            out.append(f"  remedy: {found.rule.remedy}")
    return out


def decision_json(found: DecisionEnforcement) -> dict[str, object] | None:
    if found.rule is None and not found.layers and found.not_enforced is None:
        return None
    return {
        "layers": [str(layer) for layer in ordered(found.layers)],
        "enforced": found.not_enforced is None,
        "not_enforced": found.not_enforced,
        "rule": None if found.rule is None else rule_json(found.rule),
    }
