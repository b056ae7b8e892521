"""Detection of the kernel layer from a sysfs tree (fake roots: the host has no modules)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kmodd.bpf import detect

DEBIAN = "lockdown,capability,landlock,yama,apparmor,tomoyo,bpf"
UBUNTU = "lockdown,capability,landlock,yama,apparmor"


def sysfs(root: Path, lsm: str | None, *, btf: bool = True, lockdown: str | None = None) -> Path:
    sec = root / "sys/kernel/security"
    sec.mkdir(parents=True)
    if lsm is not None:
        (sec / "lsm").write_text(lsm)
    if lockdown is not None:
        (sec / "lockdown").write_text(lockdown)
    if btf:
        (root / "sys/kernel/btf").mkdir(parents=True)
        (root / "sys/kernel/btf/vmlinux").write_bytes(b"\x9f\xeb")
    return root


def test_parsers() -> None:
    assert detect.parse_lsm(DEBIAN + "\n")[-1] == "bpf"
    assert detect.parse_lockdown("none [integrity] confidentiality\n") == "integrity"
    assert detect.parse_lockdown("") is None


def test_debian_defaults_are_active(tmp_path: Path) -> None:
    got = detect.detect(sysfs(tmp_path, DEBIAN, lockdown="[none] integrity confidentiality"))
    assert got.active, got.reason


def test_without_bpf_in_the_lsm_list_it_is_inactive_and_names_the_lsm_line(
    tmp_path: Path,
) -> None:
    got = detect.detect(sysfs(tmp_path, UBUNTU))
    assert not got.active
    # keeps AppArmor (lsm= replaces the whole list), adds bpf last, never lists capability
    assert "`lsm=lockdown,landlock,yama,apparmor,bpf`" in got.reason
    assert "never run" in got.reason


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"btf": False}, "no kernel BTF"),
        ({"lockdown": "none integrity [confidentiality]"}, "confidentiality"),
    ],
)
def test_other_reasons(tmp_path: Path, kwargs: dict[str, object], words: str) -> None:
    got = detect.detect(sysfs(tmp_path, DEBIAN, **kwargs))  # type: ignore[arg-type]
    assert not got.active and words in got.reason


def test_no_securityfs_is_inactive(tmp_path: Path) -> None:
    got = detect.detect(sysfs(tmp_path, None))
    assert not got.active and "securityfs" in got.reason


def test_the_lsm_line_follows_config_lsm_when_the_kernel_config_is_there(tmp_path: Path) -> None:
    import os  # noqa: PLC0415

    root = sysfs(tmp_path, UBUNTU)
    (root / "boot").mkdir()
    config = 'CONFIG_LSM="landlock,lockdown,yama,integrity,apparmor"\n'
    (root / "boot" / f"config-{os.uname().release}").write_text(config)
    got = detect.detect(root)
    assert "`lsm=landlock,lockdown,yama,integrity,apparmor,bpf`" in got.reason
    assert detect.config_lsm("# CONFIG_LSM is not set\n") == ()
