"""Run a program the way the kernel runs its modprobe helper, and time it.

call_usermodehelper execs the helper with env HOME/TERM/PATH only and fds 0-2 closed;
posix_spawn with three CLOSE actions reproduces that without a /bin/sh in between (a shell
would add ~1 ms to every sample and hide what we measure).  wait4 gives the child's own
CPU time next to the wall time.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

KERNEL_ENV = {"HOME": "/", "TERM": "linux", "PATH": "/sbin:/usr/sbin:/bin:/usr/bin"}
PYTHON = "/usr/bin/python3"  # what `kmodctl install` pins the helper's shebang to
CLOSE_STD_FDS = [(os.POSIX_SPAWN_CLOSE, fd) for fd in (0, 1, 2)]


@dataclass(frozen=True, slots=True)
class Run:
    wall_ms: float
    cpu_ms: float  # user + sys of the child (and what it exec'd)
    status: int  # exit status, or -signal


def kernel_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    return {**KERNEL_ENV, **(extra or {})}


def start(argv: Sequence[str], env: Mapping[str, str]) -> int:
    """Spawn ARGV with fds 0-2 closed; the pid."""
    return os.posix_spawn(argv[0], list(argv), dict(env), file_actions=CLOSE_STD_FDS)


def reap(pid: int, started: float) -> Run:
    _pid, wstatus, usage = os.wait4(pid, 0)
    wall = (time.perf_counter() - started) * 1000
    cpu = (usage.ru_utime + usage.ru_stime) * 1000
    return Run(wall, cpu, os.waitstatus_to_exitcode(wstatus))


def run(argv: Sequence[str], env: Mapping[str, str]) -> Run:
    started = time.perf_counter()
    return reap(start(argv, env), started)


def install_helper(dest: Path, python: str = PYTHON) -> Path:
    """The helper exactly as `kmodctl install` writes it (shebang `#!PYTHON -IS`)."""
    from kmodd.cli.install import helper_source  # noqa: PLC0415 -- only when installing

    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(helper_source(Path(python)))
    dest.chmod(0o755)
    return dest
