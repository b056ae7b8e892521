"""The kernel layer's share of coverage: which denies the BPF LSM program can hold.

The same reading of a generation as kmodd.daemon.kernel_tables (which fills the maps):

- `lsm/kernel_module_request` decides a request name only when the name is in the
  table -- the helper snapshot's names (every module and exact request alias of the
  tree, compiler.snapshot_names) -- and only when every requester key of the policy
  tests nothing but the real uid (uid_pieces is not None).  Names outside the table
  (wildcard modaliases, unknown names) pass to the helper.
- `lsm/kernel_read_file` refuses the files of the modules the generation renders as
  denied (denied from every source): by file identity, so insmod by path and
  `modprobe --ignore-install` are stopped too.  A built-in module has no file.

Nothing here says whether the layer runs: callers pass that (kmodd.bpf.detect, or the
daemon's status).  Offline (`--root`), the kernel layer is "would enforce if active".
"""

from __future__ import annotations

import itertools
from collections.abc import Collection
from dataclasses import dataclass

from kmodd.bpf.layout import CONDS_MAX, UID_MAX
from kmodd.helper import normalize
from kmodd.policy import compiler
from kmodd.policy.engine import CompiledPolicy, CompiledRule
from kmodd.policy.types import Source

INTERVALS_MAX = 4 * CONDS_MAX  # uid pieces decided per name; more: the helper decides


def uid_pieces(policy: CompiledPolicy) -> list[tuple[int, int]] | None:
    """The uid ranges on which every requester rule is constant, or None when some
    requester key tests more than the real uid (or there are too many pieces)."""
    cuts = {0, 1, UID_MAX + 1}
    for rule in policy.rules:
        m = rule.requester
        if m is None:
            continue
        if not m.in_kernel:
            return None
        for uid in m.uids or ():
            if 0 <= uid <= UID_MAX:
                cuts.update((uid, uid + 1))
    points = sorted(cuts)
    pieces = [(lo, hi - 1) for lo, hi in itertools.pairwise(points)]
    return pieces if len(pieces) <= INTERVALS_MAX else None


def table_names(tree: compiler.ModuleTree) -> frozenset[str]:
    """The normalized request names the kernel layer's table can hold (snapshot names)."""
    return frozenset(compiler.snapshot_names(tree))


@dataclass(frozen=True, slots=True)
class KernelCoverage:
    """What the kernel layer holds of one deny rule, active or not."""

    requests: bool  # its kernel-request denies of the table's names are decided in-kernel
    files: tuple[str, ...]  # modules whose files kernel_read_file refuses for this rule
    leaves: tuple[str, ...]  # what the kernel layer cannot hold of it, one sentence each

    @property
    def holds(self) -> bool:
        return self.requests or bool(self.files)


def kernel_coverage(
    rule: CompiledRule,
    *,
    in_kernel: bool,
    mine: Collection[str],
    builtins: Collection[str],
    blocker: str | None,
) -> KernelCoverage:
    """RULE's kernel-layer share.  IN_KERNEL: the generation has request names in-kernel
    (uid_pieces is not None); MINE: modules 00-kmodd.conf denies for this rule; BLOCKER:
    the rule whose requester key keeps every name out of the table, if any."""
    kernel_source = rule.sources is None or Source.KERNEL in rule.sources
    requests = kernel_source and in_kernel
    files = tuple(m for m in mine if m not in builtins)
    leaves = []
    if kernel_source and not in_kernel:
        leaves.append(
            f"no request name is decided in-kernel: rule {blocker} tests gid, unit or "
            "container (the kernel layer sees only the real uid); the helper decides"
        )
    elif requests:
        leaves.append(
            "names outside the tree's table (wildcard modaliases, unknown names) pass to the helper"
        )
    built = [m for m in builtins if m in set(mine)]
    if built:
        leaves.append(f"built into the kernel: {', '.join(sorted(built))} (no file to refuse)")
    return KernelCoverage(requests, files, tuple(leaves))


def blocking_rule(policy: CompiledPolicy) -> str | None:
    """The first rule whose requester key the kernel layer cannot decide (None: none,
    every name of the table is decided in-kernel)."""
    if uid_pieces(policy) is not None:
        return None
    for rule in policy.rules:
        m = rule.requester
        if m is not None and (m.gids, m.units, m.container) != (None, None, None):
            return rule.info.id
    return "(too many uid ranges)"


def holds_decision(
    source: Source,
    request: str,
    module: str | None,
    *,
    names: Collection[str],
    in_kernel: bool,
    files: Collection[str],
) -> bool:
    """The kernel layer refuses this deny: an in-kernel request name, or the module's file."""
    if source is Source.KERNEL and in_kernel and normalize(request) in names:
        return True
    return module is not None and module in files


__all__ = [
    "KernelCoverage",
    "blocking_rule",
    "holds_decision",
    "kernel_coverage",
    "table_names",
    "uid_pieces",
]
