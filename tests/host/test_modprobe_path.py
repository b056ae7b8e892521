"""kernel.modprobe management against a stand-in sysctl file (this kernel has no
CONFIG_MODULES, so no /proc/sys/kernel/modprobe) and real kernel configs."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from kmodd.host.kconfig import kernel_config, static_usermodehelper
from kmodd.host.modprobe_path import (
    PREVIOUS_FILE,
    ModprobePath,
    ModprobePathError,
    TamperKind,
)
from tests.kerneltree import KernelTree


@pytest.fixture
def helper_bin(tmp_path: Path) -> Path:
    path = tmp_path / "libexec/kmodd-modprobe"
    path.parent.mkdir()
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    path = tmp_path / "proc-modprobe"
    path.write_text("/sbin/modprobe\n")
    return path


def test_install_remembers_previous_and_restore_puts_it_back(
    tmp_path: Path, helper_bin: Path, proc: Path
) -> None:
    proc.write_text("/usr/local/sbin/admin-modprobe\n")
    runtime = tmp_path / "run"
    mp = ModprobePath(helper_bin, runtime, proc_path=proc)
    assert mp.check().kind is TamperKind.CHANGED
    assert mp.install() == "/usr/local/sbin/admin-modprobe"
    assert proc.read_text() == f"{helper_bin}\n"
    assert mp.check().ok
    # A restarted daemon finds the sysctl already pointing at us: the value it replaced
    # is still the admin's, not ours.
    again = ModprobePath(helper_bin, runtime, proc_path=proc)
    assert again.install() == "/usr/local/sbin/admin-modprobe"
    assert again.restore() == "/usr/local/sbin/admin-modprobe"
    assert proc.read_text() == "/usr/local/sbin/admin-modprobe\n"
    assert not (runtime / PREVIOUS_FILE).exists()


def test_restore_without_memory_uses_kernel_default(
    tmp_path: Path, helper_bin: Path, proc: Path
) -> None:
    proc.write_text(f"{helper_bin}\n")  # set at boot by the sysctl.d drop-in
    mp = ModprobePath(helper_bin, tmp_path / "run", proc_path=proc)
    assert mp.install() == "/sbin/modprobe"
    assert mp.restore() == "/sbin/modprobe"
    assert proc.read_text() == "/sbin/modprobe\n"


def test_restore_leaves_a_foreign_value_alone(tmp_path: Path, helper_bin: Path, proc: Path) -> None:
    mp = ModprobePath(helper_bin, tmp_path / "run", proc_path=proc)
    mp.install()
    proc.write_text("/tmp/evil\n")
    state = mp.check()
    assert (state.kind, state.current, state.expected) == (
        TamperKind.CHANGED,
        "/tmp/evil",
        str(helper_bin),
    )
    assert mp.restore() is None
    assert proc.read_text() == "/tmp/evil\n"


def test_autoload_switched_off_stays_off(tmp_path: Path, helper_bin: Path, proc: Path) -> None:
    proc.write_text("\n")  # sysctl kernel.modprobe="": no autoload at all
    mp = ModprobePath(helper_bin, tmp_path / "run", proc_path=proc)
    with pytest.raises(ModprobePathError, match="autoload is disabled"):
        mp.install()
    assert proc.read_text() == "\n"
    assert mp.check().kind is TamperKind.CHANGED


def test_missing_sysctl_is_unavailable_not_an_exception(tmp_path: Path, helper_bin: Path) -> None:
    mp = ModprobePath(helper_bin, tmp_path / "run", proc_path=tmp_path / "absent")
    assert mp.check().kind is TamperKind.UNAVAILABLE
    assert mp.restore() is None
    with pytest.raises(ModprobePathError, match="CONFIG_MODULES"):
        mp.install()


@pytest.mark.parametrize("bad", ["relative/helper", "/nonexistent/helper", "not-executable"])
def test_refuses_an_unusable_helper(tmp_path: Path, proc: Path, bad: str) -> None:
    plain = tmp_path / "not-executable"
    plain.write_text("#!/bin/sh\n")
    path = plain if bad == "not-executable" else Path(bad)
    mp = ModprobePath(path, tmp_path / "run", proc_path=proc)
    with pytest.raises(ModprobePathError):
        mp.install()
    assert proc.read_text() == "/sbin/modprobe\n"  # untouched


def test_planted_symlink_in_state_dir_is_not_followed(
    tmp_path: Path, helper_bin: Path, proc: Path
) -> None:
    runtime = tmp_path / "run"
    runtime.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (runtime / PREVIOUS_FILE).symlink_to(victim)
    ModprobePath(helper_bin, runtime, proc_path=proc).install()
    assert victim.read_text() == "precious\n"
    assert not (runtime / PREVIOUS_FILE).is_symlink()


def test_real_debian_kernel_has_no_static_usermodehelper(kernel_tree: KernelTree) -> None:
    options = kernel_config(kernel_tree.release, kernel_tree.root)
    assert options is not None
    assert options["CONFIG_MODULES"] == "y"
    assert "CONFIG_STATIC_USERMODEHELPER" not in options
    assert static_usermodehelper(kernel_tree.release, kernel_tree.root) is None


def test_static_usermodehelper_is_said_plainly(tmp_path: Path) -> None:
    (tmp_path / "boot").mkdir()
    (tmp_path / "boot/config-6.9.0-hard").write_text(
        "CONFIG_MODULES=y\nCONFIG_STATIC_USERMODEHELPER=y\n"
        'CONFIG_STATIC_USERMODEHELPER_PATH="/sbin/usermode-helper"\n'
    )
    message = static_usermodehelper("6.9.0-hard", tmp_path)
    assert message is not None
    assert "bypasses kernel.modprobe" in message
    assert "/sbin/usermode-helper" in message
    (tmp_path / "boot/config-6.9.0-off").write_text(
        'CONFIG_STATIC_USERMODEHELPER=y\nCONFIG_STATIC_USERMODEHELPER_PATH=""\n'
    )
    off = static_usermodehelper("6.9.0-off", tmp_path)
    assert off is not None
    assert "autoload is off" in off


def test_no_config_is_none(tmp_path: Path) -> None:
    assert kernel_config("1.2.3", tmp_path) is None
    assert static_usermodehelper("1.2.3", tmp_path) is None


def test_live_root_falls_back_to_proc_config_gz(tmp_path: Path) -> None:
    config_gz = tmp_path / "config.gz"
    config_gz.write_bytes(gzip.compress(b"CONFIG_STATIC_USERMODEHELPER=y\n"))
    message = static_usermodehelper("no-such-release", Path("/"), proc_config=config_gz)
    assert message is not None
    assert "autoload is off" in message
    # Only for the live root: an image's kernel is not the running one.
    assert kernel_config("no-such-release", tmp_path, proc_config=config_gz) is None
