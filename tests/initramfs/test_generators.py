"""The shipped early-boot files (initramfs/) as `kmodctl install` puts them in place.

initramfs-tools for real: Debian's mkinitramfs runs the installed hook from
/usr/share/initramfs-tools/hooks for the cached Debian kernel tree (tests/mkinitramfs.py),
the image is listed and unpacked, and the image's own kmod `modprobe` (in a chroot of the
unpacked image) refuses a denied module through the copied conf and the image's stub.
dracut (not installed on CI: it pulls in mdadm, exim and more) structurally: bash -n, the
three functions, and its install() run against a staging $initdir.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from kmodd.cli.install import install
from kmodd.cli.layout import (
    DRACUT_MODULE_DEST,
    HELPER_DEST,
    INITRAMFS_SCRIPT_DEST,
    INITRAMFS_TOOLS_HOOK_DEST,
)
from kmodd.kmod.context import KmodContext
from kmodd.kmod.initramfs import module_names, read_image
from kmodd.policy.compiler import render_enforcement
from kmodd.policy.engine import compile_policy
from kmodd.policy.loader import load_policy_files
from tests import mkinitramfs
from tests.conftest import root_required
from tests.kerneltree import KernelTree

pytestmark = [
    root_required,
    pytest.mark.skipif(not mkinitramfs.available(), reason="needs initramfs-tools (make apt)"),
]
REPO = Path(__file__).resolve().parents[2]
BINDIR = REPO / ".venv/bin"
PYTHON = Path("/usr/bin/python3")
CONF = "etc/modprobe.d/00-kmodd.conf"
MANIFEST = "usr/lib/kmodd/initramfs-policy"
# psmouse is one of the coldplug modules the issue saw loaded from the initramfs, and
# mkinitramfs puts it into even a MODULES=list image (hooks/kmod... i8042 input).
POLICY = """\
kmodd: 1
rules:
  - id: no-psmouse
    action: deny
    match: {module: [psmouse]}
  - id: ksmbd
    action: deny
    match: {module: [ksmbd]}
"""


@pytest.fixture(scope="module")
def prefix(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("prefix")
    install(root, bindir=BINDIR, python=PYTHON)
    return root


@pytest.fixture(scope="module")
def rendered(kernel_tree: KernelTree, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("rendered")
    (base / "p.yaml").write_text(POLICY)
    policy = compile_policy(load_policy_files([base / "p.yaml"]))
    with KmodContext(kernel_tree.root, kernel_tree.release, config_paths=[]) as ctx:
        text = render_enforcement(policy, ctx)
    path = base / "00-kmodd.conf"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def built(
    kernel_tree: KernelTree, prefix: Path, rendered: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    base = tmp_path_factory.mktemp("mkinitramfs")
    env = {"KMODD_INITRAMFS_SOURCES": f"{base}/missing.conf {rendered}"}
    return mkinitramfs.build(kernel_tree, base, prefix=prefix, env=env)


def test_install_puts_the_hook_module_and_script_in_place(prefix: Path) -> None:
    for rel in (INITRAMFS_TOOLS_HOOK_DEST, DRACUT_MODULE_DEST, INITRAMFS_SCRIPT_DEST):
        path = prefix / rel
        assert path.stat().st_mode & 0o777 == 0o755
        assert "@" not in path.read_text(), f"{rel}: a placeholder was left"
    hook = (prefix / INITRAMFS_TOOLS_HOOK_DEST).read_text()
    assert f"exec /{INITRAMFS_SCRIPT_DEST} " in hook
    assert f"helper=/{HELPER_DEST}\n" in (prefix / INITRAMFS_SCRIPT_DEST).read_text()


def test_mkinitramfs_image_carries_conf_stub_and_hash(
    built: tuple[Path, subprocess.CompletedProcess[str]], rendered: Path, kernel_tree: KernelTree
) -> None:
    image, run = built
    assert run.returncode == 0, run.stderr
    read = read_image(image, keep=[CONF, MANIFEST, HELPER_DEST])
    assert {CONF, MANIFEST, HELPER_DEST} <= set(mkinitramfs.lsinitramfs(image))
    assert read.files[CONF] == rendered.read_bytes()
    policy_hash = next(
        ln.split(": ", 1)[1]
        for ln in rendered.read_text().splitlines()
        if ln.startswith("# policy generation hash: ")
    )
    manifest = read.files[MANIFEST].decode().splitlines()
    assert manifest == ["kmodd-initramfs 1", f"source {rendered}", f"hash {policy_hash}",
                        "mode enforce"]  # fmt: skip
    assert read.files[HELPER_DEST].startswith(b"#!/bin/sh\n")
    assert b"python" not in read.files[HELPER_DEST]
    assert "psmouse" in module_names(read, kernel_tree.release)  # so the deny matters


def test_the_images_own_modprobe_refuses_the_denied_module(
    built: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path, kernel_tree: KernelTree
) -> None:
    """Unpack the image and run ITS modprobe (its kmod, its conf, its stub, its /bin/sh)
    in a chroot: what the initramfs's udev would get for psmouse's modalias."""
    image, run = built
    assert run.returncode == 0, run.stderr
    unpacked = tmp_path / "image"
    subprocess.run(["unmkinitramfs", str(image), str(unpacked)], check=True, timeout=120)
    root = unpacked / "main" if (unpacked / "main").is_dir() else unpacked
    chroot = ["chroot", str(root), "/sbin/modprobe"]
    dry = subprocess.run(
        [*chroot, "-n", "-v", "psmouse"], capture_output=True, text=True, check=False
    )
    assert dry.returncode == 0, dry.stderr
    assert f"/{HELPER_DEST} --deny" in dry.stdout, dry.stdout
    assert "insmod" not in dry.stdout, dry.stdout
    real = subprocess.run(
        [*chroot, "psmouse"], capture_output=True, text=True, timeout=60, check=False
    )
    assert real.returncode != 0
    assert "kmodd: psmouse is denied by policy (initramfs)" in real.stderr, real.stderr
    config = subprocess.run(
        [*chroot, "--showconfig"], capture_output=True, text=True, check=False
    ).stdout
    assert "blacklist psmouse" in config.splitlines()


def test_no_rendered_policy_is_said_and_recorded(
    kernel_tree: KernelTree, prefix: Path, tmp_path: Path
) -> None:
    env = {"KMODD_INITRAMFS_SOURCES": f"{tmp_path}/nothing.conf"}
    image, run = mkinitramfs.build(kernel_tree, tmp_path, prefix=prefix, env=env)
    assert run.returncode == 0, run.stderr
    assert "kmodd: no rendered policy found" in run.stderr
    read = read_image(image, keep=[MANIFEST])
    assert CONF not in read.names
    assert b"hash none\n" in read.files[MANIFEST]


def test_dracut_module_is_valid_bash_with_the_three_functions(prefix: Path) -> None:
    module = prefix / DRACUT_MODULE_DEST
    subprocess.run(["bash", "-n", str(module)], check=True)
    declared = subprocess.run(
        ["bash", "-c", f'. "{module}"; declare -F'], capture_output=True, text=True, check=True
    ).stdout.split()
    assert {"check", "depends", "install"} <= set(declared)


def test_dracut_install_fills_initdir(
    kernel_tree: KernelTree, prefix: Path, rendered: Path, tmp_path: Path
) -> None:
    """dracut calls install() with $initdir set and derror defined; run it that way, from
    the installed path (the namespace of tests/mkinitramfs.py holds the install)."""
    initdir = tmp_path / "initdir"
    initdir.mkdir()
    module = f"/{DRACUT_MODULE_DEST}"
    body = (
        f'derror() {{ echo "E: $*" >&2; }}; initdir={initdir}; . {module}; '
        "check && depends && install"
    )
    script = mkinitramfs.namespace_script(tmp_path, kernel_tree, prefix, f"bash -c '{body}'")
    run = mkinitramfs.in_namespace(script, {"KMODD_INITRAMFS_SOURCES": str(rendered)})
    assert run.returncode == 0, run.stderr
    assert (initdir / CONF).read_bytes() == rendered.read_bytes()
    stub = initdir / HELPER_DEST
    denied = subprocess.run(
        [str(stub), "--deny", "psmouse"], capture_output=True, text=True, check=False
    )
    assert denied.returncode == 1 and "psmouse is denied" in denied.stderr
    assert (initdir / MANIFEST).read_text().startswith("kmodd-initramfs 1\n")
