"""`kmodctl verify` on a machine-shaped root over the real Debian tree: every cell is
checked against what kmod's modprobe, the helper's snapshot reader, /proc and a real
mkinitramfs image say, including the ways a deny fails (a foreign install line, a loaded
module, a built-in, kernel.modprobe elsewhere, a stale or kmodd-less initramfs)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kmodd.cli.install import install
from kmodd.cli.main import main
from kmodd.kmod.context import KmodContext
from kmodd.paths import HELPER_PATH, make_paths
from kmodd.policy.compiler import render_enforcement, render_snapshot
from kmodd.policy.engine import compile_policy, decide
from kmodd.policy.loader import load_policy
from tests import mkinitramfs
from tests.conftest import root_required
from tests.kerneltree import KernelTree

REPO = Path(__file__).resolve().parents[2]
POLICY = """\
kmodd: 1
rules:
  - id: copy-fail
    action: deny
    match: {module: [algif_aead]}
  - id: no-psmouse
    action: deny
    match: {module: [psmouse]}
  - id: builtin-bsg
    action: deny
    match: {module: [bsg]}
  - id: udev-only-uas
    action: deny
    match: {module: [uas], source: [udev]}
"""


class Machine:
    """ROOT with lib/modules (the real tree), policy, rendered files, proc, boot."""

    def __init__(self, root: Path, tree: KernelTree) -> None:
        self.root = root
        self.tree = tree
        for d in (
            "etc/modprobe.d",
            "run/modprobe.d",
            "run/kmodd",
            "proc/sys/kernel",
            "boot",
            "usr/lib/kmodd/policy.d",
            "lib",
        ):
            (root / d).mkdir(parents=True, exist_ok=True)
        (root / "lib/modules").symlink_to(tree.module_dir.parent)
        self.write_policy(POLICY)
        self.proc(modprobe=HELPER_PATH, modules="")

    def write_policy(self, text: str) -> None:
        (self.root / "usr/lib/kmodd/policy.d/50-test.yaml").write_text(text)

    def render(self) -> str:
        """What the daemon would publish: the modprobe.d file and the helper snapshot."""
        paths = make_paths(self.root, self.tree.release, self.root / "run/kmodd")
        policy = compile_policy(load_policy(paths))
        with KmodContext(self.tree.root, self.tree.release, config_paths=[]) as ctx:
            (self.root / "run/modprobe.d/00-kmodd.conf").write_text(render_enforcement(policy, ctx))
            (self.root / "run/kmodd/snapshot").write_bytes(render_snapshot(policy, ctx, decide, 7))
        return policy.hash

    def proc(self, *, modprobe: str, modules: str) -> None:
        (self.root / "proc/sys/kernel/modprobe").write_text(modprobe + "\n")
        (self.root / "proc/modules").write_text(modules)

    def verify(self, *args: str) -> tuple[int, dict[str, Any]]:
        out = subprocess.run(
            [str(REPO / ".venv/bin/kmodctl"), "--root", str(self.root), "verify", "--json", *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        assert out.returncode in (0, 1), out.stderr
        return out.returncode, json.loads(out.stdout)


def rows(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    modules = doc["modules"]
    assert isinstance(modules, list)
    return {row["module"]: row for row in modules}


@pytest.fixture
def machine(tmp_path: Path, kernel_tree: KernelTree) -> Iterator[Machine]:
    m = Machine(tmp_path / "root", kernel_tree)
    m.render()
    yield m


def kmod_inserts(machine: Machine, module: str) -> bool:
    """The oracle, asked directly: does kmod's dry run insert MODULE's .ko?"""
    argv = [
        "modprobe",
        "-n",
        "-v",
        "-d",
        str(machine.root),
        "-S",
        machine.tree.release,
        "-C",
        str(machine.root / "etc/modprobe.d"),
        "-C",
        str(machine.root / "run/modprobe.d"),
        "--",
        module,
    ]
    out = subprocess.run(argv, capture_output=True, text=True, check=False).stdout
    return any(ln.startswith("insmod ") and f"/{module}.ko" in ln for ln in out.splitlines())


def test_every_denied_module_is_listed_and_agrees_with_kmod(machine: Machine) -> None:
    rc, doc = machine.verify()
    found = rows(doc)
    assert set(found) == {"algif_aead", "psmouse", "bsg", "uas"}
    for name in ("algif_aead", "psmouse", "uas"):
        modprobe = found[name]["modprobe"]
        assert isinstance(modprobe, dict)
        assert modprobe["refused"] is not kmod_inserts(machine, name), name
    assert found["algif_aead"]["enforced"] is True
    assert found["algif_aead"]["kernel_request"] == "refused (helper)"
    assert found["algif_aead"]["cis"] == {"install_shown": True, "blacklisted": True, "pass": True}
    # source: [udev]: nothing asks the helper to deny it, modprobe.d must (once rendered)
    assert found["uas"]["denied_for"] == ["udev"]
    assert found["uas"]["kernel_request"] == "not denied"
    assert rc == 1  # bsg is built in: never enforceable by modprobe.d or the helper


def test_a_built_in_is_never_enforced_and_says_the_remedy(machine: Machine) -> None:
    rc, doc = machine.verify("--module", "bsg")
    row = rows(doc)["bsg"]
    assert rc == 1 and row["builtin"] is True and row["enforced"] is False
    assert "initcall_blacklist=" in " ".join(row["problems"])


def test_a_foreign_install_line_is_not_a_deny(machine: Machine) -> None:
    """An earlier-sorting conf whose install loads the module anyway: kmod's dry run shows
    an install line and no insmod, yet the module would load."""
    conf = machine.root / "etc/modprobe.d/00-a-site.conf"
    conf.write_text("install algif_aead /sbin/modprobe --ignore-install algif_aead\n")
    rc, doc = machine.verify("--module", "algif_aead")
    row = rows(doc)["algif_aead"]
    assert rc == 1 and row["enforced"] is False
    assert "--ignore-install" in " ".join(row["problems"])


def test_loaded_and_kernel_modprobe_elsewhere(machine: Machine) -> None:
    machine.proc(modprobe="/sbin/modprobe", modules="algif_aead 16384 0 - Live 0x0\n")
    rc, doc = machine.verify("--module", "algif_aead")
    row = rows(doc)["algif_aead"]
    assert rc == 1 and row["loaded"] is True
    assert row["kernel_request"] == "refused (modprobe.d)"  # the kernel's modprobe reads it
    assert any("not the kmodd helper" in w for w in doc["warnings"])
    machine.proc(modprobe="/sbin/modprobe", modules="")
    assert machine.verify("--module", "algif_aead")[0] == 0


def test_a_permissive_snapshot_refuses_nothing(machine: Machine) -> None:
    snapshot = machine.root / "run/kmodd/snapshot"
    snapshot.write_bytes(snapshot.read_bytes().replace(b"\nmode enforce\n", b"\nmode permissive\n"))
    rc, doc = machine.verify("--module", "algif_aead")
    assert rc == 1 and rows(doc)["algif_aead"]["kernel_request"] == "LOADS"


def test_text_table_names_every_column(
    machine: Machine, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(["--root", str(machine.root), "verify", "--module", "algif_aead"])
    out = capsys.readouterr().out
    assert rc == 0, out
    header = next(ln for ln in out.splitlines() if ln.startswith("MODULE"))
    assert header.split() == [
        "MODULE",
        "RULE",
        "KERNEL",
        "REQUEST",
        "KERNEL",
        "LAYER",
        "MODPROBE",
        "LOADED",
        "INITRAMFS",
        "BUILT-IN",
        "CIS",
        "ENFORCED",
    ]
    assert "1 denied module(s): 1 enforced, 0 not enforced" in out
    # offline root: the kernel layer is not asked, it would refuse the request and the file
    assert "kernel layer: offline: root " in out
    row = next(ln for ln in out.splitlines() if ln.startswith("algif_aead"))
    assert "would: request+file" in row
    assert "initramfs not checked: no initramfs" in out


@root_required
@pytest.mark.skipif(not mkinitramfs.available(), reason="needs initramfs-tools (make apt)")
def test_initramfs_current_stale_and_without_kmodd(machine: Machine, tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    install(prefix, bindir=REPO / ".venv/bin", python=Path("/usr/bin/python3"))
    conf = machine.root / "run/modprobe.d/00-kmodd.conf"
    image = machine.root / f"boot/initrd.img-{machine.tree.release}"
    env = {"KMODD_INITRAMFS_SOURCES": str(conf)}
    built, run = mkinitramfs.build(machine.tree, tmp_path / "with", prefix=prefix, env=env)
    assert run.returncode == 0, run.stderr
    built.rename(image)
    rc, doc = machine.verify("--module", "psmouse")
    row = rows(doc)["psmouse"]
    assert row["initramfs"]["carries"] is True
    assert row["initramfs"]["refused"] is True
    assert doc["initramfs"]["current"] is True
    assert rc == 0, doc
    machine.write_policy(POLICY + "  - id: extra\n    action: deny\n    match: {module: [hfs]}\n")
    machine.render()
    _rc, doc = machine.verify("--module", "psmouse")
    assert any("predates the policy" in w for w in doc["warnings"])
    bare, run = mkinitramfs.build(machine.tree, tmp_path / "without")  # no kmodd hook
    assert run.returncode == 0, run.stderr
    bare.rename(image)
    rc, doc = machine.verify("--module", "psmouse")
    row = rows(doc)["psmouse"]
    assert rc == 1 and row["initramfs"]["refused"] is False
    assert any("has no kmodd policy" in w for w in doc["warnings"])
