"""The decision engine: a policy generation compiled once, and a pure `decide()`.

Semantics (docs/policy.md "How a decision is made" is the user-facing copy):

1. The request name is normalized as kmod does ('-' → '_' outside [...]) and classified
   (kmodd.policy.requests).  A rule *applies to the request* when each of its `request`,
   `class`, `source` and `requester` keys that is present matches.  A `requester` key
   never matches a udev or cli request (they have no requester).  For a kernel request
   whose requester is unknown (facts None) it applies, and the rule then decides with
   the policy's `unknown_requester` verdict instead of its own action (deny by default:
   fail closed; docs/attribution.md).
2. The subjects are the load set (resolved modules, hard deps, softdeps, in load order)
   followed by any resolved module not in it (e.g. skipped by a blacklist line): a deny
   rule on a module must hold even when modprobe would skip it today.
3. For each subject module, the first applicable rule (file order, then list order)
   whose `module` key is absent or matches the module decides that module; if none,
   the policy default does.
4. The request is denied if any subject is denied: the first denied one in load order
   names the rule and the reason.  Otherwise it is allowed, and the rule reported is the
   one that decided the first resolved module.
5. A name that resolves to nothing has no subjects: only rules without a `module` key
   can apply (first match wins), else the default.

No pydantic here: matchers are frozensets (exact names) and one compiled regex per
rule key (globs), built by compile_policy() once per generation.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from kmodd.helper import normalize
from kmodd.kmod.model import Resolution
from kmodd.policy.requester import RequesterFacts, RequesterMatcher
from kmodd.policy.requests import RequestClass, classify
from kmodd.policy.types import Mode, Outcome, Source, Verdict

if TYPE_CHECKING:
    from kmodd.policy.model import PolicySet, RequesterMatch

DEFAULT_RULE = "default"
# Distinct module names a generation remembers rule matches for.  A tree has ~6,000
# modules and load sets only hold real module names, so this bounds memory, not hits.
MODULE_CACHE_MAX = 65_536
_GLOB_META = frozenset("*?[")


def is_glob(pattern: str) -> bool:
    return not _GLOB_META.isdisjoint(pattern)


@dataclass(frozen=True, slots=True)
class Globs:
    """A set of globs, normalized: exact names in a frozenset, the rest in one regex."""

    exact: frozenset[str]
    regex: re.Pattern[str] | None
    globs: tuple[str, ...] = ()  # the wildcard patterns of regex (the helper's snapshot)

    @classmethod
    def compile(cls, patterns: Iterable[str]) -> Globs:
        normalized = [normalize(p) for p in patterns]
        exact = frozenset(p for p in normalized if not is_glob(p))
        globs = tuple(dict.fromkeys(p for p in normalized if is_glob(p)))
        wild = [fnmatch.translate(p) for p in globs]
        regex = re.compile("|".join(f"(?:{w})" for w in wild)) if wild else None
        return cls(exact, regex, globs)

    def matches(self, normalized_name: str) -> bool:
        if normalized_name in self.exact:
            return True
        return self.regex is not None and self.regex.match(normalized_name) is not None


@dataclass(frozen=True, slots=True)
class RuleInfo:
    """What a decision reports about the rule that made it."""

    id: str
    verdict: Verdict
    reason: str | None = None
    references: tuple[str, ...] = ()
    location: str | None = None  # FILE:LINE


@dataclass(frozen=True, slots=True)
class CompiledRule:
    info: RuleInfo
    modules: Globs | None
    requests: Globs | None
    classes: frozenset[RequestClass] | None
    sources: frozenset[Source] | None
    requester: RequesterMatcher | None = None

    def applies(
        self,
        norm: str,
        klass: RequestClass,
        source: Source,
        requester: RequesterFacts | None = None,
    ) -> bool:
        """The request-level keys (request, class, source, requester) all match.  With no
        requester (None), a requester key matches a kernel request (whose requester is
        unknown: decided by `unknown_requester`) and never a udev or cli one."""
        if self.sources is not None and source not in self.sources:
            return False
        if self.requester is not None:
            if requester is None:
                if source is not Source.KERNEL:
                    return False
            elif not self.requester.matches(requester):
                return False
        if self.classes is not None and klass not in self.classes:
            return False
        return self.requests is None or self.requests.matches(norm)


@dataclass(frozen=True)
class CompiledPolicy:
    """One policy generation, ready for decide().  Immutable apart from a match cache."""

    rules: tuple[CompiledRule, ...]
    mode: Mode
    default: Verdict
    hash: str = ""
    files: tuple[str, ...] = ()
    unknown_requester: Verdict = Verdict.DENY  # a requester rule's verdict, requester unknown
    _module_hits: dict[str, frozenset[int]] = field(default_factory=dict, compare=False)

    def module_hits(self, module: str) -> frozenset[int]:
        """Indices of the rules whose `module` key matches MODULE (normalized)."""
        hits = self._module_hits.get(module)
        if hits is None:
            hits = frozenset(
                i
                for i, rule in enumerate(self.rules)
                if rule.modules is not None and rule.modules.matches(normalize(module))
            )
            if len(self._module_hits) < MODULE_CACHE_MAX:
                self._module_hits[module] = hits
        return hits

    @functools.cached_property
    def default_info(self) -> RuleInfo:
        return RuleInfo(DEFAULT_RULE, self.default)

    def unknown_info(self, rule: CompiledRule) -> RuleInfo:
        """What RULE (with a requester key) says when the requester is unknown."""
        info = rule.info
        return RuleInfo(
            id=info.id,
            verdict=self.unknown_requester,
            reason=f"requester unknown; unknown_requester: {self.unknown_requester}",
            references=info.references,
            location=info.location,
        )

    @functools.cached_property
    def uses_requester(self) -> bool:
        """Some rule tests the requester: decisions then depend on who asked."""
        return any(rule.requester is not None for rule in self.rules)


def _requester(match: RequesterMatch | None) -> RequesterMatcher | None:
    if match is None:
        return None
    return RequesterMatcher.compile(
        uid=match.uid,
        gid=match.gid,
        unprivileged=match.unprivileged,
        unit=match.unit,
        container=match.container,
    )


def compile_policy(ps: PolicySet, *, mode: Mode | None = None) -> CompiledPolicy:
    """Compile PS once per generation.  MODE overrides the policy's (kernel cmdline)."""
    rules = []
    for located in ps.rules:
        rule, match = located.rule, located.rule.match
        info = RuleInfo(
            id=rule.id,
            verdict=rule.action,
            reason=rule.reason,
            references=rule.references,
            location=located.location(),
        )
        rules.append(
            CompiledRule(
                info=info,
                modules=Globs.compile(match.module) if match.module else None,
                requests=Globs.compile(match.request) if match.request else None,
                classes=frozenset(match.class_) if match.class_ else None,
                sources=frozenset(match.source) if match.source else None,
                requester=_requester(match.requester),
            )
        )
    return CompiledPolicy(
        rules=tuple(rules),
        mode=mode or ps.mode,
        default=ps.default,
        hash=ps.hash,
        files=tuple(f.path for f in ps.files),
        unknown_requester=ps.unknown_requester,
    )


@dataclass(frozen=True, slots=True)
class Request:
    """A request to decide: the raw name, where it came from and, when it is known, the
    task that triggered it (the kernel layer's ring-buffer event; None: unknown)."""

    name: str
    source: Source = Source.KERNEL
    requester: RequesterFacts | None = None


class Via(StrEnum):
    """How a trace step was decided."""

    MODULE = "module"  # a rule with a module key matched the module
    REQUEST = "request"  # a rule without a module key (request, class, source, requester)
    DEFAULT = "default"  # no rule matched


@dataclass(frozen=True, slots=True)
class TraceStep:
    """One subject considered: which rule decided it (module None: the request itself)."""

    module: str | None
    rule: str
    verdict: Verdict
    via: Via
    info: RuleInfo | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    request: str
    source: Source
    request_class: RequestClass
    verdict: Verdict  # what the policy says
    mode: Mode
    rule: str  # rule id, or "default"
    reason: str
    modules: tuple[str, ...]  # what the name resolves to
    load_set: tuple[str, ...]  # what loading it would load, in order
    trace: tuple[TraceStep, ...]
    module: str | None = None  # the module whose verdict decided (denied module on deny)
    rule_info: RuleInfo | None = None

    @property
    def effective(self) -> Verdict:
        """What happens: permissive and learn modes turn every deny into allow."""
        return self.verdict if self.mode is Mode.ENFORCE else Verdict.ALLOW

    @property
    def outcome(self) -> Outcome:
        """allow, deny (blocked) or would_deny (see Outcome)."""
        return Outcome.of(self.verdict, self.mode)

    @property
    def would_deny(self) -> bool:
        """The policy says deny but permissive mode lets it through."""
        return self.verdict is Verdict.DENY and self.effective is Verdict.ALLOW


def _subjects(resolution: Resolution) -> tuple[str, ...]:
    """Load set then resolved modules, each once (modprobe -D repeats a dependency shared
    by several resolved modules: a 4-module modalias can list 32 steps)."""
    return tuple(dict.fromkeys((*resolution.load_set, *resolution.modules)))


def _first_rule(
    policy: CompiledPolicy, candidates: list[int], module: str | None
) -> CompiledRule | None:
    hits = policy.module_hits(module) if module is not None else frozenset()
    for index in candidates:
        rule = policy.rules[index]
        if rule.modules is None or index in hits:
            return rule
    return None


def decide(request: Request, resolution: Resolution, policy: CompiledPolicy) -> Decision:
    """Decide REQUEST given what it resolves to (pure; see the module docstring)."""
    norm = normalize(request.name)
    klass = classify(request.name)
    candidates = [
        i
        for i, rule in enumerate(policy.rules)
        if rule.applies(norm, klass, request.source, request.requester)
    ]
    subjects: tuple[str | None, ...] = _subjects(resolution) or (None,)
    unknown = request.requester is None
    trace = []
    for module in subjects:
        rule = _first_rule(policy, candidates, module)
        if rule is None:
            info = policy.default_info
        elif unknown and rule.requester is not None:
            info = policy.unknown_info(rule)
        else:
            info = rule.info
        via = Via.DEFAULT if rule is None else (Via.REQUEST if rule.modules is None else Via.MODULE)
        trace.append(TraceStep(module, info.id, info.verdict, via, info))
    step = _deciding_step(trace, resolution.modules)
    return Decision(
        request=request.name,
        source=request.source,
        request_class=klass,
        verdict=step.verdict,
        mode=policy.mode,
        rule=step.rule,
        reason=_reason(step),
        # Each once, in first-seen order: a modalias two alias lines match resolves twice
        # (`modprobe -R` of QEMU's bochs display prints bochs twice and -D its 6-module
        # load set twice); modprobe loads each once, and records said ["bochs","bochs"].
        modules=tuple(dict.fromkeys(resolution.modules)),
        load_set=tuple(dict.fromkeys(resolution.load_set)),
        trace=tuple(trace),
        module=step.module,
        rule_info=step.info,
    )


def _deciding_step(trace: list[TraceStep], modules: tuple[str, ...]) -> TraceStep:
    """The first denied subject; if none, the first resolved module's step."""
    for step in trace:
        if step.verdict is Verdict.DENY:
            return step
    target = modules[0] if modules else None
    for step in trace:
        if step.module == target:
            return step
    return trace[0]


_VERB = {Verdict.ALLOW: "allowed", Verdict.DENY: "denied"}


def _reason(step: TraceStep) -> str:
    if step.via is Via.DEFAULT:
        what = f"{step.module}: no rule matches" if step.module else "no rule matches"
        return f"{what}; the default is {step.verdict}"
    who = f"rule {step.rule}"
    if step.module is not None:
        who = f"{step.module} {_VERB[step.verdict]} by {who}"
    reason = step.info.reason if step.info is not None else None
    return f"{who}: {reason}" if reason else who


_MODES = frozenset(m.value for m in Mode)


def mode_override(cmdline: str) -> Mode | None:
    """The kernel command line escape hatch: `kmodd.mode=permissive` (last one wins).

    Unknown values are ignored (an unbootable typo must not turn enforcement off or on).
    """
    found: Mode | None = None
    for token in cmdline.split():
        key, sep, value = token.partition("=")
        value = value.strip('"')
        if sep and key == "kmodd.mode" and value in _MODES:
            found = Mode(value)
    return found
