"""The Debian 13 package: `make deb`'s build of this checkout, installed with apt into a
fresh trixie chroot (Depends resolve from Debian: pydantic 2.10, pyudev, watchdog), its
files where Debian wants them, kmodctl working there, and `dpkg --purge` leaving the tree
as it was.  One chroot for the module; the tests run in file order, the purge last.

Time: 4-6 min warm (the build 1m45s; copying the base, apt installing the dependencies
and kmodd, the purge: 2-4 min, depending on the machine's load), ~13 min cold (`make deb`
cold: 11m21s, debootstrap of the base and build chroots and the build dependencies).  The
.deb is built each run: warm, that fits CI's budget, and a cached .deb could test stale
code.  kernel.modprobe and the BPF pins of the teardown are not in a chroot:
test_teardown.py runs those steps on a scratch tree, the real-boot VM on a real kernel.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import ClassVar

import pytest

from tests.kerneltree import KernelTree
from tests.packaging.conftest import Chroot, add_kernel_tree

pytestmark = [pytest.mark.deb, pytest.mark.root]

HELPER = "/usr/libexec/kmodd/kmodd-modprobe"
SITE = "/usr/lib/python3/dist-packages/kmodd"
# What a Debian 13 machine has next to kmodd: systemd (the units' manager, here only for
# `systemctl enable` offline) and initramfs-tools (the hook's trigger).
HOST_PACKAGES = ("systemd", "initramfs-tools")


def _depends(deb: Path) -> list[str]:
    field = subprocess.run(
        ["dpkg-deb", "-f", str(deb), "Depends"], capture_output=True, text=True, check=True
    ).stdout
    names = [item.split()[0].split(":")[0] for item in field.replace("\n", " ").split(",")]
    return sorted(set(names))


class State:
    before: ClassVar[set[str]] = set()  # the tree with the dependencies, before kmodd


@pytest.fixture(scope="module")
def installed(fresh_chroot: Chroot, deb_file: Path, trixie_tree: KernelTree) -> Chroot:
    chroot = fresh_chroot
    add_kernel_tree(chroot, trixie_tree)
    chroot.run("apt-get", "update", "-qq")
    deps = [*_depends(deb_file), *HOST_PACKAGES]
    chroot.run("apt-get", "install", "-y", "-qq", "--no-install-recommends", *deps)
    State.before = chroot.files()
    (chroot.root / "tmp" / deb_file.name).write_bytes(deb_file.read_bytes())
    chroot.run("apt-get", "install", "-y", "-qq", f"/tmp/{deb_file.name}")
    return chroot


def test_files_are_in_their_debian_places(installed: Chroot) -> None:
    listed = set(installed.run("dpkg", "-L", "kmodd").stdout.split())
    for path in (
        "/usr/bin/kmodd",
        "/usr/bin/kmodctl",
        HELPER,
        "/usr/libexec/kmodd/kmodd-boot-publish",
        "/usr/libexec/kmodd/kmodd-initramfs",
        "/usr/lib/systemd/system/kmodd.service",
        "/usr/lib/systemd/system/kmodd-boot-publish.service",
        "/usr/lib/systemd/system/kmodd-boot-wait.service",
        "/usr/lib/systemd/system/kmodd-decide.socket",
        "/usr/lib/systemd/system/kmodd-control.socket",
        "/usr/lib/systemd/system/kmodd.service.d/debian.conf",
        "/usr/lib/kmodd/policy.d/10-baseline.yaml",
        "/usr/lib/tmpfiles.d/kmodd.conf",
        "/usr/lib/systemd/catalog/kmodd.catalog",
        "/usr/share/initramfs-tools/hooks/kmodd",
        "/usr/lib/dracut/modules.d/90kmodd/module-setup.sh",
        "/usr/share/doc/kmodd/journal.md",  # the catalog's Documentation= link
        "/etc/default/kmodd",
        "/etc/kmodd/policy.d",
        f"{SITE}/bpf/kmodd.bpf.o",
    ):
        assert path in listed, path
    assert not [p for p in listed if p.startswith("/usr/local")]
    assert not [p for p in listed if "sysctl.d" in p]
    conffiles = installed.run("dpkg-query", "-W", "-f=${Conffiles}", "kmodd").stdout
    assert "/etc/default/kmodd" in conffiles
    mode = (installed.root / HELPER.lstrip("/")).stat().st_mode
    assert mode & 0o777 == 0o755
    shebang = (installed.root / HELPER.lstrip("/")).read_text().split("\n", 1)[0]
    assert shebang == "#!/usr/bin/python3 -IS"
    service = (installed.root / "usr/lib/systemd/system/kmodd.service").read_text()
    assert "ExecStart=/usr/bin/kmodd\n" in service


def test_install_enables_nothing(installed: Chroot) -> None:
    wants = list((installed.root / "etc/systemd/system").rglob("kmodd*"))
    assert wants == []
    for unit in ("kmodd.service", "kmodd-boot-publish.service", "kmodd-boot-wait.service"):
        state = installed.run("systemctl", "is-enabled", unit, check=False).stdout.strip()
        assert state == "disabled", unit
    # /run/kmodd and /run/modprobe.d come from tmpfiles (postinst); no policy published
    assert not (installed.root / "run/modprobe.d/00-kmodd.conf").exists()
    assert not (installed.root / "var/lib/kmodd").exists()


def test_debian_python_stack_is_used(installed: Chroot) -> None:
    probe = (
        "import json, sys, pydantic, kmodd, kmodd.paths as p;"
        "print(json.dumps([sys.version_info[:2], pydantic.VERSION, kmodd.__file__,"
        " p.HELPER_PATH, p.PACKAGED]))"
    )
    version, pydantic, where, helper, packaged = json.loads(
        installed.run("python3", "-c", probe).stdout
    )
    assert version == [3, 13]
    assert pydantic.startswith("2.10.")  # Debian 13's python3-pydantic
    assert where == f"{SITE}/__init__.py"
    assert (helper, packaged) == (HELPER, True)  # what the helper's kernel.modprobe is
    help_text = installed.run("kmodd", "--help").stdout
    assert "--helper-path" in help_text
    # libbpf1 (Depends) loads through the kernel layer's ctypes binding
    installed.run("python3", "-c", "from kmodd.bpf import libbpf; libbpf.lib()")


def test_kmodctl_validate_and_explain_run(installed: Chroot, trixie_tree: KernelTree) -> None:
    kernel = ["--kernel", trixie_tree.release]
    result = installed.run("kmodctl", *kernel, "validate", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    explain = installed.run(
        "kmodctl", "--root", "/", *kernel, "explain", "algif_aead", "--json", check=False
    )
    assert explain.returncode == 1, explain.stdout + explain.stderr  # 1: denied
    report = json.loads(explain.stdout)
    # the shipped policy, read from its Debian place, on Debian 13's .ko.xz tree
    assert (report["verdict"], report["rule"]) == ("deny", "copy-fail")
    assert report["rule_location"].startswith("/usr/lib/kmodd/policy.d/10-baseline.yaml:")
    assert report["load_set"] == ["af_alg", "algif_aead"]
    human = installed.run("kmodctl", *kernel, "explain", "algif_aead", check=False).stdout
    assert "algif_aead.ko.xz" in human
    assert "verdict: DENY" in human


def test_kmodctl_install_refuses_under_the_package(installed: Chroot) -> None:
    result = installed.run("kmodctl", "install", "--dry-run", check=False)
    assert result.returncode == 1
    assert "installed by the Debian package" in result.stderr


def test_purge_leaves_nothing(installed: Chroot) -> None:
    # What an enabled, running kmodd leaves behind: enablement links, the last-good store,
    # the published files.
    installed.run("systemctl", "enable", "kmodd.service")
    installed.run("systemctl", "enable", "kmodd-decide.socket", "kmodd-control.socket")
    assert list((installed.root / "etc/systemd/system").rglob("kmodd*"))
    for rel, text in (
        ("var/lib/kmodd/last-good/manifest", "kmodd-last-good 1\n"),
        ("run/kmodd/snapshot", "x"),
        ("run/kmodd/published", "x"),
        ("run/modprobe.d/00-kmodd.conf", f"install x {HELPER} --deny x\n"),
    ):
        path = installed.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    installed.run("dpkg", "--purge", "kmodd")
    status = installed.run("dpkg-query", "-W", "kmodd", check=False)
    assert status.returncode != 0 or "kmodd" not in status.stdout.split()
    after = installed.files()
    assert sorted(after - State.before) == []
    assert sorted(State.before - after) == []
