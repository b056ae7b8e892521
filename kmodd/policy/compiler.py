"""Render a policy generation for the two enforcement layers that do not ask the daemon.

(a) `render_enforcement`: ROOT/run/modprobe.d/00-kmodd.conf.  udev's kmod builtin,
    systemd-modules-load and an admin's modprobe use libkmod in-process and never call
    the helper; they honour modprobe.d.  `install NAME STUB NAME` is what really blocks
    (kmod runs the command instead of loading, STUB exits 1); `blacklist NAME` also
    stops udev's alias loads quietly.  kmod skips the install command of a module that
    has pre/post softdeps (kmod #446, `ignorecmd`; modules.softdep gives them to ksmbd,
    btrfs, ext4, jbd2, libcrc32c, ...), so every denied module also gets an empty
    `softdep NAME pre:` line: kmod uses the first softdep line that matches, 00-kmodd.conf
    sorts before modules.softdep, and an empty one leaves ignorecmd unset (kmod 30 and
    34.2, pinned by tests/policy/test_compiler.py and docs/kmod.md).  kmod's lookup
    order (research/kmod.md §2.1) makes `install REQUEST …` win for names that are
    neither modules nor config aliases, which is how exact request names (net-pf-5,
    fs-cramfs) are neutralised.
(b) `render_snapshot`: the helper's fallback table when the daemon does not answer, in
    the format kmodd/helper.py documents (SNAPSHOT_MAGIC … `KEY a|d RULE` … `globs` …
    end): exact names, then the wildcard patterns (aliases of denied modules such as
    `char-major-67-*` → coda, and request globs of deny rules) the helper matches itself.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from kmodd import helper
from kmodd.kmod.model import Resolution, StepKind
from kmodd.paths import HELPER_PATH
from kmodd.policy.engine import (
    CompiledPolicy,
    CompiledRule,
    Decision,
    Globs,
    Request,
    Via,
    decide,
    is_glob,
)
from kmodd.policy.requests import KERNEL_REQUEST_PREFIXES, RequestClass, classify
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
    def config_softdeps(self) -> tuple[tuple[str, str], ...]: ...


# The sources whose loads go through libkmod and modprobe.d only: udev's kmod builtin
# (MODALIAS) and an admin's modprobe (cli).  Kernel requests go through the helper.
LIBKMOD_SOURCES = frozenset({Source.UDEV, Source.CLI})


Reach = Callable[[CompiledRule], "frozenset[str] | None"]


@dataclass(frozen=True, slots=True)
class Walk:
    """Where module_verdict's walk over the rules stopped for one module."""

    verdict: Verdict | None  # None: a conditional allow, modprobe.d cannot say
    rule: str
    index: int  # the rule that decided (len(rules) for the default)


def module_walk(policy: CompiledPolicy, module: str, reach: Reach | None = None) -> Walk:
    """module_verdict with the index of the deciding rule (kmodd.policy.coverage)."""
    hits = policy.module_hits(module)
    for index, rule in enumerate(policy.rules):
        if rule.modules is not None and index not in hits:
            continue
        if reach is not None and rule.requests is not None:
            reached = reach(rule)
            if reached is not None and module not in reached:
                continue
        if not _conditional(rule):
            return Walk(rule.info.verdict, rule.info.id, index)
        sources = rule.sources if _source_only(rule) else None
        if sources is not None and not sources.isdisjoint(LIBKMOD_SOURCES):
            verdict = Verdict.DENY if rule.info.verdict is Verdict.DENY else None
            return Walk(verdict, rule.info.id, index)
        if rule.info.verdict is Verdict.ALLOW:
            return Walk(None, rule.info.id, index)
    return Walk(policy.default, "default", len(policy.rules))


def module_verdict(
    policy: CompiledPolicy, module: str, reach: Reach | None = None
) -> tuple[Verdict, str] | None:
    """The verdict on MODULE that modprobe.d can carry, or None when it cannot.

    Walk the rules in order as decide() would for a load-set module: a rule whose
    `module` key does not match is skipped; an unconditional rule decides.  A rule whose
    only condition is `source` decides when it names udev or cli: those loads never pass
    the helper, so modprobe.d is the only layer that can hold them (a deny rendered so
    also stops the real modprobe a kernel request the policy allows would run: kmod
    cannot tell who runs it; kmodd.policy.coverage reports that).  A `source: [kernel]`
    rule is the helper's: a deny leaves the others to later rules, an allow means a
    kernel request may load the module, so nothing can be rendered.  Any other
    conditional allow (request/class/requester keys) means some request may load the
    module: None; a conditional deny leaves the others to later rules.  REACH (see
    request_reach) tells which modules a rule with a request key can touch at all: a
    rule whose requests never load MODULE is skipped.
    """
    walk = module_walk(policy, module, reach)
    return None if walk.verdict is None else (walk.verdict, walk.rule)


def request_reach(tree: ModuleTree) -> Reach:
    """For a rule with a `request` key: every module a name it matches can resolve to or
    load (the rule cannot apply to any other module).  Exact names: what they resolve
    to.  Globs: over-approximated (safe: a bigger set only renders less), through every
    module name the glob matches and every alias pattern whose literal prefix is
    compatible with the glob's (a glob-to-glob overlap test would be exact but costly)."""
    memo: dict[int, frozenset[str]] = {}

    def reach(rule: CompiledRule) -> frozenset[str] | None:
        if rule.requests is None:
            return None
        key = id(rule)
        if key not in memo:
            memo[key] = _reach(tree, rule.requests)
        return memo[key]

    return reach


def _reach(tree: ModuleTree, requests: Globs) -> frozenset[str]:
    targets = set(requests.exact)
    if requests.globs:
        prefixes = tuple(_literal(g) for g in requests.globs)
        targets.update(m for m in tree.module_names() if requests.matches(helper.normalize(m)))
        for pattern, module in (*tree.alias_patterns(), *tree.config_aliases()):
            lit = _literal(pattern)
            if any(lit.startswith(p) or p.startswith(lit) for p in prefixes):
                targets.add(module)
    found: set[str] = set()
    for name in targets:
        res = tree.resolve(name)
        found.update(res.modules, res.load_set)
    return frozenset(found)


def _literal(pattern: str) -> str:
    """The part of PATTERN before its first wildcard."""
    cut = min((i for i in map(pattern.find, "*?[") if i >= 0), default=len(pattern))
    return pattern[:cut]


def rendered_denies(
    policy: CompiledPolicy, tree: ModuleTree, reach: Reach | None = None
) -> tuple[dict[str, str], dict[str, str]]:
    """(module -> rule) that 00-kmodd.conf denies, and (module -> rule) of denied
    built-in modules it leaves out: built-in code is never loaded, modprobe.d cannot stop
    it (kmodctl cmdline gives initcall_blacklist=).  Enforce mode only."""
    if policy.mode is not Mode.ENFORCE:
        return {}, {}
    reach = request_reach(tree) if reach is None else reach
    denied: dict[str, str] = {}
    builtin: dict[str, str] = {}
    for module in tree.module_names():
        found = module_verdict(policy, module, reach)
        if found is None or found[0] is not Verdict.DENY:
            continue
        steps = tree.resolve(module).steps
        if any(s.kind is StepKind.BUILTIN and s.module == module for s in steps):
            builtin[module] = found[1]
        else:
            denied[module] = found[1]
    return denied, builtin


def _conditional(rule: CompiledRule) -> bool:
    """The rule holds only for some requests (a requester key: only for some requesters,
    which modprobe.d cannot tell apart)."""
    return (
        rule.requests is not None
        or rule.classes is not None
        or rule.sources is not None
        or rule.requester is not None
    )


def _source_only(rule: CompiledRule) -> bool:
    return rule.requests is None and rule.classes is None and rule.requester is None


def exact_request_aliases(tree: ModuleTree) -> tuple[str, ...]:
    """Wildcard-free, kernel-request-shaped aliases of the tree and of modprobe.d."""
    names = set(request_shaped(tree.alias_patterns()))
    names.update(request_shaped(tree.config_aliases()))
    return tuple(sorted(names))


@functools.lru_cache(maxsize=2)  # by value: one tree's index and one modprobe.d list
def request_shaped(pairs: tuple[tuple[str, str], ...]) -> frozenset[str]:
    """The glob-free aliases of PAIRS that look like what request_module() sends (pure;
    ~50 ms over a tree's ~30,000 patterns, asked 3 times per build: cached by value, the
    hash of an unchanged index tuple is a few ms)."""
    return frozenset(
        p
        for p, _module in pairs
        if not is_glob(p) and helper.normalize(p).startswith(KERNEL_REQUEST_PREFIXES)
    )


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
    # A softdep names what it loads by request name (ext4: `pre: crypto-crc32c`): an
    # `install NAME` there would refuse the softdep of a module the policy allows
    # (found by tests/oracle/test_enforcement.py); coverage reports those names unheld.
    candidates.difference_update(softdep_targets(tree))
    out = []
    for name in sorted(candidates):
        decisions = [decide_fn(Request(name, s), tree.resolve(name), policy) for s in Source]
        if all(d.verdict is Verdict.DENY and _by_request(d) for d in decisions):
            out.append((name, decisions[0].rule))
    return out


def softdep_targets(tree: ModuleTree) -> frozenset[str]:
    """Normalized names the configuration's softdeps (modules.softdep included) load."""
    out: set[str] = set()
    for _module, value in tree.config_softdeps():
        # libkmod prints `pre: apost: b` (a missing space, docs/kmod.md): split on the words
        words = value.replace("pre:", " ").replace("post:", " ").split()
        out.update(helper.normalize(w) for w in words)
    return frozenset(out)


def _by_request(decision: Decision) -> bool:
    return any(step.via is Via.REQUEST and step.verdict is Verdict.DENY for step in decision.trace)


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
    denied, builtin = rendered_denies(policy, ctx)
    for module, rule in denied.items():
        lines.extend(_deny_lines(module, rule, deny_stub, blacklist=True))
    for module, rule in builtin.items():
        lines.append(f"# rule {rule}: {module} is built in; see `kmodctl cmdline`")
    for name, rule in denied_requests(policy, ctx, decide_fn):
        lines.extend(_deny_lines(name, rule, deny_stub, blacklist=False))
    return "\n".join(lines) + "\n"


def _deny_lines(name: str, rule: str, stub: str, *, blacklist: bool) -> Iterable[str]:
    if not _SHELL_SAFE.match(name):
        return [f"# skipped {name!r} (rule {rule}): not a shell-safe name"]
    install = f"install {name} {stub} {name}"
    if not blacklist:
        return [f"# rule {rule}", install]
    # A module: mask its own softdeps first, or kmod ignores the install line (#446).
    return [f"# rule {rule}", f"softdep {name} pre:", install, f"blacklist {name}"]


def snapshot_names(ctx: ModuleTree, policy: CompiledPolicy | None = None) -> dict[str, str]:
    """KEY (normalized) → name to decide: every module, every exact request alias, and
    every exact request name a rule of POLICY lists (so a glob row never answers it)."""
    keys: dict[str, str] = {}
    named = [n for r in policy.rules if r.requests for n in r.requests.exact] if policy else []
    for name in (*ctx.module_names(), *exact_request_aliases(ctx), *sorted(named)):
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
    *,
    decided: dict[str, Decision] | None = None,
) -> bytes:
    """The helper's fallback snapshot (format: kmodd/helper.py), keys unique and sorted.
    DECIDED, when given, receives each key's decision (a kernel request, no requester)."""
    if not modprobe.startswith("/") or any(c in modprobe for c in "\n\0 "):
        raise ValueError(f"modprobe must be an absolute path without spaces: {modprobe!r}")
    # The helper knows enforce|permissive; learn never blocks either.
    mode = Mode.ENFORCE if policy.mode is Mode.ENFORCE else Mode.PERMISSIVE
    head = (
        f"generation {generation}\nmode {mode}\nmodprobe {modprobe}\nhash {policy.hash or '-'}\n\n"
    )
    rows = []
    keys = snapshot_names(ctx, policy)
    for key, name in sorted(keys.items()):
        decision = decide_fn(Request(name, Source.KERNEL), ctx.resolve(name), policy)
        if decided is not None:
            decided[key] = decision
        rows.append(f"{key} {'d' if decision.verdict is Verdict.DENY else 'a'} {decision.rule}\n")
    globs = [f"{p} d {rule}\n" for p, rule in snapshot_globs(policy, ctx, decide_fn, keys)]
    body = "".join(rows) + helper.SNAPSHOT_GLOBS.decode() + "".join(globs)
    return helper.SNAPSHOT_MAGIC + head.encode() + body.encode() + b"end\n"


def snapshot_globs(
    policy: CompiledPolicy, ctx: ModuleTree, decide_fn: DecideFn, keys: dict[str, str]
) -> list[tuple[str, str]]:
    """(pattern, rule) the helper denies any name matching, after an exact-key miss.

    A name that is not a key reaches a module only through an alias: every alias pattern
    of the tree (wildcard or not, e.g. `char_major_67_*` → coda, `platform:foo`) that a
    kernel request would be denied for, decided with the pattern standing in for the name
    (its class comes from its literal prefix; a request glob of a rule is matched against
    the pattern text: exact where rule globs and alias patterns do not overlap partly,
    which kmodd.policy.coverage reports); then the request globs of deny rules that hold
    for kernel requests (no class/requester key; only up to the first request or class
    allow rule, else the pattern is left to the daemon and modprobe.d, and coverage says
    so).  Deny-only: a miss on every row runs modprobe, where modprobe.d still blocks."""
    memo: dict[tuple[object, ...], str | None] = {}
    with_requests = [i for i, r in enumerate(policy.rules) if r.requests is not None]
    out: dict[str, str] = {}
    for pattern, module, stand_in, klass in _classified(ctx.alias_patterns()):
        if pattern in keys or not _SNAPSHOT_SAFE.match(pattern):
            continue
        # The decision depends on the name only through its class and the request rules
        # it matches: one decide() per (module, class, matches).
        hits = tuple(i for i in with_requests if _matches(policy.rules[i], stand_in))
        key = (module, klass, hits)
        if key not in memo:
            d = decide_fn(Request(stand_in, Source.KERNEL), ctx.resolve(module), policy)
            memo[key] = d.rule if d.verdict is Verdict.DENY else None
        rule = memo[key]
        if rule is not None:
            out.setdefault(pattern, rule)
    for rule_ in kernel_request_denies(policy):
        assert rule_.requests is not None
        for pattern in sorted(rule_.requests.exact | set(rule_.requests.globs)):
            if _SNAPSHOT_SAFE.match(pattern):
                out.setdefault(pattern, rule_.info.id)
    return sorted(out.items())


def _matches(rule: CompiledRule, name: str) -> bool:
    return rule.requests is not None and rule.requests.matches(name)


_Classified = list[tuple[str, str, str, RequestClass]]
_classes_memo: tuple[tuple[tuple[str, str], ...], _Classified] | None = None


def _classified(pairs: tuple[tuple[str, str], ...]) -> _Classified:
    """(pattern, module, stand-in name, its class) for the tree's alias index, memoized
    for the last index seen (the same tuple object while the index is unchanged;
    classify() of ~30,000 patterns costs ~0.3 s)."""
    global _classes_memo  # noqa: PLW0603 -- one slot per process, as _tree_requests
    memo = _classes_memo
    if memo is not None and memo[0] is pairs:
        return memo[1]
    # An instantiation-like stand-in ('0' for each wildcard): classes are decided by the
    # literal prefix and the ':' of a device modalias (`acpi*:LTER0301:*` is a modalias).
    stand_ins = ((p, m, _WILDCARD.sub("0", p)) for p, m in pairs)
    found = [(p, m, name, classify(name)) for p, m, name in stand_ins]
    if len(pairs) > 1000:
        _classes_memo = (pairs, found)
    return found


_WILDCARD = re.compile(r"\[[^\]]*\]|[*?]")
# Snapshot rows are space-separated and newline-terminated: a pattern is one token.
_SNAPSHOT_SAFE = re.compile(r"^[\x21-\x5b\x5d-\x7e]{1,256}$")  # no backslash: kmod escapes


def kernel_request_denies(policy: CompiledPolicy) -> Iterable[CompiledRule]:
    """Deny rules without a module key that hold for kernel requests by name alone,
    up to the first rule with a request or class key that is not such a rule.  The
    snapshot is decided without a requester, as the daemon decides one it does not know:
    a rule with a requester key counts with the policy's `unknown_requester` verdict."""
    for rule in policy.rules:
        kernel = rule.sources is None or Source.KERNEL in rule.sources
        by_name = rule.modules is None and rule.classes is None
        verdict = rule.info.verdict if rule.requester is None else policy.unknown_requester
        if verdict is Verdict.DENY and kernel and by_name and rule.requests:
            yield rule
        elif kernel and verdict is Verdict.ALLOW and (rule.requests or rule.classes):
            return
