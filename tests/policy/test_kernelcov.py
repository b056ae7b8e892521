"""kmodd.policy.kernelcov on the real Debian tree: what the kernel layer holds per rule and
per decision, against the tables kmodd.daemon.kernel_tables would fill."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kmodd.kmod.context import KmodContext
from kmodd.policy.coverage import Layer, enforcing_layers, rule_coverage
from kmodd.policy.engine import CompiledPolicy, Request, compile_policy, decide
from kmodd.policy.kernelcov import blocking_rule, holds_decision, table_names
from kmodd.policy.loader import load_policy_files
from kmodd.policy.types import Source
from tests.kerneltree import KernelTree

MODHARDEN = Path(__file__).resolve().parents[2] / "policies/20-modharden.yaml.example"


@pytest.fixture(scope="module")
def ctx(kernel_tree: KernelTree) -> Iterator[KmodContext]:
    with KmodContext(kernel_tree.root, kernel_tree.release, config_paths=[]) as context:
        yield context


def compiled(tmp_path: Path, text: str) -> CompiledPolicy:
    path = tmp_path / "p.yaml"
    path.write_text("kmodd: 1\n" + text)
    return compile_policy(load_policy_files([path]))


def test_a_module_rule_is_held_by_request_name_and_by_file(
    ctx: KmodContext, tmp_path: Path
) -> None:
    policy = compiled(
        tmp_path, "rules:\n  - {id: cf, action: deny, match: {module: [algif_aead]}}\n"
    )
    (cov,) = rule_coverage(policy, ctx)
    assert cov.kernel is not None and cov.kernel.holds
    assert cov.kernel.requests and cov.kernel.files == ("algif_aead",)
    assert Layer.KERNEL not in cov.layers  # not active: "would enforce if active"
    (active,) = rule_coverage(policy, ctx, kernel_active=True)
    assert Layer.KERNEL in active.layers


def test_a_builtin_has_no_file_and_a_kernel_only_rule_renders_none(
    ctx: KmodContext, tmp_path: Path
) -> None:
    policy = compiled(
        tmp_path,
        "rules:\n"
        "  - {id: zs, action: deny, match: {module: [bsg]}}\n"
        "  - {id: coda, action: deny, match: {module: [coda], source: [kernel]}}\n",
    )
    cov = {c.rule: c for c in rule_coverage(policy, ctx, kernel_active=True)}
    bsg = cov["zs"].kernel
    assert bsg is not None and bsg.files == ()
    assert any("built into the kernel: bsg" in leave for leave in bsg.leaves)
    coda = cov["coda"].kernel
    assert coda is not None and coda.requests and coda.files == ()  # not rendered: no file
    assert Layer.KERNEL in cov["coda"].layers


def test_a_gid_requester_key_keeps_every_name_out_of_the_table(
    ctx: KmodContext, tmp_path: Path
) -> None:
    policy = compiled(
        tmp_path,
        "rules:\n"
        "  - {id: wheel, action: allow, match: {requester: {gid: [10]}}}\n"
        "  - {id: cf, action: deny, match: {module: [algif_aead]}}\n",
    )
    assert blocking_rule(policy) == "wheel"
    (cov,) = rule_coverage(policy, ctx, kernel_active=True)
    assert cov.kernel is not None and not cov.kernel.requests
    assert cov.kernel.files == cov.modules  # files: exactly what 00-kmodd.conf renders
    assert "rule wheel tests gid" in cov.kernel.leaves[0]


def test_modharden_is_decided_in_kernel(ctx: KmodContext) -> None:
    policy = compile_policy(load_policy_files([MODHARDEN]))
    assert blocking_rule(policy) is None  # unprivileged: a function of the real uid
    cov = {c.rule: c for c in rule_coverage(policy, ctx)}
    held = cov["modharden"].kernel
    assert held is not None and held.requests and held.files == ()


def test_decisions_by_name_in_the_table_or_by_file(ctx: KmodContext, tmp_path: Path) -> None:
    policy = compiled(
        tmp_path, "rules:\n  - {id: cf, action: deny, match: {module: [algif_aead]}}\n"
    )
    names = table_names(ctx)
    assert "algif_aead" in names  # normalized, as the program looks names up
    # a name outside the table: the kernel passes it to the helper
    assert not holds_decision(
        Source.KERNEL, "no-such-x", None, names=names, in_kernel=True, files=()
    )
    # an admin's load of a rendered module: its file is refused whoever asks
    assert holds_decision(
        Source.CLI, "algif_aead", "algif_aead", names=names, in_kernel=True, files={"algif_aead"}
    )
    d = decide(Request("algif-aead", Source.KERNEL), ctx.resolve("algif-aead"), policy)
    on = enforcing_layers(d, Source.KERNEL, kernel_active=True, kernel_names=names)
    off = enforcing_layers(d, Source.KERNEL, kernel_active=False, kernel_names=names)
    assert Layer.KERNEL in on and Layer.KERNEL not in off
    gone = enforcing_layers(
        d, Source.KERNEL, kernel_active=True, kernel_names=names, kernel_in_table=False
    )
    assert Layer.KERNEL not in gone  # no names in-kernel and the module is not rendered
