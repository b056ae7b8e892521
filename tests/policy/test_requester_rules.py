"""`match: requester:` end to end: schema, engine decisions with known, unknown and
contained requesters, the compiler (modprobe.d cannot tell requesters apart), and the
shipped MODHARDEN-style example."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from kmodd.errors import InvalidInputError
from kmodd.kmod.model import LoadStep, Resolution, StepKind
from kmodd.policy import compiler
from kmodd.policy.engine import CompiledPolicy, Request, compile_policy, decide
from kmodd.policy.loader import load_policy_files
from kmodd.policy.requester import RequesterFacts
from kmodd.policy.types import Source, Verdict

MODHARDEN = Path(__file__).resolve().parents[2] / "policies/20-modharden.yaml.example"
ROOT = RequesterFacts(uid=0, euid=0, gid=0, unit="cron.service")
NOBODY = RequesterFacts(uid=65534, euid=65534, gid=65534)
SETUID = RequesterFacts(uid=1000, euid=0, gid=1000)
CONTAINED = RequesterFacts(uid=100000, euid=100000, gid=100000, container=True)


def load(tmp_path: Path, text: str) -> CompiledPolicy:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return compile_policy(load_policy_files([path]))


def res(name: str, *modules: str) -> Resolution:
    steps = tuple(LoadStep(m, StepKind.INSMOD, f"/x/{m}.ko") for m in modules)
    return Resolution(name, modules[-1:], steps)


def verdict(
    policy: CompiledPolicy,
    who: RequesterFacts | None,
    name: str = "net-pf-5",
    modules: tuple[str, ...] = ("llc", "psnap", "appletalk"),
    source: Source = Source.KERNEL,
) -> tuple[Verdict, str]:
    d = decide(Request(name, source, who), res(name, *modules), policy)
    return d.verdict, d.rule


def test_modharden_example(tmp_path: Path) -> None:
    policy = compile_policy(load_policy_files([MODHARDEN]))
    assert policy.uses_requester
    assert verdict(policy, ROOT) == (Verdict.ALLOW, "default")
    assert verdict(policy, NOBODY) == (Verdict.DENY, "modharden")
    assert verdict(policy, SETUID) == (Verdict.DENY, "modharden")
    assert verdict(policy, CONTAINED) == (Verdict.DENY, "modharden")
    assert verdict(policy, NOBODY, "char-major-10-229", ("fuse",)) == (
        Verdict.ALLOW,
        "modharden-allow-list",
    )
    assert verdict(policy, NOBODY, "fs-vfat", ("fat", "vfat", "nls_cp437"))[0] is Verdict.DENY
    # A kernel request whose requester is unknown: the rule decides by unknown_requester
    # (deny by default: fail closed, root's request too) ...
    assert verdict(policy, None) == (Verdict.DENY, "modharden")
    assert verdict(policy, None, "char-major-10-229", ("fuse",)) == (
        Verdict.DENY,
        "modharden-allow-list",
    )
    opened = replace(policy, unknown_requester=Verdict.ALLOW)
    assert verdict(opened, None) == (Verdict.ALLOW, "modharden")
    # ... and a udev or cli request has no requester: the rules never apply.
    assert verdict(policy, NOBODY, source=Source.UDEV) == (Verdict.ALLOW, "default")
    assert verdict(policy, None, source=Source.CLI) == (Verdict.ALLOW, "default")


def test_every_key(tmp_path: Path) -> None:
    policy = load(
        tmp_path,
        """\
kmodd: 1
default: deny
rules:
  - id: by-uid
    action: allow
    match: {module: [a], requester: {uid: [1000]}}
  - id: by-gid
    action: allow
    match: {module: [b], requester: {gid: [65534]}}
  - id: by-unit
    action: allow
    match: {module: [c], requester: {unit: ["cron.*"]}}
  - id: by-container
    action: allow
    match: {module: [d], requester: {container: true}}
  - id: root-only
    action: allow
    match: {module: [e], requester: {unprivileged: false}}
""",
    )
    table = {
        "a": [SETUID],
        "b": [NOBODY],
        "c": [ROOT],
        "d": [CONTAINED],
        "e": [ROOT],
    }
    for module, allowed in table.items():
        for who in (ROOT, NOBODY, SETUID, CONTAINED, None):
            want = Verdict.ALLOW if who in allowed else Verdict.DENY
            assert verdict(policy, who, f"x-{module}", (module,))[0] is want, (module, who)


@pytest.mark.parametrize(
    ("match", "message"),
    [
        ("{requester: {}}", "a requester match needs at least one of"),
        ("{requester: {uid: [-1]}}", "greater than or equal to 0"),
        ('{requester: {uid: ["0"]}}', "valid integer"),
        ("{requester: {unprivileged: yes-please}}", "valid boolean"),
        ("{requester: {unit: []}}", "at least 1 item"),
        ("{requester: {pid: [1]}}", "unknown key 'pid'"),
    ],
)
def test_invalid(tmp_path: Path, match: str, message: str) -> None:
    text = f"kmodd: 1\nrules:\n  - id: r\n    action: deny\n    match: {match}\n"
    with pytest.raises(InvalidInputError) as err:
        load(tmp_path, text)
    assert any(message in issue.message for issue in err.value.issues), err.value.issues


def test_requester_rules_are_never_rendered_for_everybody(tmp_path: Path) -> None:
    """modprobe.d cannot tell who asked: a requester-scoped deny must not become an
    `install X /bin/false` for root too, and a requester-scoped allow hides later denies."""
    policy = load(
        tmp_path,
        """\
kmodd: 1
rules:
  - id: users-no-x
    action: deny
    match: {module: [x], requester: {unprivileged: true}}
  - id: root-y
    action: allow
    match: {module: [y], requester: {uid: [0]}}
  - id: no-y
    action: deny
    match: {module: [y, z]}
""",
    )
    assert compiler.module_verdict(policy, "x") == (Verdict.ALLOW, "default")
    assert compiler.module_verdict(policy, "y") is None
    assert compiler.module_verdict(policy, "z") == (Verdict.DENY, "no-y")
