"""Render a policy generation for the two enforcement layers that do not ask the daemon.

(a) `render_enforcement`: ROOT/run/modprobe.d/00-kmodd.conf.  udev's kmod builtin,
    systemd-modules-load and an admin's modprobe use libkmod in-process and never call
    the helper; they honour modprobe.d.  `install NAME STUB NAME` is what really blocks
    (kmod runs the command instead of loading, STUB exits 1); `blacklist NAME` also
    stops udev's alias loads quietly.  kmod's lookup order (research/kmod.md §2.1) makes
    `install REQUEST …` win for names that are neither modules nor config aliases, which
    is how exact request names (net-pf-5, fs-cramfs) are neutralised.
(b) `render_snapshot`: the helper's fallback table when the daemon does not answer, in
    the format kmodd/helper.py documents (SNAPSHOT_MAGIC … `KEY a|d RULE` … end).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Protocol

from kmodd import helper
from kmodd.kmod.model import Resolution
from kmodd.paths import HELPER_PATH
from kmodd.policy.engine import (
    CompiledPolicy,
    CompiledRule,
    Decision,
    Request,
    decide,
    is_glob,
)
from kmodd.policy.requests import KERNEL_REQUEST_PREFIXES
from kmodd.policy.types import Mode, Source, Verdict

# kmod runs install commands through /bin/sh -c without appending the name, so the
# renderer appends it: `install NAME STUB NAME` runs `STUB NAME` = `helper --deny NAME`.
DEFAULT_DENY_STUB = f"{HELPER_PATH} --deny"
# Names written into a shell command line must be inert: module names and kernel
# request names are [A-Za-z0-9_.:-]; anything else is left out (and said so).
_SHELL_SAFE = re.compile(r"^[A-Za-z0-9_.:+-]{1,128}$")
DecideFn = Callable[[Request, Resolution, CompiledPolicy], Decision]


class ModuleTree(Protocol):
    """What the compiler needs from kmodd.kmod.context.KmodContext."""

    def resolve(self, name: str) -> Resolution: ...
    def module_names(self) -> tuple[str, ...]: ...
    def alias_patterns(self) -> tuple[tuple[str, str], ...]: ...
    def config_aliases(self) -> tuple[tuple[str, str], ...]: ...


def module_verdict(policy: CompiledPolicy, module: str) -> tuple[Verdict, str] | None:
    """The verdict on MODULE that holds for every request, source and class, or None.

    Walk the rules in order as decide() would for a load-set module: a rule whose
    `module` key does not match is skipped; an unconditional rule decides; a
    conditional allow (request/class/source keys) means some request may load the module,
    so nothing can be rendered; a conditional deny leaves the others to later rules.
    """
    hits = policy.module_hits(module)
    for index, rule in enumerate(policy.rules):
        if rule.modules is not None and index not in hits:
            continue
        if not _conditional(rule):
            return rule.info.verdict, rule.info.id
        if rule.info.verdict is Verdict.ALLOW:
            return None
    return policy.default, "default"


def _conditional(rule: CompiledRule) -> bool:
    """The rule holds only for some requests (a requester key: only for some requesters,
    which modprobe.d cannot tell apart)."""
    return (
        rule.requests is not None
        or rule.classes is not None
        or rule.sources is not None
        or rule.requester is not None
    )


def exact_request_aliases(tree: ModuleTree) -> tuple[str, ...]:
    """Wildcard-free, kernel-request-shaped aliases of the tree and of modprobe.d."""
    names = set(_request_shaped(tree.alias_patterns()))
    names.update(_request_shaped(tree.config_aliases()))
    return tuple(sorted(names))


# The tree's part of exact_request_aliases, for the last alias tuple seen: a context
# returns the same tuple object while modules.alias.bin is unchanged (KmodContext
# .alias_patterns), and filtering its ~30,000 patterns costs ~50 ms per call.
_tree_requests: tuple[tuple[tuple[str, str], ...], frozenset[str]] | None = None


def _request_shaped(pairs: tuple[tuple[str, str], ...]) -> frozenset[str]:
    global _tree_requests  # noqa: PLW0603 -- one slot per process, see above
    memo = _tree_requests
    if memo is not None and memo[0] is pairs:
        return memo[1]
    found = frozenset(
        p
        for p, _module in pairs
        if not is_glob(p) and helper.normalize(p).startswith(KERNEL_REQUEST_PREFIXES)
    )
    if len(pairs) > 1000:  # a tree's index, not a modprobe.d list
        _tree_requests = (pairs, found)
    return found


def denied_requests(
    policy: CompiledPolicy, tree: ModuleTree, decide_fn: DecideFn
) -> list[tuple[str, str]]:
    """(request, rule) for request names a rule without a module key denies from every
    source: exact names of deny rules plus tree aliases their globs match.

    Module names are left out: kmod applies `install NAME` to the module NAME whatever
    name it was reached by (fs-ext4 → ext4), which would block requests the live policy
    allows; module rules are the way to block a module."""
    candidates: set[str] = set()
    aliases = exact_request_aliases(tree)
    for rule in policy.rules:
        if rule.info.verdict is not Verdict.DENY or rule.requests is None:
            continue
        candidates.update(rule.requests.exact)
        candidates.update(a for a in aliases if rule.requests.matches(helper.normalize(a)))
    candidates.difference_update(tree.module_names())
    out = []
    for name in sorted(candidates):
        decisions = [decide_fn(Request(name, s), tree.resolve(name), policy) for s in Source]
        if all(d.verdict is Verdict.DENY and _by_request(d) for d in decisions):
            out.append((name, decisions[0].rule))
    return out


def _by_request(decision: Decision) -> bool:
    return any(step.via == "request" and step.verdict is Verdict.DENY for step in decision.trace)


def _header(policy: CompiledPolicy, what: str) -> list[str]:
    lines = [
        f"# {what}",
        "# Generated by kmodd from its policy; do not edit: changes are overwritten on the",
        "# next policy generation.  See `kmodctl explain NAME` for why a name is listed.",
        f"# policy generation hash: {policy.hash or '-'}",
        f"# mode: {policy.mode}",
    ]
    lines += [f"# policy file: {path}" for path in policy.files] or ["# policy file: (none)"]
    return lines


def render_enforcement(
    policy: CompiledPolicy,
    ctx: ModuleTree,
    deny_stub: str = DEFAULT_DENY_STUB,
    decide_fn: DecideFn | None = None,
) -> str:
    """The text of ROOT/run/modprobe.d/00-kmodd.conf for POLICY on the tree of CTX."""
    lines = _header(policy, "kmodd enforcement for kmod (udev, modules-load, modprobe)")
    if policy.mode is not Mode.ENFORCE:
        lines.append(f"# {policy.mode} mode: nothing is enforced through modprobe.d")
        return "\n".join(lines) + "\n"
    if decide_fn is None:
        decide_fn = decide
    lines.append("")
    for module in ctx.module_names():
        found = module_verdict(policy, module)
        if found is None or found[0] is Verdict.ALLOW:
            continue
        lines.extend(_deny_lines(module, found[1], deny_stub, blacklist=True))
    for name, rule in denied_requests(policy, ctx, decide_fn):
        lines.extend(_deny_lines(name, rule, deny_stub, blacklist=False))
    return "\n".join(lines) + "\n"


def _deny_lines(name: str, rule: str, stub: str, *, blacklist: bool) -> Iterable[str]:
    if not _SHELL_SAFE.match(name):
        return [f"# skipped {name!r} (rule {rule}): not a shell-safe name"]
    lines = [f"# rule {rule}", f"install {name} {stub} {name}"]
    return [*lines, f"blacklist {name}"] if blacklist else lines


def snapshot_names(ctx: ModuleTree) -> dict[str, str]:
    """KEY (normalized) → name to decide: every module, then every exact request alias."""
    keys: dict[str, str] = {}
    for name in (*ctx.module_names(), *exact_request_aliases(ctx)):
        key = helper.normalize(name)
        if _SHELL_SAFE.match(key) and " " not in key:
            keys.setdefault(key, name)
    return keys


def render_snapshot(
    policy: CompiledPolicy,
    ctx: ModuleTree,
    decide_fn: DecideFn,
    generation: int,
    modprobe: str = helper.DEFAULT_MODPROBE,
) -> bytes:
    """The helper's fallback snapshot (format: kmodd/helper.py), keys unique and sorted."""
    if not modprobe.startswith("/") or any(c in modprobe for c in "\n\0 "):
        raise ValueError(f"modprobe must be an absolute path without spaces: {modprobe!r}")
    # The helper knows enforce|permissive; learn never blocks either.
    mode = Mode.ENFORCE if policy.mode is Mode.ENFORCE else Mode.PERMISSIVE
    head = (
        f"generation {generation}\nmode {mode}\nmodprobe {modprobe}\nhash {policy.hash or '-'}\n\n"
    )
    rows = []
    for key, name in sorted(snapshot_names(ctx).items()):
        decision = decide_fn(Request(name, Source.KERNEL), ctx.resolve(name), policy)
        verdict = "d" if decision.verdict is Verdict.DENY else "a"
        rows.append(f"{key} {verdict} {decision.rule}\n")
    return helper.SNAPSHOT_MAGIC + head.encode() + "".join(rows).encode() + b"end\n"
