"""One generation as the kernel layer's tables (kmodd.bpf.layer.Tables).

Exactness first: the BPF program must never refuse what the policy allows, nor decide
what the policy decides from facts the kernel does not take.  So:

- A request name gets an entry only if its verdict depends on nothing but the real uid.
  That holds for every name when each `requester:` key of the policy tests only `uid`
  and `unprivileged` (both functions of the real uid): the uid line is cut at every uid
  a rule names (and at 0/1), decide() runs once per piece with that uid, and the pieces
  that deny become uid-range conditions.  With no `requester:` key at all there is one
  piece, and its decision is the one the snapshot made for the name (Generation keeps it).
  A `gid` (supplementary groups), `unit` or `container` key (pid namespaces, container
  cgroups) tests what the kernel layer does not see: then no name gets an entry and the
  helper decides every request (the files table and the events still work).
- Names are the helper snapshot's (every module and exact request alias of the tree).
  Names outside it (wildcard modaliases, unknown names) get no in-kernel verdict: the
  "" entry stays PASS, because a name the table does not know may resolve to modules.
- Denied module files: the modules the generation renders as denied into modprobe.d
  (denied whoever asks, from every source), by file identity (kernel dev_t + inode).
- init_module from memory (kernel_load_data) carries no file identity: refused only when
  no legitimate loader needs it (see load_data_verdict).
"""

from __future__ import annotations

import functools
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kmodd.bpf.layer import Tables, denied_files
from kmodd.bpf.layout import CONDS_MAX, NO_RULE, UID_MAX, Condition, Mode, NameRules, Verdict
from kmodd.daemon.generation import Generation
from kmodd.kmod.context import UnknownModuleError
from kmodd.kmod.model import Resolution
from kmodd.policy import compiler, engine
from kmodd.policy.engine import Decision, Request
from kmodd.policy.kernelcov import uid_pieces  # shared with coverage: one reading
from kmodd.policy.requester import RequesterFacts
from kmodd.policy.types import Mode as PolicyMode
from kmodd.policy.types import Source
from kmodd.policy.types import Verdict as PolicyVerdict

COMPRESSED = (".ko.xz", ".ko.zst", ".ko.gz")


@dataclass(frozen=True, slots=True)
class Compiled:
    tables: Tables
    rule_ids: tuple[str, ...]  # index -> rule id (events carry the index)
    in_kernel: str  # one sentence: what the kernel layer decides for this generation
    # Normalized request names the program decides for the exact requester: a request of
    # one of them that reaches the helper was allowed in-kernel for whoever asked.
    domain: frozenset[str] = frozenset()


def _facts(uid: int) -> RequesterFacts:
    return RequesterFacts(uid=uid, euid=uid, gid=uid)


def name_rules(
    decide_at: Callable[[RequesterFacts], Decision],
    pieces: list[tuple[int, int]],
    rule_index: dict[str, int],
) -> NameRules | None:
    """The entry for one name, or None when it would deny nobody (or cannot be encoded)."""
    decided = [(lo, hi, decide_at(_facts(lo))) for lo, hi in pieces]
    denies = [(lo, hi, d) for lo, hi, d in decided if d.verdict is PolicyVerdict.DENY]
    if not denies:
        return None
    if len(denies) == len(decided) and len({d.rule for _, _, d in denies}) == 1:
        return NameRules((), Verdict.DENY, rule_index[denies[0][2].rule])
    conds: list[Condition] = []
    for lo, hi, d in denies:  # merge adjacent pieces denied by the same rule
        rule = rule_index[d.rule]
        if conds and conds[-1].rule == rule and conds[-1].uid and conds[-1].uid[1] + 1 == lo:
            conds[-1] = Condition(Verdict.DENY, rule, uid=(conds[-1].uid[0], hi))
        else:
            conds.append(Condition(Verdict.DENY, rule, uid=(lo, hi)))
    if len(conds) > CONDS_MAX:
        return None
    # Every piece no condition denies is allowed: ALLOW, never PASS, so the helper is
    # never left to decide this name without its requester (daemon/core.py answers a
    # helper for a name of the domain "allow kernel": the kernel's verdict stands).
    allows = {d.rule for _, _, d in decided if d.verdict is PolicyVerdict.ALLOW}
    rule = rule_index[allows.pop()] if len(allows) == 1 else NO_RULE
    return NameRules(tuple(conds), Verdict.ALLOW, rule)


# kmod passes compressed files to finit_module(MODULE_INIT_COMPRESSED_FILE) from 31 on;
# kmod 30 (Debian 12) always decompresses in userspace and calls init_module.
KMOD_FINIT_COMPRESSED = 31


def load_data_verdict(
    module_dir: Path,
    sys_module: Path = Path("/sys/module"),
    kmod_version: int | None = None,
) -> Verdict:
    """DENY when kmod never needs init_module from memory here: the tree's modules are
    uncompressed (Debian 12's 6.1), or the kernel decompresses them itself
    (/sys/module/compression) and kmod (KMOD_VERSION, `modprobe --version`) is new enough
    to let it.  Otherwise ALLOW: kmod decompresses in userspace and calls init_module for
    every module, which a deny would break for all of them (measured: 6.12 under Debian
    12's kmod 30 refused root's every modprobe) -- the status says so (a compressed module
    of a denied name is still refused by its request name and by modprobe.d)."""
    try:
        with (module_dir / "modules.dep").open() as dep:
            first = dep.readline().split(":", 1)[0]
    except OSError:
        first = ""
    if first and not first.endswith(COMPRESSED):
        return Verdict.DENY  # nothing to decompress: no loader needs init_module
    kernel_decompresses = (sys_module / "compression").exists()
    new_kmod = kmod_version is not None and kmod_version >= KMOD_FINIT_COMPRESSED
    return Verdict.DENY if kernel_decompresses and new_kmod else Verdict.ALLOW


@functools.lru_cache(maxsize=4)
def kmod_version(modprobe: str = "/sbin/modprobe") -> int | None:
    """N of `kmod version N` (modprobe --version), None when it cannot be told."""
    try:
        out = subprocess.run(
            [modprobe, "--version"], capture_output=True, text=True, timeout=5, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    words = out.split()
    if len(words) >= 3 and words[:2] == ["kmod", "version"]:
        number = words[2].split(".", 1)[0]
        return int(number) if number.isdigit() else None
    return None


def compile_tables(gen: Generation, *, sys_module: Path = Path("/sys/module")) -> Compiled:
    """The kernel layer's tables for GEN (core or build thread: uses gen.kmod)."""
    policy = gen.compiled
    rule_ids = (*tuple(r.info.id for r in policy.rules), "default")
    rule_index = {rule_id: i for i, rule_id in reversed(list(enumerate(rule_ids)))}
    pieces = uid_pieces(policy)
    names: dict[str, NameRules] = {"": NameRules()}
    domain: frozenset[str] = frozenset()
    if pieces is not None:
        snapshot = gen.table_names or compiler.snapshot_names(gen.kmod)
        domain = frozenset(snapshot)
        # No requester key anywhere: every uid gets the same decision, the one the snapshot
        # already made for the name (decided again only when the build did not keep it).
        uid_blind = all(rule.requester is None for rule in policy.rules)
        if uid_blind:
            pieces = [(0, UID_MAX)]
        for key, name in snapshot.items():
            known = gen.kernel_decisions.get(key) if uid_blind else None
            resolution = gen.resolutions.get(name) or gen.kmod.resolve(name)

            def decide_at(
                facts: RequesterFacts,
                name: str = name,
                r: Resolution = resolution,
                known: Decision | None = known,
            ) -> Decision:
                if known is not None:
                    return known
                return engine.decide(Request(name, Source.KERNEL, facts), r, policy)

            entry = name_rules(decide_at, pieces, rule_index)
            if entry is not None:
                names[key] = entry  # normalized, as the program looks names up
        what = f"{len(names) - 1} request names decided in-kernel"
    else:
        what = (
            "no request names in-kernel: a requester rule tests gid, unit or container "
            "(layer 1 only, decided by unknown_requester)"
        )
    paths = []
    for module in sorted(gen.denied_modules):
        try:
            info = gen.kmod.module_info(module)
        except UnknownModuleError:
            # An install line for a request name no module carries (a request rule such as
            # `request: [net-pf-4]` on 6.1): no file to refuse.  Raising here emptied the
            # whole layer for every other rule (make bench's VM run found it).
            continue
        if info.path is not None:
            paths.append((info.path, rule_index.get(_module_rule(gen, module), NO_RULE)))
    files = denied_files(paths)
    mode = Mode.ENFORCE if gen.mode is PolicyMode.ENFORCE else Mode.PERMISSIVE
    load_data = load_data_verdict(gen.paths.module_dir, sys_module, kmod_version())
    tables = Tables(names, files, mode, load_data, gen.number)
    what += f"; {len(files)} denied module files; init_module from memory {load_data.name.lower()}"
    return Compiled(tables, rule_ids, what, domain)


def _module_rule(gen: Generation, module: str) -> str:
    return gen.decide(module, Source.CLI).rule


def decide_request(gen: Generation, name: str, facts: RequesterFacts) -> Decision:
    """What the policy says of NAME asked by FACTS (journal records of kernel events)."""
    return gen.decide(name, Source.KERNEL, facts)
