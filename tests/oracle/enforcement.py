"""The enforcement oracle's parts: generated policies, the names to try, the checks.

A check asks the enforcers, never kmodd's model alone:
- kmod's own `modprobe -D` (what `modprobe -n -v` prints, without consulting the host's
  /sys/module: this machine's kernel has no module support, but its /sys/module lists
  its built-in code, which `-n` would take for "already loaded") with `-C` the rendered
  00-kmodd.conf: no module the policy denies for udev or cli loads is insmod'ed, by
  name, by alias, by modalias, as a dependency or as a softdep of an allowed module;
- the helper's own snapshot lookup (helper.snapshot_lookup, what kmodd-modprobe runs
  with the daemon absent; the real script is run on a sample too), followed, on a miss
  or an allow, by what the real modprobe would then do: the same verdict as the daemon.
A deny that no layer holds passes only if kmodd.policy.coverage reports it for that rule.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kmodd import helper
from kmodd.kmod.context import KmodContext
from kmodd.policy import coverage
from kmodd.policy.compiler import render_enforcement, render_snapshot
from kmodd.policy.engine import CompiledPolicy, Decision, Request, compile_policy, decide
from kmodd.policy.model import LocatedRule, PolicySet, Rule
from kmodd.policy.requests import RequestClass
from kmodd.policy.types import Action, Source, Verdict
from tests.oracle.modprobe import Oracle, separator_file
from tests.oracle.names import alias_lines, instantiate

STUB = "/usr/local/libexec/kmodd/kmodd-modprobe --deny"
SOURCES = (Source.KERNEL, Source.UDEV, Source.CLI)
LIBKMOD = (Source.UDEV, Source.CLI)


@dataclass(frozen=True, slots=True)
class TreeFacts:
    """What the generator and the sampler draw from, read once per tree."""

    modules: tuple[str, ...]
    builtins: frozenset[str]
    aliases: dict[str, tuple[str, ...]]  # module -> alias patterns (kernel spelling)
    dependents: dict[str, tuple[str, ...]]  # module -> modules that need it (modules.dep)
    softdep_users: dict[str, tuple[str, ...]]  # module -> modules whose softdep names it
    requests: tuple[str, ...]  # request-shaped alias patterns

    @classmethod
    def read(cls, ctx: KmodContext) -> TreeFacts:
        moddir = ctx.module_dir
        aliases: dict[str, list[str]] = {}
        requests = []
        for pattern, module in alias_lines(moddir):
            aliases.setdefault(module, []).append(pattern)
            if ":" not in pattern:
                requests.append(pattern)
        dependents: dict[str, list[str]] = {}
        for line in (moddir / "modules.dep").read_text().splitlines():
            head, _, deps = line.partition(":")
            user = _modname(head)
            for dep in deps.split():
                dependents.setdefault(_modname(dep), []).append(user)
        softdep_users: dict[str, list[str]] = {}
        for line in (moddir / "modules.softdep").read_text().splitlines():
            words = line.split()
            if len(words) > 2 and words[0] == "softdep":
                for dep in words[2:]:
                    if not dep.endswith(":"):
                        softdep_users.setdefault(dep.replace("-", "_"), []).append(words[1])
        return cls(
            modules=ctx.module_names(),
            builtins=frozenset(ctx.builtin_names()),
            aliases={k: tuple(v) for k, v in aliases.items()},
            dependents={k: tuple(v) for k, v in dependents.items()},
            softdep_users={k: tuple(v) for k, v in softdep_users.items()},
            requests=tuple(requests),
        )


def _modname(path: str) -> str:
    return path.rsplit("/", 1)[-1].split(".", 1)[0].replace("-", "_")


# --- generated policies -------------------------------------------------------------

CLASSES = tuple(RequestClass)
# Modules every policy touches: softdep carriers (kmod #446), a dependency of 130
# modules, the wildcard-alias case of issue 10 and Copy Fail.
HOT = ("ksmbd", "btrfs", "ext4", "jbd2", "libcrc32c", "nfsd", "cifs", "coda", "algif_aead")


def _module_glob(rng: random.Random, facts: TreeFacts) -> str:
    name = rng.choice(HOT) if rng.random() < 0.3 else rng.choice(facts.modules)
    if rng.random() < 0.2 and len(name) > 3:
        return name[: rng.randint(3, len(name) - 1)] + "*"
    return name


def _request_glob(rng: random.Random, facts: TreeFacts) -> str:
    pattern = rng.choice(facts.requests)
    roll = rng.random()
    if roll < 0.4:
        return instantiate(pattern, rng.randint(0, 2))
    if roll < 0.7 and "-" in pattern:
        return pattern.rsplit("-", 1)[0] + "-*"
    return pattern


def random_rule(rng: random.Random, facts: TreeFacts, index: int) -> Rule:
    match: dict[str, object] = {}
    if rng.random() < 0.75:
        match["module"] = [_module_glob(rng, facts) for _ in range(rng.randint(1, 3))]
    if rng.random() < 0.3 or not match:
        match["request"] = [_request_glob(rng, facts) for _ in range(rng.randint(1, 2))]
    if rng.random() < 0.35:
        match["source"] = rng.sample([str(s) for s in SOURCES], rng.randint(1, 2))
    if rng.random() < 0.1:
        match["class"] = [str(rng.choice(CLASSES))]
    action = Action.DENY if rng.random() < 0.7 else Action.ALLOW
    return Rule.model_validate(
        {"id": f"r{index}", "action": str(action), "match": match}, strict=False
    )


def random_policy(rng: random.Random, facts: TreeFacts, number: int) -> CompiledPolicy:
    rules = tuple(
        LocatedRule(random_rule(rng, facts, i), f"gen-{number}.yaml", i + 1)
        for i in range(rng.randint(1, 6))
    )
    default = Action.DENY if rng.random() < 0.05 else Action.ALLOW
    return compile_policy(PolicySet(files=(), rules=rules, default=default, hash=f"gen{number}"))


# --- the names a policy is tried with ------------------------------------------------


def sample_names(
    rng: random.Random, facts: TreeFacts, policy: CompiledPolicy, ctx: KmodContext, per: int
) -> list[str]:
    """Names that reach the modules POLICY talks about: the module, its aliases
    (wildcards instantiated, e.g. char-major-67-0), modules that depend on it or name it
    as a softdep, the rules' request names; plus a few random modules."""
    touched: list[str] = []
    for rule in policy.rules:
        if rule.modules is not None:
            touched += [m for m in facts.modules if rule.modules.matches(helper.normalize(m))][:6]
        if rule.requests is not None:
            touched += [n.replace("_", "-") for n in sorted(rule.requests.exact)][:3]
            touched += [instantiate(g, 1) for g in rule.requests.globs]
    names: dict[str, None] = {}
    for module in touched:
        names[module] = None
        for pattern in facts.aliases.get(module, ())[:3]:
            names[instantiate(pattern, rng.randint(0, 2))] = None
        for user in (
            *facts.dependents.get(module, ())[:2],
            *facts.softdep_users.get(module, ())[:2],
        ):
            names[user] = None
    for _ in range(4):
        names[rng.choice(facts.modules)] = None
    picked = list(names)
    rng.shuffle(picked)
    return sorted(picked[:per])


# --- the checks ---------------------------------------------------------------------


@dataclass
class Counts:
    policies: int = 0
    names: int = 0
    kmod_denied: int = 0  # (name, denied module) pairs for udev/cli loads
    kmod_held: int = 0  # ... that kmod's modprobe does not insmod
    kmod_reported: int = 0  # ... that it does insmod, reported by coverage
    kmod_false_blocks: int = 0  # udev/cli allowed but kmod runs the deny stub
    helper_names: int = 0
    helper_agree: int = 0
    helper_reported: int = 0  # disagreement reported by coverage (over-block)
    failures: list[str] = field(default_factory=list)
    by_reason: Counter[str] = field(default_factory=Counter)

    def add(self, other: Counts) -> None:
        for name in ("policies", "names", "kmod_denied", "kmod_held", "kmod_reported"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("kmod_false_blocks", "helper_names", "helper_agree", "helper_reported"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.failures += other.failures
        self.by_reason.update(other.by_reason)


def plan_of(lines: Sequence[str]) -> tuple[set[str], set[str]]:
    """(modules insmod'ed, names whose deny stub runs) from `modprobe -D` lines."""
    insmods, stubbed = set(), set()
    for line in lines:
        if line.startswith("insmod "):
            insmods.add(_modname(line.split()[1]))
        elif line.startswith(f"install {STUB} "):
            stubbed.add(line.split()[-1])
    return insmods, stubbed


def denied_subjects(d: Decision) -> dict[str, str]:
    return {s.module: s.rule for s in d.trace if s.verdict is Verdict.DENY and s.module}


class PolicyCheck:
    """Render POLICY for CTX, run kmod and the snapshot on NAMES, count."""

    def __init__(self, policy: CompiledPolicy, ctx: KmodContext, workdir: Path) -> None:
        self.policy = policy
        self.ctx = ctx
        self.covs = {c.rule: c for c in coverage.rule_coverage(policy, ctx)}
        conf = workdir / "conf"
        conf.mkdir(parents=True, exist_ok=True)
        (conf / "00-kmodd.conf").write_text(render_enforcement(policy, ctx, STUB))
        self.conf = conf
        self.sep = separator_file(workdir)
        self.snapshot = render_snapshot(policy, ctx, decide, 1)

    def oracle(self, root: Path, release: str) -> Oracle:
        return Oracle(root, release, (str(self.conf), str(self.sep)))

    def unheld(self, rule: str, module: str) -> bool:
        """Coverage reports MODULE as not held by modprobe.d for RULE."""
        cov = self.covs.get(rule)
        return cov is not None and module in cov.unheld and bool(cov.gaps)

    def overblock(self, module: str) -> bool:
        """Coverage reports that modprobe.d refuses MODULE for kernel requests too."""
        return any(module in c.overblocks and c.gaps for c in self.covs.values())

    def snapshot_gap(self, rule: str) -> bool:
        cov = self.covs.get(rule)
        return cov is not None and cov.snapshot_gap and bool(cov.gaps)

    def check(self, names: Iterable[str], plans: dict[str, tuple[str, ...]]) -> Counts:
        counts = Counts(policies=1)
        for name in names:
            counts.names += 1
            insmods, stubbed = plan_of(plans[name])
            res = self.ctx.resolve(name)
            decisions = {s: decide(Request(name, s), res, self.policy) for s in SOURCES}
            self._kmod(name, decisions, insmods, stubbed, counts)
            self._helper(name, decisions[Source.KERNEL], plans[name], stubbed, counts)
        return counts

    def _kmod(
        self,
        name: str,
        decisions: dict[Source, Decision],
        insmods: set[str],
        stubbed: set[str],
        counts: Counts,
    ) -> None:
        denied: dict[str, str] = {}
        for source in LIBKMOD:
            denied.update(denied_subjects(decisions[source]))
        for module, rule in denied.items():
            counts.kmod_denied += 1
            if module not in insmods:
                counts.kmod_held += 1
            elif self.unheld(rule, module):
                counts.kmod_reported += 1
                counts.by_reason[f"kmod reported: rule {rule}"] += 1
            else:
                counts.failures.append(
                    f"{self.policy.hash}: {name}: {module} insmod'ed (rule {rule})"
                )
        if stubbed and all(decisions[s].verdict is Verdict.ALLOW for s in LIBKMOD):
            counts.kmod_false_blocks += 1
            counts.failures.append(f"{self.policy.hash}: {name}: allowed but stubbed {stubbed}")

    def _helper(
        self, name: str, daemon: Decision, plan: Sequence[str], stubbed: set[str], counts: Counts
    ) -> None:
        raw = name.encode()
        if not helper.valid_name(raw):
            return
        counts.helper_names += 1
        found = helper.snapshot_lookup(self.snapshot, helper.normalize(name).encode())
        # 'a' or a miss: the helper execs modprobe, which runs the deny stub if kmod does.
        deny = (found is not None and found[0] == b"d") or bool(stubbed)
        if deny == (daemon.verdict is Verdict.DENY):
            counts.helper_agree += 1
            return
        if not deny and not plan and not daemon.modules:
            # Nothing resolves: the real modprobe finds nothing and exits 1, as a deny.
            counts.helper_agree += 1
            counts.by_reason["helper: unresolvable, modprobe exits 1"] += 1
            return
        if deny and stubbed and all(map(self.overblock, stubbed)):
            counts.helper_reported += 1
            counts.by_reason["helper: modprobe.d over-block reported"] += 1
            return
        if not deny and self.snapshot_gap(daemon.rule):
            counts.helper_reported += 1
            counts.by_reason[f"helper: snapshot gap reported ({daemon.rule})"] += 1
            return
        where = f"snapshot {found!r}, stub {sorted(stubbed)}"
        counts.failures.append(f"{self.policy.hash}: {name}: daemon {daemon.verdict}, {where}")
