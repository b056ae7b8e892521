"""decide(): the matching semantics of docs/policy.md, on hand-built resolutions."""

from __future__ import annotations

from pathlib import Path

import pytest

from kmodd.kmod.model import LoadStep, Resolution, StepKind
from kmodd.policy.engine import (
    CompiledPolicy,
    Request,
    compile_policy,
    decide,
    mode_override,
)
from kmodd.policy.loader import load_policy_files
from kmodd.policy.requests import RequestClass
from kmodd.policy.types import Mode, Source, Verdict


def policy(tmp_path: Path, text: str, *, mode: Mode | None = None) -> CompiledPolicy:
    path = tmp_path / "p.yaml"
    path.write_text("kmodd: 1\n" + text)
    return compile_policy(load_policy_files([path]), mode=mode)


def res(
    name: str,
    modules: tuple[str, ...],
    load: tuple[str, ...] | None = None,
    blacklisted: tuple[str, ...] = (),
) -> Resolution:
    steps = tuple(LoadStep(m, StepKind.INSMOD, f"/m/{m}.ko") for m in (load or modules))
    return Resolution(name, modules, steps, blacklisted)


APPLETALK = res("net-pf-5", ("appletalk",), ("llc", "psnap", "appletalk"))
NOTHING = res("net-pf-99", ())


def test_deny_by_a_load_set_module_names_it(tmp_path: Path) -> None:
    p = policy(
        tmp_path, "rules:\n  - {id: no-llc, action: deny, match: {module: [llc]}, reason: old}\n"
    )
    d = decide(Request("net-pf-5"), APPLETALK, p)
    assert (d.verdict, d.rule, d.module) == (Verdict.DENY, "no-llc", "llc")
    assert d.reason == "llc denied by rule no-llc: old"
    assert d.load_set == ("llc", "psnap", "appletalk")
    assert d.modules == ("appletalk",)
    assert [(t.module, t.rule, t.via) for t in d.trace] == [
        ("llc", "no-llc", "module"),
        ("psnap", "default", "default"),
        ("appletalk", "default", "default"),
    ]
    assert d.request_class is RequestClass.NET_PROTOCOL


def test_allow_reports_the_rule_of_the_resolved_module(tmp_path: Path) -> None:
    p = policy(tmp_path, "rules:\n  - {id: at, action: allow, match: {module: [appletalk]}}\n")
    d = decide(Request("net-pf-5"), APPLETALK, p)
    assert (d.verdict, d.rule, d.module) == (Verdict.ALLOW, "at", "appletalk")


def test_first_match_wins_in_order(tmp_path: Path) -> None:
    p = policy(
        tmp_path,
        "rules:\n"
        "  - {id: allow-net-pf-5, action: allow, match: {request: [net-pf-5]}}\n"
        "  - {id: no-at, action: deny, match: {module: [appletalk]}}\n",
    )
    assert decide(Request("net-pf-5"), APPLETALK, p).rule == "allow-net-pf-5"
    d = decide(Request("appletalk"), res("appletalk", ("appletalk",)), p)
    assert (d.verdict, d.rule) == (Verdict.DENY, "no-at")


def test_request_globs_ignore_dash_underscore(tmp_path: Path) -> None:
    p = policy(tmp_path, "rules:\n  - {id: r, action: deny, match: {request: ['net_pf_*']}}\n")
    assert decide(Request("net-pf-5"), APPLETALK, p).verdict is Verdict.DENY
    assert decide(Request("fs-x"), res("fs-x", ("x",)), p).verdict is Verdict.ALLOW


def test_module_globs_and_classes(tmp_path: Path) -> None:
    p = policy(
        tmp_path,
        "rules:\n"
        "  - {id: ps, action: deny, match: {module: ['ps[m-o]ap', 'x*'],"
        " class: [net_protocol]}}\n",
    )
    assert decide(Request("net-pf-5"), APPLETALK, p).rule == "ps"
    # same modules, other class: the rule does not apply
    assert decide(Request("appletalk"), APPLETALK, p).verdict is Verdict.ALLOW


def test_netfilter_class_covers_ipset_and_conntrack_helpers(tmp_path: Path) -> None:
    """`class: [netfilter]` denies what the kernel asks for ipset types and conntrack
    helpers too (both were class `other` while the compiler knew their prefixes)."""
    p = policy(tmp_path, "rules:\n  - {id: nf, action: deny, match: {class: [netfilter]}}\n")
    for name, module in (
        ("ip_set_hash:ip", "ip_set_hash_ip"),
        ("nfct-helper-ftp", "nf_conntrack_ftp"),
    ):
        d = decide(Request(name), res(name, (module,)), p)
        assert (d.verdict, d.rule, d.request_class) == (Verdict.DENY, "nf", RequestClass.NETFILTER)
    assert decide(Request("fs-vfat"), res("fs-vfat", ("vfat",)), p).verdict is Verdict.ALLOW


def test_source_condition(tmp_path: Path) -> None:
    p = policy(
        tmp_path,
        "default: deny\nrules:\n  - {id: udev-ok, action: allow, match: {source: [udev]}}\n",
    )
    assert decide(Request("net-pf-5", Source.UDEV), APPLETALK, p).verdict is Verdict.ALLOW
    d = decide(Request("net-pf-5", Source.KERNEL), APPLETALK, p)
    assert (d.verdict, d.rule, d.module) == (Verdict.DENY, "default", "llc")
    assert d.reason == "llc: no rule matches; the default is deny"


def test_unresolvable_names_only_see_request_rules(tmp_path: Path) -> None:
    p = policy(
        tmp_path,
        "rules:\n"
        "  - {id: mod, action: deny, match: {module: ['*']}}\n"
        "  - {id: cls, action: deny, match: {class: [net_protocol]}, reason: r}\n",
    )
    d = decide(Request("net-pf-99"), NOTHING, p)
    assert (d.verdict, d.rule, d.module, d.reason) == (Verdict.DENY, "cls", None, "rule cls: r")
    d = decide(Request("nothing-here"), res("nothing-here", ()), p)
    assert (d.verdict, d.rule) == (Verdict.ALLOW, "default")


def test_blacklisted_resolved_modules_still_count(tmp_path: Path) -> None:
    p = policy(tmp_path, "rules:\n  - {id: m, action: deny, match: {module: [foo]}}\n")
    r = Resolution("alias-x", ("foo",), (), ("foo",))
    assert decide(Request("alias-x"), r, p).verdict is Verdict.DENY


def test_permissive_mode(tmp_path: Path) -> None:
    text = "mode: permissive\nrules:\n  - {id: m, action: deny, match: {module: [llc]}}\n"
    d = decide(Request("net-pf-5"), APPLETALK, policy(tmp_path, text))
    assert (d.verdict, d.effective, d.would_deny, d.mode) == (
        Verdict.DENY,
        Verdict.ALLOW,
        True,
        Mode.PERMISSIVE,
    )
    d = decide(Request("net-pf-5"), APPLETALK, policy(tmp_path, text, mode=Mode.ENFORCE))
    assert (d.effective, d.would_deny) == (Verdict.DENY, False)


def test_empty_policy_allows_everything(tmp_path: Path) -> None:
    d = decide(Request("net-pf-5"), APPLETALK, policy(tmp_path, ""))
    assert (d.verdict, d.rule, d.module) == (Verdict.ALLOW, "default", "appletalk")


@pytest.mark.parametrize(
    ("cmdline", "expected"),
    [
        ("", None),
        ("quiet kmodd.mode=permissive", Mode.PERMISSIVE),
        ("kmodd.mode=permissive kmodd.mode=enforce", Mode.ENFORCE),
        ('kmodd.mode="permissive"', Mode.PERMISSIVE),
        ("kmodd.mode=learn", Mode.LEARN),
        ("kmodd.mode=learning", None),
        ("kmodd.mode", None),
        ("xkmodd.mode=permissive", None),
    ],
)
def test_mode_override(cmdline: str, expected: Mode | None) -> None:
    assert mode_override(cmdline) == expected


def test_shared_dependencies_are_considered_once(tmp_path: Path) -> None:
    p = policy(tmp_path, "rules:\n  - {id: m, action: deny, match: {module: [b]}}\n")
    r = res("pci:x", ("b", "c"), ("a", "b", "a", "c"))
    d = decide(Request("pci:x", Source.UDEV), r, p)
    assert [t.module for t in d.trace] == ["a", "b", "c"]
    assert d.load_set == ("a", "b", "c")  # modprobe -D prints a, b, a, c: each loads once
    assert (d.verdict, d.module) == (Verdict.DENY, "b")
