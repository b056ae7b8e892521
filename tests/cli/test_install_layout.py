"""`kmodctl install --layout package` (what debian/rules runs) and the helper path a
Debian-packaged kmodd reads (kmodd.paths)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kmodd.cli import install as install_module
from kmodd.cli.install import UNITS, InstallError, install
from kmodd.cli.layout import PACKAGE
from kmodd.cli.main import main
from kmodd.paths import LOCAL_LIBEXEC, PACKAGE_LIBEXEC, PACKAGE_SITE, libexec_dir

PYTHON = Path("/usr/bin/python3")


@pytest.fixture
def staged(tmp_path: Path) -> Path:
    """A debian/kmodd staging dir after dh_auto_install: the entry points exist."""
    prefix = tmp_path / "debian" / "kmodd"
    (prefix / "usr/bin").mkdir(parents=True)
    for tool in ("kmodd", "kmodctl"):
        (prefix / "usr/bin" / tool).write_text("#!/bin/sh\n")
    install(prefix, bindir=Path("/usr/bin"), python=PYTHON, layout=PACKAGE)
    return prefix


def test_libexec_follows_where_kmodd_is_installed(tmp_path: Path) -> None:
    assert libexec_dir(PACKAGE_SITE / "kmodd") == PACKAGE_LIBEXEC == "/usr/libexec/kmodd"
    assert libexec_dir(tmp_path / ".venv/lib/python3.11/site-packages/kmodd") == LOCAL_LIBEXEC
    # pip's system-wide target on Debian is /usr/local, never dpkg's dir
    assert libexec_dir(Path("/usr/local/lib/python3.13/dist-packages/kmodd")) == LOCAL_LIBEXEC


def test_package_layout_names_only_usr_paths(staged: Path) -> None:
    files = sorted(str(p.relative_to(staged)) for p in staged.rglob("*") if p.is_file())
    assert not [f for f in files if f.startswith("usr/local")]
    assert not [f for f in files if "sysctl.d" in f]  # kernel.modprobe only once enabled
    assert not [f for f in files if "manifest" in f]  # dpkg keeps the list
    for unit in UNITS:
        assert f"usr/lib/systemd/system/{unit}" in files
    assert "usr/libexec/kmodd/kmodd-modprobe" in files
    assert "usr/lib/tmpfiles.d/kmodd.conf" in files
    assert "usr/share/initramfs-tools/hooks/kmodd" in files
    service = (staged / "usr/lib/systemd/system/kmodd.service").read_text()
    assert "ExecStart=/usr/bin/kmodd\n" in service
    publish = (staged / "usr/lib/systemd/system/kmodd-boot-publish.service").read_text()
    assert "ExecStart=/usr/bin/python3 -IS /usr/libexec/kmodd/kmodd-boot-publish\n" in publish
    hook = (staged / "usr/share/initramfs-tools/hooks/kmodd").read_text()
    assert "exec /usr/libexec/kmodd/kmodd-initramfs " in hook
    script = (staged / "usr/libexec/kmodd/kmodd-initramfs").read_text()
    assert "helper=/usr/libexec/kmodd/kmodd-modprobe\n" in script
    for path in staged.rglob("*"):
        if path.is_file() and "catalog" not in path.parts and "policy.d" not in path.parts:
            text = path.read_text()
            assert "@" not in text.replace("@system-service", ""), path
            # the boot step's copy of kmod's modprobe.d list is the only /usr/local left
            assert "/usr/local/libexec" not in text, path


def test_package_layout_looks_for_the_tools_in_the_stage(tmp_path: Path) -> None:
    with pytest.raises(InstallError, match="does not exist"):
        install(tmp_path, bindir=Path("/usr/bin"), python=PYTHON, layout=PACKAGE)


def test_packaged_kmodd_refuses_local_install_and_uninstall(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(install_module, "PACKAGED", True)
    for verb in ("install", "uninstall"):
        assert main([verb, "--dry-run"]) == 1
        err = capsys.readouterr().err
        assert "installed by the Debian package" in err
        assert "systemctl enable --now kmodd.service" in err
