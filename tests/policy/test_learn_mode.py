"""Mode `learn`: every deny is let through and logged as would-deny, nothing is rendered
for kmod, the helper's snapshot says permissive (the helper knows no other non-blocking
mode), and the kernel command line can select it."""

from __future__ import annotations

from pathlib import Path

from kmodd import helper
from kmodd.contract.journal import MessageId
from kmodd.daemon import records
from kmodd.kmod.model import LoadStep, Resolution, StepKind
from kmodd.policy import compiler
from kmodd.policy.engine import Request, compile_policy, decide, mode_override
from kmodd.policy.loader import load_policy_files
from kmodd.policy.types import Mode, Source, Verdict

POLICY = """\
kmodd: 1
mode: learn
rules:
  - id: copy-fail
    action: deny
    match: {module: [algif_aead]}
"""


class Tree:
    """The little of a module tree the compiler asks for."""

    def resolve(self, name: str) -> Resolution:
        module = helper.normalize(name)
        return Resolution(name, (module,), (LoadStep(module, StepKind.INSMOD, "/x.ko"),))

    def module_names(self) -> tuple[str, ...]:
        return ("algif_aead", "ext4")

    def alias_patterns(self) -> tuple[tuple[str, str], ...]:
        return (("algif-aead", "algif_aead"),)

    def config_aliases(self) -> tuple[tuple[str, str], ...]:
        return ()


def test_learn_lets_denies_through_and_logs_them(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(POLICY)
    policy = compile_policy(load_policy_files([path]))
    assert policy.mode is Mode.LEARN
    d = decide(Request("algif-aead", Source.KERNEL), Tree().resolve("algif-aead"), policy)
    assert (d.verdict, d.effective, d.would_deny) == (Verdict.DENY, Verdict.ALLOW, True)
    record = records.decision(d, 1)
    assert record.message_id is MessageId.WOULD_DENY
    assert record.message.startswith("would deny (learn) algif-aead")
    assert record.fields["KMODD_MODE"] == "learn"
    text = compiler.render_enforcement(policy, Tree())
    assert "# learn mode: nothing is enforced through modprobe.d" in text
    assert "install" not in text
    snapshot = compiler.render_snapshot(policy, Tree(), decide, 1)
    assert b"\nmode permissive\n" in snapshot
    assert b"algif_aead d copy-fail\n" in snapshot  # the verdict stays: would-deny on fallback


def test_kernel_command_line_selects_learn() -> None:
    assert mode_override("quiet kmodd.mode=learn") is Mode.LEARN
