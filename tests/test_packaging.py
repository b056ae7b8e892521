"""The README's install needs no compiler: kmodd and every dependency install from the
checkout into a fresh venv with every C compiler replaced by a shim that records its use
and fails, and the installed `kmodctl --help` runs.  (systemd-python, dropped from the
dependencies, was the one sdist that needed gcc, python3-dev, pkg-config and libsystemd-dev:
kmodd talks to journald, sd_notify and socket activation natively.)

~65 s on a quiet 2-core machine, 101-169 s measured with 7 helpers sharing it (pip resolves and
downloads the wheels into an empty cache, builds kmodd's own wheel): one venv per module."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Every name a build (setuptools' build_ext, a meson/cmake backend) would look a C or C++
# compiler up by; sysconfig's CC here is x86_64-linux-gnu-gcc.
COMPILERS = ("cc", "gcc", "c++", "g++", "clang", "clang++", "x86_64-linux-gnu-gcc", "c99")
SHIM = '#!/bin/sh\necho "$0 $*" >> "{log}"\nexit 1\n'

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(venv, compiler log) after `pip install CHECKOUT` with the compilers hidden."""
    base = tmp_path_factory.mktemp("packaging")
    shims, log = base / "shims", base / "compilers.log"
    shims.mkdir()
    for name in COMPILERS:
        shim = shims / name
        shim.write_text(SHIM.format(log=log))
        shim.chmod(0o755)
    venv = base / "venv"
    system_python = Path("/usr/bin/python3") if Path("/usr/bin/python3").exists() else None
    python = str(system_python or sys.executable)
    subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=120)
    env = {
        **os.environ,
        "PATH": f"{shims}:{venv / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "CC": "false",
        "CXX": "false",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        # An empty cache: a wheel pip once built from an sdist (with a compiler) would
        # otherwise be reused silently and the shims never called (~5 MB to download).
        "PIP_CACHE_DIR": str(base / "pip-cache"),
    }
    env.pop("VIRTUAL_ENV", None)
    proc = subprocess.run(
        [str(venv / "bin/pip"), "install", "-q", str(REPO_ROOT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=480,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return venv, log


def test_install_calls_no_compiler(installed: tuple[Path, Path]) -> None:
    _, log = installed
    assert not log.exists(), log.read_text()


def test_installed_kmodctl_runs(installed: tuple[Path, Path]) -> None:
    venv, _ = installed
    proc = subprocess.run(
        [str(venv / "bin/kmodctl"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "explain" in proc.stdout


def test_no_dependency_needs_systemd_python(installed: tuple[Path, Path]) -> None:
    """Nothing pulled a C extension of systemd in (it was the only sdist)."""
    venv, _ = installed
    proc = subprocess.run(
        [str(venv / "bin/python"), "-m", "pip", "list", "--format=freeze"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    names = {line.split("==")[0].lower() for line in proc.stdout.splitlines()}
    assert "kmodd" in names
    assert "systemd-python" not in names
