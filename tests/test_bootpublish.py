"""kmodd/bootpublish.py on its own: the contract with helper.py and the daemon, what it
imports when the boot runs it, unsafe stores, and kernel.modprobe.  A store is written
by the daemon's own writer (kmodd.daemon.persist) under a temp root; the publisher runs
as its unit runs it: `/usr/bin/python3 -IS FILE`."""

from __future__ import annotations

import ast
import os
import subprocess
from pathlib import Path

import pytest

from kmodd import bootpublish, helper
from kmodd.daemon import persist
from kmodd.host import modprobe_path
from kmodd.paths import Paths
from tests.conftest import root_required

PUBLISHER = Path(bootpublish.__file__)


def test_copied_constants_match_their_owners() -> None:
    assert bootpublish.RUNTIME_DIR == helper.RUNTIME_DIR
    assert bootpublish.RUNTIME_DIR_ENV == helper.RUNTIME_DIR_ENV
    assert bootpublish.SNAPSHOT_FILE == helper.SNAPSHOT_FILE
    assert bootpublish.MODPROBE_PREVIOUS == modprobe_path.PREVIOUS_FILE
    assert str(modprobe_path.PROC_MODPROBE) == bootpublish.PROC_MODPROBE


def test_imports_only_the_stdlib() -> None:
    tree = ast.parse(PUBLISHER.read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any(name.startswith("kmodd") for name in names)
    # What it really loads when run: no argparse/json/re/pathlib/typing (see its docstring).
    out = subprocess.run(
        ["/usr/bin/python3", "-IS", "-X", "importtime", str(PUBLISHER), "--bogus"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == bootpublish.EXIT_USAGE
    loaded = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines()}
    assert "_hashlib" in loaded or "hashlib" in loaded
    assert not loaded & {"argparse", "json", "re", "pathlib", "typing", "hashlib"}, loaded


def make_store(root: Path, release: str = "6.1.0-test") -> tuple[Paths, Path]:
    """A minimal root (one policy file, one index file) with a store for it."""
    (root / "etc/kmodd/policy.d").mkdir(parents=True)
    (root / "etc/kmodd/policy.d/10-a.yaml").write_text("kmodd: 1\n")
    (root / f"lib/modules/{release}").mkdir(parents=True)
    (root / f"lib/modules/{release}/modules.dep.bin").write_bytes(b"\x00index")
    cmdline = root / "cmdline"
    cmdline.write_text("quiet\n")
    paths = Paths(root=root, release=release, runtime_dir=root / "run/kmodd")
    record = persist.Record(
        number=7,
        hash="ab" * 32,
        policy_hash="cd" * 32,
        mode="enforce",
        enforcement=b"install algif_aead /x --deny algif_aead\n",
        snapshot=helper.SNAPSHOT_MAGIC + b"generation 7\n\nalgif_aead d r\nend\n",
        policy_dirs=("etc/kmodd/policy.d",),
        kernel_modprobe="/bin/true",
    )
    persist.save(paths, record, persist.inputs(paths, cmdline))
    return paths, cmdline


def run(paths: Paths, cmdline: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = ["/usr/bin/python3", "-IS", str(PUBLISHER), "--root", str(paths.root)]
    cmd += ["--kernel", paths.release, "--runtime-dir", str(paths.runtime_dir)]
    cmd += ["--cmdline", str(cmdline), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env={}, check=False)


def test_publishes_and_points_kernel_modprobe(tmp_path: Path) -> None:
    paths, cmdline = make_store(tmp_path / "root")
    sysctl = tmp_path / "modprobe"
    sysctl.write_text("/sbin/modprobe\n")
    out = run(paths, cmdline, "--modprobe-sysctl", str(sysctl))
    assert out.returncode == 0, out.stdout
    assert "published last good generation 7" in out.stdout
    assert "kernel.modprobe -> /bin/true (was /sbin/modprobe)" in out.stdout
    assert sysctl.read_text() == "/bin/true\n"
    assert (paths.runtime_dir / modprobe_path.PREVIOUS_FILE).read_text() == "/sbin/modprobe\n"
    assert paths.enforcement_file.read_text().startswith("install algif_aead")
    assert (paths.snapshot.stat().st_mode & 0o777, paths.snapshot.read_bytes()[:16]) == (
        0o600,
        helper.SNAPSHOT_MAGIC[:16],
    )
    # An empty kernel.modprobe means autoload is off: kept, as the daemon keeps it.
    sysctl.write_text("\n")
    out = run(paths, cmdline, "--modprobe-sysctl", str(sysctl))
    assert "left alone" in out.stdout and sysctl.read_text() == "\n"


def test_a_changed_index_file_takes_the_slow_path(tmp_path: Path) -> None:
    paths, cmdline = make_store(tmp_path / "root")
    (paths.module_dir / "modules.dep.bin").write_bytes(b"\x00index, rebuilt by depmod")
    out = run(paths, cmdline)
    assert out.returncode == 0 and "inputs changed since generation 7 (modules)" in out.stdout
    assert not paths.enforcement_file.exists()


def test_missing_store_is_the_first_boot(tmp_path: Path) -> None:
    paths = Paths(root=tmp_path, release="1", runtime_dir=tmp_path / "run/kmodd")
    out = run(paths, tmp_path / "none")
    assert out.returncode == 0 and "no last good generation" in out.stdout
    assert not (tmp_path / "run").exists()


@root_required
@pytest.mark.root
def test_store_a_user_could_write_is_refused(tmp_path: Path) -> None:
    paths, cmdline = make_store(tmp_path / "root")
    os.chown(paths.store_dir.parent, 65534, 65534)  # var/lib/kmodd: nobody may mv last-good
    out = run(paths, cmdline)
    assert out.returncode == 1
    assert f"its parent {paths.store_dir.parent} is owned by uid 65534" in out.stdout
    assert not paths.enforcement_file.exists()
    os.chown(paths.store_dir.parent, 0, 0)
    (paths.store_dir / bootpublish.MANIFEST).chmod(0o666)
    out = run(paths, cmdline)
    assert out.returncode == 1 and "writable by every user" in out.stdout


def test_wait_ends_when_somebody_published(tmp_path: Path) -> None:
    runtime = tmp_path / "run-kmodd"
    runtime.mkdir()
    (runtime / bootpublish.PUBLISHED_FILE).write_text("daemon generation 3 hash x\n")
    cmd = ["/usr/bin/python3", "-IS", str(PUBLISHER), "--runtime-dir", str(runtime)]
    out = subprocess.run([*cmd, "--wait", "5"], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and "daemon generation 3" in out.stdout
    (runtime / bootpublish.PUBLISHED_FILE).write_text("none: no enforcement: ...\n")
    out = subprocess.run([*cmd, "--wait", "5"], capture_output=True, text=True, check=False)
    assert out.returncode == 1 and "kmodd enforces nothing (none: no enforcement" in out.stdout
    (runtime / bootpublish.PUBLISHED_FILE).unlink()
    out = subprocess.run([*cmd, "--wait", "0.1"], capture_output=True, text=True, check=False)
    assert out.returncode == 1 and "published nothing within 0.1 s" in out.stdout
