"""A generation as the kernel layer's tables, on the real Debian tree: the in-kernel
verdict of every name must equal decide() for every uid (exact, or no entry at all)."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmodd.bpf.layout import NO_RULE, UID_MAX, Condition, FileIdentity, Mode, NameRules, Verdict
from kmodd.daemon.generation import BuildOptions, Generation, build_generation
from kmodd.daemon.kernel_tables import Compiled, compile_tables, kmod_version, load_data_verdict
from kmodd.paths import make_paths
from kmodd.policy.kernelcov import uid_pieces
from kmodd.policy.requester import RequesterFacts
from kmodd.policy.types import Source
from kmodd.policy.types import Verdict as PolicyVerdict
from tests.daemon.running import BASE_POLICY, SystemRoot, make_root
from tests.kerneltree import KernelTree

REPO = Path(__file__).resolve().parents[2]
MODHARDEN = (REPO / "policies/20-modharden.yaml.example").read_text()
UID_RULES = (
    BASE_POLICY
    + """\
  - id: lab-users
    action: deny
    match: {module: [appletalk], requester: {uid: [1000, 1001, 1002, 5000]}}
"""
)
UNIT_RULES = (
    BASE_POLICY
    + """\
  - id: by-unit
    action: deny
    match: {module: [appletalk], requester: {unit: ["user@*.service"]}}
"""
)


@pytest.fixture
def sr(kernel_tree: KernelTree) -> Iterator[SystemRoot]:
    root = make_root(kernel_tree)
    yield root
    shutil.rmtree(root.root.parent, ignore_errors=True)


def build(sr: SystemRoot, *texts: str) -> Generation:
    for i, text in enumerate(texts):
        sr.write_policy(text, f"{10 + i}-test.yaml")
    paths = make_paths(str(sr.root), sr.release, str(sr.runtime))
    paths.runtime_dir.mkdir(exist_ok=True)
    return build_generation(1, paths, BuildOptions(cmdline=sr.cmdline))


def kernel_verdict(entry: NameRules | None, uid: int) -> Verdict:
    """What kmodd.bpf.c's decide() returns for a requester with real uid UID."""
    if entry is None:
        return Verdict.PASS
    for c in entry.conditions:
        if _matches(c, uid):
            return c.verdict
    return entry.fallback


def _matches(c: Condition, uid: int) -> bool:
    if c.uid is not None and not c.uid[0] <= uid <= c.uid[1]:
        return False
    return c.unprivileged is None or (uid != 0) is c.unprivileged


def test_modharden_denies_unprivileged_requesters_in_kernel_exactly(sr: SystemRoot) -> None:
    gen = build(sr, BASE_POLICY, MODHARDEN)
    try:
        compiled = compile_tables(gen)
        names = compiled.tables.names
        assert names[""] == NameRules()  # names outside the table: the helper decides
        pf5 = names["net_pf_5"]
        rule = compiled.rule_ids[pf5.conditions[0].rule]
        assert rule == "modharden"
        for uid in (0, 1, 1000, 65534, UID_MAX):
            policy = gen.decide("net-pf-5", Source.KERNEL, RequesterFacts(uid, uid, uid))
            want = Verdict.DENY if policy.verdict is PolicyVerdict.DENY else Verdict.ALLOW
            assert kernel_verdict(pf5, uid) is want, uid
        # every piece no condition denies is allowed in-kernel: never left to the helper
        assert pf5.fallback is Verdict.ALLOW
        assert {"net_pf_5", "fuse", "algif_aead"} <= compiled.domain
        # the allow list: fuse is allowed for users, so nobody is denied it in-kernel
        assert "fuse" not in names
        # algif_aead is denied for everybody (root by copy-fail; a user's load set meets
        # modharden first: its crypto dependencies load before it)
        aead = names["algif_aead"]
        assert [kernel_verdict(aead, uid) for uid in (0, 1, 65534)] == [Verdict.DENY] * 3
        assert compiled.rule_ids[aead.conditions[0].rule] == "copy-fail"
        assert compiled.tables.mode is Mode.ENFORCE
    finally:
        gen.close()


def test_uid_sets_become_ranges_and_match_decide_for_every_piece(sr: SystemRoot) -> None:
    gen = build(sr, UID_RULES)
    try:
        pieces = uid_pieces(gen.compiled)
        assert pieces is not None
        assert (1000, 1002) not in pieces and (1000, 1000) in pieces
        entry = compile_tables(gen).tables.names["appletalk"]
        assert [c.uid for c in entry.conditions] == [(1000, 1002), (5000, 5000)]
        for uid in (0, 999, 1000, 1002, 1003, 4999, 5000, 5001):
            d = gen.decide("appletalk", Source.KERNEL, RequesterFacts(uid, uid, uid))
            want = Verdict.DENY if d.verdict is PolicyVerdict.DENY else Verdict.ALLOW
            assert kernel_verdict(entry, uid) is want, uid
    finally:
        gen.close()


BASELINE = (REPO / "policies/10-baseline.yaml").read_text()
# Matches one name no tree has: changes no decision, but is a requester key, so the
# tables are decided per uid piece (0, 1-4241, 4242, 4243-) instead of once per name.
INERT_REQUESTER_RULE = """\
kmodd: 1
rules:
  - id: inert
    action: deny
    match: {request: [kmodd-test-never], requester: {uid: [4242]}}
"""


def _by_rule_id(compiled: Compiled) -> dict[str, tuple[object, ...]]:
    """The name table with rule ids for indices (two policies number their rules apart)."""
    ids = compiled.rule_ids
    return {
        key: (
            tuple((c.verdict, ids[c.rule], c.uid, c.unprivileged) for c in e.conditions),
            e.fallback,
            "-" if e.fallback_rule == NO_RULE else ids[e.fallback_rule],
        )
        for key, e in compiled.tables.names.items()
    }


def test_without_requester_rules_the_snapshots_decisions_make_the_same_tables(
    sr: SystemRoot,
) -> None:
    """The shipped baseline has no requester key: one decision per name, the snapshot's
    own.  The tables must be what deciding every uid piece afresh gives."""
    gen = build(sr, BASELINE)
    per_piece = build(sr, BASELINE, INERT_REQUESTER_RULE)
    try:
        assert gen.kernel_decisions and set(gen.table_names) <= set(gen.kernel_decisions)
        assert uid_pieces(per_piece.compiled) is not None
        fast = compile_tables(gen)
        assert _by_rule_id(fast) == _by_rule_id(compile_tables(per_piece))
        # and what deciding every name again (nothing kept by the build) gives
        bare = dataclasses.replace(gen, kernel_decisions={}, table_names={})
        assert _by_rule_id(compile_tables(bare)) == _by_rule_id(fast)
        assert fast.domain == compile_tables(bare).domain
        assert len(fast.tables.names) > 100  # the baseline's denies are in the table
    finally:
        gen.close()
        per_piece.close()


def test_a_rule_on_what_the_kernel_cannot_see_leaves_requests_to_the_helper(
    sr: SystemRoot,
) -> None:
    gen = build(sr, UNIT_RULES)
    try:
        compiled = compile_tables(gen)
        assert uid_pieces(gen.compiled) is None
        assert compiled.tables.names == {"": NameRules()}
        assert compiled.domain == frozenset()  # the daemon decides: unknown_requester
        assert "unit" in compiled.in_kernel
    finally:
        gen.close()


def test_denied_module_files_by_identity(sr: SystemRoot) -> None:
    gen = build(sr, BASE_POLICY)
    try:
        files = compile_tables(gen).tables.files
        path = gen.kmod.module_info("algif_aead").path
        assert path is not None
        assert [ident for ident, _ in files] == [FileIdentity.of(path)]
        assert all(rule != NO_RULE for _, rule in files)
    finally:
        gen.close()


NO_MODULE_REQUEST = """\
kmodd: 1
rules:
  - id: no-ipx
    action: deny
    match: {request: [net-pf-4]}
"""


def test_a_denied_request_name_without_a_module_keeps_the_layer(sr: SystemRoot) -> None:
    """net-pf-4 has no module in 6.1: its rendered install line names no file.  The other
    rules' tables must still be built (it emptied them, kernel layer inactive)."""
    gen = build(sr, BASE_POLICY, NO_MODULE_REQUEST)
    try:
        assert "net_pf_4" in gen.denied_modules or "net-pf-4" in gen.denied_modules
        tables = compile_tables(gen).tables
        path = gen.kmod.module_info("algif_aead").path
        assert path is not None
        assert [ident for ident, _ in tables.files] == [FileIdentity.of(path)]
        assert "algif_aead" in tables.names or "algif-aead" in tables.names
    finally:
        gen.close()


def test_load_data_is_denied_only_where_no_loader_needs_it(tmp_path: Path) -> None:
    (tmp_path / "modules.dep").write_text("kernel/fs/vfat.ko.xz: kernel/fs/fat.ko.xz\n")
    assert load_data_verdict(tmp_path, tmp_path / "sys", 34) is Verdict.ALLOW
    (tmp_path / "sys/compression").mkdir(parents=True)  # the kernel decompresses itself
    assert load_data_verdict(tmp_path, tmp_path / "sys", 34) is Verdict.DENY
    # ... but kmod 30 (Debian 12) decompresses in userspace and calls init_module anyway:
    # a deny refused every compressed load (6.12 with Debian 12's userspace, in the VM).
    assert load_data_verdict(tmp_path, tmp_path / "sys", 30) is Verdict.ALLOW
    assert load_data_verdict(tmp_path, tmp_path / "sys", None) is Verdict.ALLOW
    assert kmod_version() == int(
        subprocess.run(["modprobe", "--version"], capture_output=True, text=True, check=True)
        .stdout.split()[2]
        .split(".")[0]
    )
    (tmp_path / "modules.dep").write_text("kernel/fs/vfat.ko: kernel/fs/fat.ko\n")
    assert load_data_verdict(tmp_path, tmp_path / "nosys") is Verdict.DENY
