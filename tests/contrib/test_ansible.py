"""contrib/ansible for real: `ansible-playbook` runs the example playbook and the kmodd role
against a Debian chroot of this machine's release (debootstrap minbase + python3,
python3-venv, kmod, systemd: tests/contrib/target.py), through the test's chroot
connection (tests/contrib/ansible_plugins: ansible-core has none, see there).

The target gets kmodd by the venv route, from this checkout's wheel and its dependencies'
wheels (built on this machine: the same Debian release, so the same Python as the
target), so no pip index is needed inside it.  Its recorded decisions are real kmodd records: the
daemon's journal sink writes them into a journald instance that runs as host
"ansible-target" (tests/journald.py), whose journal files are copied into the target; the
role's gate reads them there with `kmodctl simulate --directory`.  The Debian kernel tree
(tests/kerneltree.py) is bind-mounted at the target's /lib/modules/RELEASE in a private
mount namespace, so simulate resolves `algif-aead` as a real machine does.

One module-scoped target goes through: learn (install, deploy) -> simulate -> permissive
-> enforce; enforce again (changed=0); --check --diff with a new policy (reports the
change and the diff, nothing on the target changes); a candidate that denies algif_aead,
which the records show in use: the play fails with the gate's message and the deployed
policy is untouched.  (That candidate passes --check at stage learn above: learn has no
gate.)

Time, measured at load 10-12 on this 2-core machine: 8 min 6 s with the target cached
(7 playbook runs, ~50 s each, the first with the venv install ~110 s; building the wheels
~40 s); the whole tree used 2 min 21 s of CPU (user+sys), so ~2.5 min on an idle CI
machine.  Cold: + debootstrap (6 min 27 s here, 54 s of it CPU; mostly the mirror).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import journald
from tests.cli.recording import Entry, write
from tests.conftest import root_required
from tests.contrib.target import Target, ensure_target, wheels
from tests.kerneltree import KernelTree

# The first test's setup can build the target (debootstrap, 6.5 min cold on a loaded
# 2-core machine) before its four playbook runs: more than the suite's 600 s default.
pytestmark = [root_required, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[2]
CONTRIB = REPO / "contrib" / "ansible"
PLUGINS = Path(__file__).resolve().parent / "ansible_plugins" / "connection"
PLAYBOOK_TIMEOUT_S = 600
JOURNAL_IN_TARGET = "/var/lib/kmodd-test/journal"
MANAGED = ("etc/kmodd", "var/lib/kmodd-ansible", "opt/kmodd", "usr/local/libexec/kmodd")

GOOD = """\
kmodd: 1
default: allow
rules:
  - id: no-appletalk
    action: deny
    match:
      module: [appletalk]
    reason: unused legacy protocol
"""
# What a site might push after the next CVE: algif_aead is what charon uses on this host.
BREAKS = (
    GOOD
    + """\
  - id: copy-fail
    action: deny
    match:
      module: [algif_aead]
    reason: "CVE-2026-31431"
"""
)
RECORDED = [
    Entry("algif-aead", ["af_alg", "algif_aead"], mode="learn", uid=0, comm="charon"),
    Entry("fs-vfat", ["fat", "vfat"], mode="learn", uid=0, comm="mount"),
]


@dataclass(frozen=True)
class Run:
    rc: int
    out: str
    changed: int
    failed: int


def recap(out: str) -> tuple[int, int]:
    found = re.search(r"changed=(\d+)\s+unreachable=\d+\s+failed=(\d+)", out)
    assert found, f"no PLAY RECAP in:\n{out}"
    return int(found.group(1)), int(found.group(2))


@dataclass(frozen=True)
class Controller:
    target: Target
    tree: KernelTree
    scratch: Path

    def play(self, name: str, stage: str, policy: str, *extra: str) -> Run:
        vars_file = self.scratch / f"{name}.json"
        wheel_paths = [str(p) for p in sorted(self.target.wheels.glob("*.whl"))]
        facts = {
            "kmodd_stage": stage,
            "kmodd_policies": {"10-site.yaml": policy},
            "kmodd_wheels": wheel_paths,
            "kmodd_kernel": self.tree.release,
            "kmodd_gate_directory": JOURNAL_IN_TARGET,
            "kmodd_manage_service": False,  # no systemd runs in a chroot
            "ansible_become": False,
        }
        vars_file.write_text(json.dumps(facts))
        modules = self.target.root / "lib/modules" / self.tree.release
        modules.mkdir(parents=True, exist_ok=True)
        source = self.tree.module_dir  # usr/lib/modules on Debian 13's (merged-/usr) tree
        argv = [str(REPO / ".venv/bin/ansible-playbook"), "-i", str(self.inventory())]
        argv += [str(CONTRIB / "playbook.yml"), "-e", f"@{vars_file}", *extra]
        script = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'
        wrapped = ["unshare", "-m", "--", "sh", "-c", script, "sh", str(source), str(modules)]
        proc = subprocess.run(
            [*wrapped, *argv],
            check=False,
            capture_output=True,
            text=True,
            timeout=PLAYBOOK_TIMEOUT_S,
            env=self.env(),
            cwd=self.scratch,
        )
        out = proc.stdout + proc.stderr
        (self.scratch / f"{name}.log").write_text(out)
        changed, failed = recap(out)
        return Run(proc.returncode, out, changed, failed)

    def inventory(self) -> Path:
        path = self.scratch / "inventory.ini"
        line = f"ansible-target ansible_host={self.target.root} ansible_connection=kmodd_chroot"
        path.write_text(f"[kmodd_hosts]\n{line} ansible_python_interpreter=/usr/bin/python3\n")
        return path

    def env(self) -> dict[str, str]:
        home = self.scratch / "ansible-home"
        return {
            **os.environ,
            "ANSIBLE_CONNECTION_PLUGINS": str(PLUGINS),
            "ANSIBLE_ROLES_PATH": str(CONTRIB / "roles"),
            "ANSIBLE_HOME": str(home),
            "ANSIBLE_LOCAL_TEMP": str(home / "tmp"),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_RETRY_FILES_ENABLED": "0",
            "ANSIBLE_PIPELINING": "1",
        }


def tree_digest(root: Path) -> str:
    """Every managed file's path, mode and bytes: equal digests = nothing changed."""
    h = hashlib.sha256()
    for rel in MANAGED:
        for path in sorted((root / rel).rglob("*")):
            if "__pycache__" in path.parts:
                continue
            st = path.lstat()
            h.update(f"{path.relative_to(root)} {st.st_mode:o}\n".encode())
            if path.is_file() and not path.is_symlink():
                h.update(path.read_bytes())
    return h.hexdigest()


def _record(target: Target, scratch: Path) -> None:
    """Real kmodd records (the daemon's sink, as root) of host ansible-target, into the target."""
    with journald.running_journald(scratch, hostname="ansible-target") as jd:
        write(jd, RECORDED, scratch)
        sync = ["journalctl", f"--namespace={jd.namespace}", "--sync"]
        subprocess.run(sync, check=False, capture_output=True, timeout=30)
        dest = target.root / JOURNAL_IN_TARGET.lstrip("/")
        dest.mkdir(parents=True, exist_ok=True)
        for f in jd.journal_dir().glob("*.journal"):
            dest.joinpath(f.name).write_bytes(f.read_bytes())


@pytest.fixture(scope="module")
def controller(
    kernel_tree: KernelTree, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Controller]:
    why = journald.available()
    if why is not None:
        pytest.skip(why)
    scratch = tmp_path_factory.mktemp("ansible")
    with ensure_target() as target:
        wheels(REPO, target.wheels)
        _record(target, scratch)
        yield Controller(target, kernel_tree, scratch)


def stage_file(c: Controller) -> str:
    return (c.target.root / "etc/kmodd/policy.d/zz-kmodd-stage.yaml").read_text()


# The tests below run in this order on one target, each from the state the last one left.


def test_stages_learn_simulate_permissive_enforce(controller: Controller) -> None:
    first = controller.play("learn", "learn", GOOD)
    assert first.rc == 0 and first.failed == 0, first.out
    assert first.changed > 0
    kmodctl = controller.target.root / "opt/kmodd/bin/kmodctl"
    assert kmodctl.exists()
    assert (controller.target.root / "usr/local/libexec/kmodd/kmodd-modprobe").exists()
    assert (controller.target.root / "etc/kmodd/policy.d/10-site.yaml").read_text() == GOOD
    assert "mode: learn" in stage_file(controller)
    stages = (("simulate", "learn"), ("permissive", "permissive"), ("enforce", "enforce"))
    for stage, mode in stages:
        run = controller.play(stage, stage, GOOD)
        assert run.rc == 0 and run.failed == 0, run.out
        assert "Replay the recorded decisions with the candidate" in run.out
        assert f"mode: {mode}" in stage_file(controller), stage
    assert "Run kmodctl verify with the candidate" in run.out


def test_second_run_changes_nothing(controller: Controller) -> None:
    before = tree_digest(controller.target.root)
    again = controller.play("enforce-again", "enforce", GOOD)
    assert again.rc == 0 and again.failed == 0, again.out
    assert again.changed == 0, again.out
    assert tree_digest(controller.target.root) == before


def test_check_diff_changes_nothing(controller: Controller) -> None:
    before = tree_digest(controller.target.root)
    check = controller.play("check", "learn", BREAKS, "--check", "--diff")
    assert check.rc == 0 and check.failed == 0, check.out
    assert check.changed > 0, check.out  # the policy file and the stage would change
    assert "+      module: [algif_aead]" in check.out  # the diff of 10-site.yaml
    assert "-mode: enforce" in check.out and "+mode: learn" in check.out
    assert tree_digest(controller.target.root) == before


def test_gate_refuses_a_policy_that_denies_what_hosts_use(controller: Controller) -> None:
    deployed = (controller.target.root / "etc/kmodd/policy.d/10-site.yaml").read_text()
    refused = controller.play("refused", "enforce", BREAKS)
    assert refused.rc != 0 and refused.failed == 1, refused.out
    assert "kmodd: stage enforce refused: enforcing the candidate would deny" in refused.out
    assert "1 recorded decision(s) on 1 host(s): ansible-target: algif-aead" in refused.out
    policy_dir = controller.target.root / "etc/kmodd/policy.d"
    assert (policy_dir / "10-site.yaml").read_text() == deployed == GOOD
    assert "mode: enforce" in stage_file(controller)
