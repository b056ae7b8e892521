"""Boot the real Debian kernel under qemu (virtme-ng) and run a shell script inside it.

The guest is this machine's userspace, shared read-only over 9p, with the kernel tree of
tests/kerneltree.py mounted as its /lib/modules/RELEASE.  Facts this harness relies on
(virtme-ng 1.42, qemu 7.2, measured on the 2-core CI machine):

- `--disable-kvm`: /dev/kvm exists here but hangs, so qemu runs TCG.  `--force-9p`: the
  virtiofs path (C virtiofsd) booted slower.
- Guest /etc, /var and /tmp are overlays over the host's (writable, thrown away), /run is a
  fresh tmpfs; `--rwdir GUEST=HOST` shares a writable host dir: our script and results.
- virtme's root mount is 9p with cache=none: every exec and every Python import pays a
  round trip per lookup and page (/bin/true ~270 ms, `python3 -c pass` ~1.5 s).  A second
  read-only 9p export of / (tag `kmoddfast`), mounted with cache=loose and bound over
  /usr/bin, this Python's stdlib (sysconfig), the shared libraries and the repository,
  cuts exec cost about 3x.  Only one mount per 9p tag is possible, hence the extra device.
- udev's coldplug at boot loads ~35 modules through 80-drivers.rules (kvm, crypto drivers
  whose self-tests run under TCG): ~10 s of every boot.  We mask that rules file with an
  empty one (`--rodir /etc/udev/rules.d=...`; the host's dir is empty).  udevd still runs
  and still broadcasts uevents, which is all the device scenario needs.
- The guest CPU is qemu's `max` without AVX (TCG_CPU).  With AVX2 listed, glibc picks its
  AVX2 string and memory functions, which TCG (qemu 7.2, its first release with AVX)
  emulates slowly: a Python loop took 3.0-4.7 s with them and 2.2-2.7 s without, and
  `import kmodd.daemon.main` (9p cache warm) 10-11 s and 3.9-4.9 s (interleaved boots).
- vng returns the guest script's exit status.  It needs virtme-run on PATH (the venv's
  bin) and works with stdin not a terminal (CI has none).  A hard timeout kills the whole
  process group (vng, qemu, virtiofsd), so a hung guest can never hang the suite.
"""

from __future__ import annotations

import compileall
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.kerneltree import KernelTree, selected_tree

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = REPO_ROOT / ".venv" / "bin"
FAST_TAG = "kmoddfast"
RESULTS_DIR = "results"
DEFAULT_MEMORY = "1G"
# After vng's own `-cpu max` (the last -cpu wins): see the module docstring.
TCG_CPU = "max,avx=off,avx2=off,fma=off,f16c=off"


def _python_dirs() -> tuple[str, ...]:
    """This Python's stdlib and site dirs (sysconfig): /usr/lib/python3.11 on Debian 12,
    /usr/lib/python3.13 on Debian 13; a venv's site-packages is under REPO_ROOT (bound)."""
    names = ("stdlib", "platstdlib", "purelib", "platlib")
    found = [sysconfig.get_paths()[n] for n in names]
    dirs = [d for d in dict.fromkeys(found) if not Path(d).is_relative_to(REPO_ROOT)]
    return tuple(d for d in dirs if Path(d).is_dir())


# Dirs bound from the cache=loose export: what exec and Python startup read.
FAST_DIRS = (
    "/usr/bin",
    "/usr/sbin",
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/python3",  # Debian's dist-packages
    *_python_dirs(),
    "/usr/lib/systemd",
)


class VMError(RuntimeError):
    """virtme-ng is missing or the guest could not be started."""


@dataclass(frozen=True, slots=True)
class VMResult:
    returncode: int  # the guest script's exit status; -9 when the hard timeout fired
    output: str  # the guest script's stdout+stderr, then vng's own messages
    timed_out: bool
    duration_s: float
    vm_id: str = ""  # the shared dir's name: unique, on the qemu command line
    results: Mapping[str, Any] = field(default_factory=dict)  # RESULTS_DIR/NAME.json
    files: Mapping[str, str] = field(default_factory=dict)  # every file there, as text

    def result(self, name: str) -> Any:
        """The JSON the guest wrote as NAME.json; KeyError with the output if it did not."""
        if name not in self.results:
            raise KeyError(f"guest wrote no {name}.json (rc={self.returncode}):\n{self.tail()}")
        return self.results[name]

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.output.splitlines()[-lines:])


def vng_path() -> Path:
    path = VENV_BIN / "vng"
    if not path.exists():
        raise VMError(f"{path} not found: run `make venv` (virtme-ng is a test extra)")
    return path


def guest_prelude(shared: Path, tree: KernelTree) -> str:
    """Shell run first in every guest: environment, the fast mounts, the result dir."""
    binds = " ".join(shlex.quote(d) for d in (*FAST_DIRS, str(REPO_ROOT)))
    return f"""\
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1
export KMODD_VM_SHARED={shlex.quote(str(shared))}
export KMODD_VM_OUT={shlex.quote(str(shared / RESULTS_DIR))}
export KMODD_VM_REPO={shlex.quote(str(REPO_ROOT))}
export KMODD_VM_RELEASE={shlex.quote(tree.release)}
mkdir -p /run/kmodd-vm/fast "$KMODD_VM_OUT"
if mount -t 9p -o ro,trans=virtio,version=9p2000.L,access=any,msize=524288,cache=loose \\
        {FAST_TAG} /run/kmodd-vm/fast; then
    for d in {binds}; do
        [ -d "/run/kmodd-vm/fast$d" ] && mount --bind "/run/kmodd-vm/fast$d" "$d"
    done
else
    echo "kmodd-vm: no fast mount, running on the cache=none root" >&2
fi
cd "$KMODD_VM_REPO"
"""


def vng_argv(script: Path, shared: Path, tree: KernelTree, append: str, memory: str) -> list[str]:
    rules = shared / "udev-rules"
    fast = f"-fsdev local,id={FAST_TAG},path=/,security_model=none,readonly=on,multidevs=remap"
    argv = [
        str(vng_path()),
        "--run",
        str(tree.vmlinuz),
        "--disable-kvm",
        "--force-9p",
        "--memory",
        memory,
        f"--rwdir={shared}",
        f"--rodir=/etc/udev/rules.d={rules}",
        f"--qemu-opts={fast} -device virtio-9p-pci,fsdev={FAST_TAG},mount_tag={FAST_TAG}"
        f" -cpu {TCG_CPU}",
    ]
    if append:
        argv += ["--append", append]
    return [*argv, "--", f"sh {shlex.quote(str(script))}"]


def _prepare(shared: Path, script: str, tree: KernelTree) -> Path:
    rules = shared / "udev-rules"
    rules.mkdir()
    (rules / "80-drivers.rules").write_text("# masked by tests/vm/harness.py\n")
    path = shared / "script.sh"
    path.write_text(guest_prelude(shared, tree) + script)
    return path


def _run(
    argv: list[str], timeout_s: float, echo: Callable[[str], None] | None
) -> tuple[int, bool, str]:
    """Run vng; (returncode, timed_out, output).

    stdout is a pipe, not a file: qemu re-opens /proc/self/fd/1 once per virtio console
    (stdout, stderr, dev_stdout...) with O_TRUNC, so a regular file gets clobbered, while
    every re-open of a pipe is the same pipe.
    """
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=REPO_ROOT,
        env=env,
        start_new_session=True,  # one process group: vng, virtme-run, qemu
    )
    lines: list[str] = []
    reader = threading.Thread(target=_read_lines, args=(proc, lines, echo), daemon=True)
    reader.start()
    try:
        returncode, timed_out = proc.wait(timeout=timeout_s), False
    except subprocess.TimeoutExpired:
        returncode, timed_out = -signal.SIGKILL, True
    finally:
        _kill_group(proc)
    reader.join(timeout=10)
    return returncode, timed_out, "".join(lines)


def _read_lines(
    proc: subprocess.Popen[bytes], lines: list[str], echo: Callable[[str], None] | None
) -> None:
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.decode(errors="replace")
        lines.append(line)
        if echo is not None:
            echo(line)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def precompile() -> None:
    """Byte-compile the repository's Python on the host: the guest sees it read-only
    (PYTHONDONTWRITEBYTECODE is set here anyway), and compiling kmodd under TCG on every
    start costs seconds."""
    for sub in ("kmodd", "tests"):
        compileall.compile_dir(REPO_ROOT / sub, quiet=1, workers=0)


def _read_results(directory: Path) -> tuple[dict[str, Any], dict[str, str]]:
    results: dict[str, Any] = {}
    files: dict[str, str] = {}
    for path in sorted(directory.glob("*")):
        if not path.is_file() or path.name.startswith(".") or path.stat().st_size > 1 << 20:
            continue
        files[path.name] = path.read_text(errors="replace")
        if path.suffix == ".json":
            try:
                results[path.stem] = json.loads(files[path.name])
            except ValueError as err:
                results[path.stem] = {"unreadable": str(err)}
    return results, files


def boot(
    script: str,
    *,
    append: str = "",
    timeout_s: float = 180,
    memory: str = DEFAULT_MEMORY,
    tree: KernelTree | None = None,
    prepare: Callable[[Path], None] | None = None,
    echo: Callable[[str], None] | None = None,
    keep: bool = False,
) -> VMResult:
    """Boot the Debian kernel, run SCRIPT (sh) as root in the guest, collect its results.

    The script finds its environment in KMODD_VM_OUT (write NAME.json there),
    KMODD_VM_SHARED, KMODD_VM_REPO (the repository, also the cwd) and KMODD_VM_RELEASE.
    """
    tree = tree or selected_tree()
    shared = Path(tempfile.mkdtemp(prefix="kmodd-vm-"))
    started = time.monotonic()
    try:
        path = _prepare(shared, script, tree)
        if prepare is not None:
            prepare(shared)
        precompile()
        argv = vng_argv(path, shared, tree, append, memory)
        returncode, timed_out, output = _run(argv, timeout_s, echo)
        if timed_out:
            output += f"\nkmodd-vm: killed after the {timeout_s:.0f} s hard timeout\n"
        results, files = _read_results(shared / RESULTS_DIR)
    finally:
        if keep:
            print(f"kmodd-vm: kept {shared}", file=sys.stderr)
        else:
            shutil.rmtree(shared, ignore_errors=True)
    duration = time.monotonic() - started
    return VMResult(returncode, output, timed_out, duration, shared.name, results, files)


def install_prefix(shared: Path) -> None:
    """`kmodctl install --prefix SHARED/prefix` on the host; the guest copies it to /.

    Installing in the guest would cost a Python start with every kmodd import under TCG
    (10-20 s); the files are the same, their contents already name the final paths.
    """
    prefix = shared / "prefix"
    prefix.mkdir()
    argv = [str(VENV_BIN / "kmodctl"), "install", "--prefix", str(prefix)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise VMError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")


def boot_plan(
    plan: str,
    *,
    append: str = "",
    timeout_s: float = 900,
    echo: Callable[[str], None] | None = None,
) -> VMResult:
    """Boot once and run tests/vm/scenarios.py's PLAN in the guest (results per step)."""
    script = f"exec {shlex.quote(str(VENV_BIN / 'python'))} -m tests.vm.guest {plan}\n"
    return boot(script, append=append, timeout_s=timeout_s, prepare=install_prefix, echo=echo)
