"""The package's teardown (debian/teardown.sh, pasted into prerm and postrm) run by
/bin/sh against a scratch tree: kernel.modprobe restored only when it names the helper,
the published files and the BPF pins removed, and a second run changes nothing."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TEARDOWN = REPO / "debian/teardown.sh"
HELPER = "/usr/libexec/kmodd/kmodd-modprobe"


def teardown(tmp_path: Path) -> str:
    script = (
        f". {TEARDOWN}\n"
        f"kmodd_sysctl={tmp_path}/modprobe kmodd_run={tmp_path}/run"
        f" kmodd_pins={tmp_path}/pins\n"
        "kmodd_restore_modprobe\nkmodd_remove_runtime\n"
    )
    result = subprocess.run(
        ["/bin/sh", "-euc", script], capture_output=True, text=True, check=True, timeout=30
    )
    return result.stdout


@pytest.fixture
def published(tmp_path: Path) -> Path:
    for rel in ("run/kmodd/snapshot", "run/kmodd/published", "run/modprobe.d/00-kmodd.conf"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    (tmp_path / "run/modprobe.d/other.conf").write_text("options x y=1\n")
    (tmp_path / "pins").mkdir()
    for pin in ("link_request", "kmodd_config"):
        (tmp_path / "pins" / pin).write_text("")
    return tmp_path


@pytest.mark.parametrize(
    ("previous", "restored"),
    [("/usr/sbin/modprobe.real\n", "/usr/sbin/modprobe.real"), (None, "/sbin/modprobe"),
     ("garbage\n", "/sbin/modprobe"), (f"{HELPER}\n", "/sbin/modprobe")],
)  # fmt: skip
def test_modprobe_restored_and_runtime_removed(
    published: Path, previous: str | None, restored: str
) -> None:
    (published / "modprobe").write_text(HELPER + "\n")
    if previous is not None:
        (published / "run/kmodd/modprobe_path.previous").write_text(previous)
    assert f"restored to {restored}" in teardown(published)
    assert (published / "modprobe").read_text() == restored + "\n"
    assert sorted(p.name for p in (published / "run").rglob("*")) == [
        "kmodd",
        "modprobe.d",
        "other.conf",
    ]
    assert not (published / "pins").exists()
    assert teardown(published) == ""  # idempotent: nothing left to do


def test_a_foreign_kernel_modprobe_is_left_alone(published: Path) -> None:
    (published / "modprobe").write_text("/usr/local/sbin/my-modprobe\n")
    assert teardown(published) == ""
    assert (published / "modprobe").read_text() == "/usr/local/sbin/my-modprobe\n"
    assert not (published / "run/modprobe.d/00-kmodd.conf").exists()
