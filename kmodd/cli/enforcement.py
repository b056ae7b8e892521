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
from pathlib import Path

from kmodd.bpf.detect import detect
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
from kmodd.policy.kernelcov import KernelCoverage, blocking_rule, holds_decision, table_names
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


PIN_DIR = Path("sys/fs/bpf/kmodd")  # kmodd.bpf.layer.PIN_DIR, without loading libbpf


@dataclass(frozen=True, slots=True)
class KernelState:
    """Whether the kernel layer runs where the verdicts apply.  ACTIVE None: offline
    (--root is not /), so it "would enforce if active"."""

    active: bool | None
    reason: str

    @property
    def word(self) -> str:
        return {True: "active", False: "inactive", None: "offline"}[self.active]


NOT_ASKED = KernelState(None, "not asked")


def kernel_state(paths: Paths) -> KernelState:
    """Detection (kmodd.bpf.detect) plus kmodd's pins: the bpf LSM runs and the programs
    are attached.  Offline roots are not asked: their kernel is not this one."""
    if paths.root != Path("/"):
        return KernelState(None, f"root {paths.root} is not the running system")
    support = detect()
    if not support.active:
        return KernelState(False, support.reason)
    if not (paths.root / PIN_DIR).is_dir():
        return KernelState(
            False, f"{support.reason}, but no kmodd programs are pinned under /{PIN_DIR}"
        )
    return KernelState(True, f"{support.reason}; programs pinned under /{PIN_DIR}")


@dataclass(frozen=True, slots=True)
class Coverage:
    """Coverage of every deny rule, or why it could not be computed."""

    rules: tuple[RuleCoverage, ...] = ()
    unavailable: str | None = None  # e.g. "no module tree for 6.1.0-1-amd64 under /"

    def of(self, rule: str) -> RuleCoverage | None:
        return next((c for c in self.rules if c.rule == rule), None)

    def incomplete(self) -> tuple[RuleCoverage, ...]:
        return tuple(c for c in self.rules if c.gaps)


def compute(paths: Paths, policy: CompiledPolicy, kernel_active: bool = False) -> Coverage:
    """Coverage on the tree of PATHS; `unavailable` says why when there is no tree."""
    try:
        with KmodContext.from_paths(paths) as ctx:
            return Coverage(rule_coverage(policy, ctx, kernel_active=kernel_active))
    except KmoddError as err:
        return Coverage(unavailable=err.message)


@dataclass(frozen=True, slots=True)
class DecisionEnforcement:
    """Who holds one decision: its rule's coverage and the layers for its source."""

    rule: RuleCoverage | None
    layers: frozenset[Layer]
    not_enforced: str | None  # why not (None: enforced, or not a deny)
    kernel: KernelState = NOT_ASKED
    kernel_holds: bool = False  # the kernel layer refuses it (or would, if active)


def of_decision(
    policy: CompiledPolicy, ctx: KmodContext, d: Decision, kernel: KernelState
) -> DecisionEnforcement:
    """As the daemon journals it (KMODD_ENFORCED/KMODD_LAYERS), from the rendering this
    policy gets on CTX's tree: its modules and its exact request names; the kernel layer
    by the same reading as its tables (kmodd.policy.kernelcov)."""
    if d.verdict is not Verdict.DENY:
        return DecisionEnforcement(None, frozenset(), None, kernel)
    modules = set(rendered_modules(policy, ctx))
    rendered = modules | {
        normalize(n) for n, _rule in compiler.denied_requests(policy, ctx, decide)
    }
    builtins = frozenset(ctx.builtin_names())
    names, in_table = table_names(ctx), blocking_rule(policy) is None
    files = modules - builtins
    holds = d.module not in builtins and holds_decision(
        d.source, d.request, d.module, names=names, in_kernel=in_table, files=files
    )
    layers = enforcing_layers(
        d,
        d.source,
        rendered=rendered,
        builtins=builtins,
        kernel_active=bool(kernel.active),
        kernel_names=names,
        kernel_in_table=in_table,
    )
    covered = rule_coverage(policy, ctx, kernel_active=bool(kernel.active))
    cov = next((c for c in covered if c.rule == d.rule), None)
    why = not_enforced_reason(d, d.source, layers, builtins)
    return DecisionEnforcement(cov, layers, why, kernel, holds)


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


def kernel_json(kernel: KernelCoverage | None) -> dict[str, object] | None:
    """What the kernel layer holds of one rule, whether or not it is active."""
    if kernel is None:
        return None
    return {
        "holds": kernel.holds,
        "requests": kernel.requests,
        "files": list(kernel.files),
        "leaves": list(kernel.leaves),
    }


def rule_json(cov: RuleCoverage) -> dict[str, object]:
    return {
        "rule": cov.rule,
        "layers": [str(layer) for layer in ordered(cov.layers)],
        "enforced": not cov.gaps,
        "gaps": list(cov.gaps),
        "remedy": cov.remedy,
        "kernel": kernel_json(cov.kernel),
    }


def kernel_words(holds: bool, state: KernelState) -> str:
    """One phrase: what the kernel layer does with a deny it holds (or not)."""
    if not holds:
        return "does not hold it (the helper and modprobe.d decide)"
    if state.active:
        return "refuses it in-kernel"
    return f"would refuse it in-kernel if active ({state.word}: {state.reason})"


def rule_kernel_text(cov: RuleCoverage) -> str | None:
    """`kernel layer holds: request names in-kernel, 3 module files` for a rule."""
    k = cov.kernel
    if k is None:
        return None
    parts = (["its kernel requests of the table's names"] if k.requests else []) + (
        [f"the files of {_few(k.files)}"] if k.files else []
    )
    return "; ".join(parts) if parts else "nothing"


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
    out.append(f"  kernel layer: {kernel_words(found.kernel_holds, found.kernel)}")
    if found.not_enforced:
        out.append(f"  not enforced: {found.not_enforced}")
    if found.rule is not None:
        out += [f"  rule {found.rule.rule} leaves open: {gap}" for gap in found.rule.gaps]
        held = rule_kernel_text(found.rule)
        if held is not None:
            out.append(f"  rule {found.rule.rule} in the kernel layer: {held}")
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
        "kernel_layer": {
            "state": found.kernel.word,
            "active": found.kernel.active,
            "reason": found.kernel.reason,
            "holds": found.kernel_holds,
            "would_enforce": found.kernel_holds and not found.kernel.active,
        },
    }


def _few(names: Iterable[str], limit: int = 5) -> str:
    items = list(names)
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
