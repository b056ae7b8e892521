"""The oracle: kmod's `modprobe` CLI, run on many names per process.

`modprobe -a` treats every argument as a name and keeps going after a miss, so one
process answers hundreds of names; a separator name (an `install` line in a config file
of its own, added to both sides) between them makes each name's output attributable.
Batches run in a thread pool of subprocesses: ~2 ms per process instead of per name.
kmod always reads the host's /proc/cmdline (`MOD.PARAM=` becomes options); kmodd's
libkmod context reads the same file, so both sides see the same options.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from kmodd.kmod.model import Resolution, StepKind

SEPARATOR = "kmodd-oracle-sep"
SEPARATOR_CONF = f"install {SEPARATOR} /bin/true kmodd-oracle-separator\n"
_SEP_R = "kmodd_oracle_sep"
_SEP_D = "install /bin/true kmodd-oracle-separator "
BATCH = 250


def separator_file(directory: Path) -> Path:
    """A config file (its own -C entry) that makes SEPARATOR resolvable."""
    path = directory / "zz-kmodd-oracle-separator.conf"
    path.write_text(SEPARATOR_CONF)
    return path


@dataclass(frozen=True, slots=True)
class Oracle:
    root: Path
    release: str
    config: tuple[str, ...]  # -C arguments, in order (the separator file included)

    def _argv(self, flag: str, names: Sequence[str]) -> list[str]:
        argv = ["modprobe", "-q", "-a", flag, "-d", str(self.root), "-S", self.release]
        for path in self.config:
            argv += ["-C", path]
        argv.append("--")
        for name in names:
            argv += [name, SEPARATOR]
        return argv

    def _batch(self, flag: str, names: Sequence[str]) -> list[tuple[str, ...]]:
        proc = subprocess.run(
            self._argv(flag, names),
            capture_output=True,
            text=True,
            errors="surrogateescape",  # config bytes reach the output as they are
            check=False,
            timeout=120,
        )
        sep = _SEP_R if flag == "-R" else _SEP_D
        chunks: list[tuple[str, ...]] = []
        current: list[str] = []
        for line in proc.stdout.split("\n")[:-1]:
            if line == sep:
                chunks.append(tuple(current))
                current = []
            else:
                current.append(line)
        assert len(chunks) == len(names), (flag, names[:3], proc.stderr[-500:])
        return chunks

    def run(self, flag: str, names: Sequence[str]) -> dict[str, tuple[str, ...]]:
        """{name: stdout lines of `modprobe FLAG name`} for FLAG in -R, -D."""
        batches = [names[i : i + BATCH] for i in range(0, len(names), BATCH)]
        with ThreadPoolExecutor(max_workers=2 * (os.cpu_count() or 2)) as pool:
            results = pool.map(lambda b: self._batch(flag, b), batches)
        out: dict[str, tuple[str, ...]] = {}
        for batch, chunks in zip(batches, results, strict=True):
            out.update(zip(batch, chunks, strict=True))
        return out

    def single(self, flag: str, name: str) -> tuple[str, ...]:
        """One fresh modprobe process for one name (no -a, no separator)."""
        argv = ["modprobe", "-q", flag, "-d", str(self.root), "-S", self.release]
        for path in self.config:
            argv += ["-C", path]
        proc = subprocess.run(
            [*argv, "--", name],
            capture_output=True,
            text=True,
            errors="surrogateescape",
            check=False,
        )
        return tuple(proc.stdout.split("\n")[:-1])


def render_r(res: Resolution) -> tuple[str, ...]:
    """kmodd's answer in `modprobe -R` form."""
    return res.modules


def render_d(res: Resolution) -> tuple[str, ...]:
    """kmodd's answer in `modprobe -D` form (tools/modprobe.c print_action)."""
    lines = []
    for step in res.steps:
        if step.kind is StepKind.INSMOD:
            lines.append(f"insmod {step.path} {step.options}")
        elif step.kind is StepKind.INSTALL:
            lines.append(f"install {step.command} {step.options}")
        else:
            lines.append(f"builtin {step.module}")
    return tuple(lines)
