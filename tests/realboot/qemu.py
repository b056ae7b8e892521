"""Boot a real-boot image under qemu (TCG) with systemd as PID 1 and read its results.

The image's own kernel and initramfs are passed with -kernel/-initrd (root=/dev/vda),
the serial console goes to a log file, and the check unit writes its JSON to a second
raw disk (tests/realboot/guest/check.py's format).  Each boot gets its own copy of the
root disk (`cp --sparse=always`, seconds) so a boot's state is kept for the next one
when a plan needs it (the second boot of the same machine), and the cached image stays
pristine.  At `timeout_s` qemu is killed: a hung guest fails its test, never the suite.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.realboot.image import Image

RESULTS_BYTES = 16 << 20
MAGIC = b"KMODDRB1 "
MEMORY_MB = 1536  # systemd, kmodd's first build and update-initramfs; 1 GiB was tight


class BootError(RuntimeError):
    """A boot produced no readable results; the message has the console's tail."""


@dataclass(frozen=True)
class Boot:
    plan: str
    results: dict[str, Any]
    console: str
    duration_s: float
    disk: Path
    timed_out: bool

    def step(self, name: str) -> dict[str, Any]:
        """The facts of one step; a step that raised or never ran fails here, clearly."""
        entry = self.results.get("steps", {}).get(name)
        if entry is None:
            raise AssertionError(
                f"step {name!r} did not run in boot {self.plan!r} (timed out: "
                f"{self.timed_out}); console tail:\n{self.console[-3000:]}"
            )
        if "error" in entry:
            raise AssertionError(f"step {name!r} of boot {self.plan!r}: {entry['error']}")
        facts: dict[str, Any] = entry["facts"]
        return facts


def read_results(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        head = f.read(64)
        if not head.startswith(MAGIC):
            raise BootError(f"{path}: no results header (the check unit never wrote)")
        line, _, _ = head.partition(b"\n")
        length = int(line[len(MAGIC) :])
        f.seek(len(line) + 1)
        doc: dict[str, Any] = json.loads(f.read(length))
        return doc


def qemu_argv(
    image: Image,
    disk: Path,
    results: Path,
    console: Path,
    append: str,
    *,
    initrd: Path | None = None,
) -> list[str]:
    cmdline = f"root=/dev/vda rw console=ttyS0 panic=-1 {append}".strip()
    return [
        "qemu-system-x86_64",
        "-accel", "tcg",
        "-m", str(MEMORY_MB),
        "-smp", "1",
        "-display", "none",
        "-vga", "std",  # bochs-drm: one of the coldplug drivers the site policy denies
        "-monitor", "none",
        "-nic", "none",
        "-no-reboot",
        "-serial", f"file:{console}",
        "-kernel", str(image.vmlinuz),
        "-initrd", str(initrd or image.initrd),
        "-append", cmdline,
        "-drive", f"file={disk},format=raw,if=virtio,cache=unsafe",
        "-drive", f"file={results},format=raw,if=virtio",
    ]  # fmt: skip


def boot(
    image: Image,
    plan: str,
    workdir: Path,
    *,
    disk: Path | None = None,
    initrd: Path | None = None,
    append: str = "",
    timeout_s: float = 900,
) -> Boot:
    """Boot PLAN once.  DISK: a root disk a previous boot left (else a fresh copy)."""
    workdir.mkdir(parents=True, exist_ok=True)
    if disk is None:
        disk = workdir / f"{plan}.disk.raw"
        subprocess.run(
            ["cp", "--sparse=always", str(image.disk), str(disk)], check=True, timeout=600
        )
    results = workdir / f"{plan}.results.raw"
    with results.open("wb") as f:
        f.truncate(RESULTS_BYTES)
    console = workdir / f"{plan}.console.log"
    argv = qemu_argv(
        image, disk, results, console, f"kmodd_realboot.plan={plan} {append}", initrd=initrd
    )
    # KMODD_VM_WRAPPER: a command qemu runs under (a machine-wide VM slot on a shared
    # development machine, e.g. /work/coord/vmslot); the image build does not hold it.
    wrapper = os.environ.get("KMODD_VM_WRAPPER", "").split()
    start = time.monotonic()
    timed_out = False
    proc = subprocess.Popen(
        [*wrapper, *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        _, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
    duration = time.monotonic() - start
    text = console.read_text(errors="replace") if console.exists() else ""
    try:
        doc = read_results(results)
    except (BootError, ValueError) as e:
        raise BootError(
            f"boot {plan!r}: {e}; qemu exit {proc.returncode}, timed out {timed_out}, "
            f"{duration:.0f} s; qemu stderr: {err.decode(errors='replace')[-500:]}; "
            f"console tail:\n{text[-4000:]}"
        ) from e
    return Boot(plan, doc, text, duration, disk, timed_out)


def extract_file(disk: Path, path: str, dest: Path) -> Path:
    """Copy PATH out of the ext4 root disk (debugfs: no mount, no loop device)."""
    dest.unlink(missing_ok=True)
    subprocess.run(
        ["debugfs", "-R", f"dump -p {path} {dest}", str(disk)],
        capture_output=True,
        check=True,
        timeout=300,
    )
    if not dest.exists() or dest.stat().st_size == 0:
        raise BootError(f"{path} not found in {disk}")
    return dest


def available() -> str | None:
    """Why the real-boot tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (debootstrap, chroot)"
    for tool in ("qemu-system-x86_64", "debootstrap", "mkfs.ext4", "debugfs", "chroot"):
        if shutil.which(tool) is None:
            return f"{tool} not found (make test installs it: Makefile APT_PACKAGES)"
    return None
