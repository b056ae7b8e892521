"""kmodd.policy.coverage on the real Debian tree: which layer holds each deny rule."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kmodd.kmod.context import KmodContext
from kmodd.policy.coverage import Layer, RuleCoverage, check, enforcing_layers, rule_coverage
from kmodd.policy.engine import CompiledPolicy, Request, compile_policy, decide
from kmodd.policy.loader import load_policy_files
from kmodd.policy.types import Mode, Source
from tests.kerneltree import KernelTree

BASELINE = Path(__file__).resolve().parents[2] / "policies/10-baseline.yaml"


@pytest.fixture(scope="module")
def ctx(kernel_tree: KernelTree) -> Iterator[KmodContext]:
    with KmodContext(kernel_tree.root, kernel_tree.release, config_paths=[]) as context:
        yield context


def compiled(tmp_path: Path, text: str, *, mode: Mode | None = None) -> CompiledPolicy:
    path = tmp_path / "p.yaml"
    path.write_text("kmodd: 1\n" + text)
    return compile_policy(load_policy_files([path]), mode=mode)


def by_rule(policy: CompiledPolicy, ctx: KmodContext) -> dict[str, RuleCoverage]:
    return {c.rule: c for c in rule_coverage(policy, ctx)}


def test_unconditional_module_rule_is_held_by_helper_and_modprobe_d(
    ctx: KmodContext, tmp_path: Path
) -> None:
    policy = compiled(
        tmp_path, "rules:\n  - {id: cf, action: deny, match: {module: [algif_aead]}}\n"
    )
    (cov,) = rule_coverage(policy, ctx)
    assert cov.rule == "cf"
    assert cov.layers == {Layer.HELPER, Layer.MODPROBE_D}
    assert cov.gaps == ()
    assert cov.enforced
    assert cov.modules == ("algif_aead",)
    assert cov.remedy is None
    (active,) = rule_coverage(policy, ctx, kernel_active=True)
    assert Layer.KERNEL in active.layers


def test_builtin_module_is_reported_with_the_cmdline_remedy(
    ctx: KmodContext, tmp_path: Path
) -> None:
    builtin = sorted(ctx.builtin_names())
    assert "bsg" in builtin  # Debian 6.1 and 6.12 build block/bsg in (mm/zswap: only 6.1 lists it)
    policy = compiled(tmp_path, "rules:\n  - {id: no-bsg, action: deny, match: {module: [bsg]}}\n")
    (cov,) = rule_coverage(policy, ctx)
    assert not cov.enforced
    assert cov.builtins == ("bsg",)
    assert any("built into the kernel" in gap for gap in cov.gaps)
    assert cov.remedy is not None and "initcall_blacklist=bsg_init" in cov.remedy
    lines = check(policy, ctx)
    assert lines and all(line.startswith("coverage: rule no-bsg") for line in lines)


def test_source_and_request_conditions(ctx: KmodContext, tmp_path: Path) -> None:
    policy = compiled(
        tmp_path,
        "rules:\n"
        "  - {id: udev-usb, action: deny, match: {module: [usb_storage], source: [udev]}}\n"
        "  - {id: kern-coda, action: deny, match: {module: [coda], source: [kernel]}}\n"
        "  - {id: req-glob, action: deny, match: {request: ['fs-hfs*']}}\n"
        "  - {id: cls, action: deny, match: {module: [sctp], class: [net_protocol]}}\n"
        "  - {id: who, action: deny, match: {module: [dccp], requester: {unprivileged: true}}}\n",
    )
    cov = by_rule(policy, ctx)
    udev = cov["udev-usb"]
    assert udev.layers == {Layer.MODPROBE_D}
    assert udev.modules == ("usb_storage",) and udev.overblocks == ("usb_storage",)
    assert any("also refuses kernel requests" in g for g in udev.gaps)
    coda = cov["kern-coda"]
    assert coda.layers == {Layer.HELPER} and coda.enforced
    glob = cov["req-glob"]
    assert glob.layers == {Layer.HELPER, Layer.MODPROBE_D}  # fs_hfs, fs_hfsplus exact
    assert set(glob.unheld) >= {"hfs", "hfsplus"}  # loaded by name: not this rule's
    assert any("exact request names held: fs_hfs" in g for g in glob.gaps)
    cls = cov["cls"]
    assert cls.layers == {Layer.HELPER} and cls.unheld == ("sctp",)
    assert any("request/class keys are invisible to kmod" in g for g in cls.gaps)
    who = cov["who"]
    assert who.layers == {Layer.HELPER} and who.snapshot_gap and who.unheld == ()


def test_default_deny_after_a_conditional_allow(ctx: KmodContext, tmp_path: Path) -> None:
    """An allow that only some requests reach leaves those modules to the daemon: the
    default deny cannot be rendered for them, and coverage names them."""
    policy = compiled(
        tmp_path,
        "default: deny\n"
        "rules:\n"
        "  - {id: gcm-ok, action: allow, match: {request: [gcm_base]}}\n"
        "  - {id: ext4-ok, action: allow, match: {module: [ext4, jbd2, mbcache, crc16]}}\n",
    )
    (default,) = rule_coverage(policy, ctx)
    assert default.rule == "default"
    assert "gcm" in default.unheld and "ext4" not in default.unheld
    assert "algif_aead" in default.modules  # rendered: no allow reaches it
    assert default.remedy is not None and "module_blacklist=" in default.remedy


def test_permissive_enforces_nothing(ctx: KmodContext) -> None:
    policy = compile_policy(load_policy_files([BASELINE]), mode=Mode.PERMISSIVE)
    assert all(not c.layers and c.gaps for c in rule_coverage(policy, ctx))


def test_enforcing_layers_for_one_decision(ctx: KmodContext) -> None:
    policy = compile_policy(load_policy_files([BASELINE]))
    d = decide(Request("algif_aead"), ctx.resolve("algif_aead"), policy)
    rendered = {"algif_aead"}
    assert enforcing_layers(d, Source.KERNEL, rendered=rendered) == {Layer.HELPER, Layer.MODPROBE_D}
    assert enforcing_layers(d, Source.UDEV, rendered=rendered) == {Layer.MODPROBE_D}
    assert enforcing_layers(d, Source.UDEV) == frozenset()
    assert enforcing_layers(d, Source.KERNEL, rendered=rendered, builtins={"algif_aead"}) == set()
    allowed = decide(Request("ext4"), ctx.resolve("ext4"), policy)
    assert enforcing_layers(allowed, Source.KERNEL, rendered=rendered) == frozenset()


def test_baseline_coverage_is_complete_on_debian(ctx: KmodContext) -> None:
    """Every deny rule of the shipped baseline is held on Debian's 6.1 tree."""
    policy = compile_policy(load_policy_files([BASELINE]))
    covs = rule_coverage(policy, ctx)
    assert covs
    for cov in covs:
        assert Layer.HELPER in cov.layers, cov
    print("baseline coverage:", [(c.rule, sorted(c.layers), len(c.gaps)) for c in covs])
