"""Inside the VM: start journald and kmodd the way a machine would, and observe the kernel.

Runs in the guest under the venv's python (`python -m tests.vm.guest PLAN`, from the
script tests/vm/harness.py boots).  Stdlib only: kmodd itself runs as its own processes
(`kmodd`, `kmodctl`, the installed helper), exactly as on a real machine.  Each step of a
plan writes KMODD_VM_OUT/STEP.json as soon as it ends: {"ok", "data", "error",
"duration_s"}, so a later hang or crash never loses what earlier steps saw.  The host
side (tests/vm/test_*.py) asserts on that data.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

REPO = Path(os.environ.get("KMODD_VM_REPO", Path(__file__).resolve().parents[2]))
OUT = Path(os.environ.get("KMODD_VM_OUT", "/tmp/kmodd-vm-out"))
PREFIX = Path(os.environ.get("KMODD_VM_SHARED", "/nonexistent")) / "prefix"
VENV_BIN = REPO / ".venv" / "bin"
HELPER = "/usr/local/libexec/kmodd/kmodd-modprobe"
SYSCTL_DROPIN = "/usr/local/lib/sysctl.d/50-kmodd.conf"
SITE_DIR = Path("/etc/kmodd/policy.d")
JOURNALD = "/lib/systemd/systemd-journald"
JOURNAL_SOCKET = Path("/run/systemd/journal/socket")
NOBODY = "65534"
# Under TCG on 2 shared cores one Python start is 1-3 s and the daemon's first start
# (imports, libkmod indexes, ~6,000 snapshot entries, the snapshot's glob rows, coverage)
# was measured at 265-618 s (2026-12-02, load 1-8): deadlines are generous because a slow
# guest is not a failure, and every wait ends at its deadline.
DAEMON_READY_S = 900.0
STEP_S = 480.0
SETUP_S = 1000.0
CMD_S = 60.0
JOURNAL_WAIT_S = 60.0

Record = dict[str, Any]


class StepTimeout(Exception):
    """A step ran past its deadline (SIGALRM)."""


def now_us() -> int:
    return time.time_ns() // 1000


def run(argv: list[str], *, timeout: float = CMD_S, **kw: Any) -> dict[str, Any]:
    """ARGV's exit status and output; never raises on failure or timeout."""
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, check=False, **kw
        )
    except subprocess.TimeoutExpired:
        return {"argv": argv, "rc": None, "stdout": "", "stderr": f"timeout after {timeout} s"}
    return {"argv": argv, "rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}


def loaded_modules() -> list[str]:
    lines = Path("/proc/modules").read_text().splitlines()
    return sorted(line.split(" ", 1)[0] for line in lines)


def read_modprobe_path() -> str:
    return Path("/proc/sys/kernel/modprobe").read_text().strip()


@dataclass
class Guest:
    """The machine under test: journald, the installed files, the daemon."""

    # The scenario plans prove the helper and modprobe.d layers, so the BPF layer is off
    # there (it would refuse their kernel requests before any helper runs, which is what
    # tests/vm/test_bpf.py proves); a plan that wants it passes other args.
    daemon_args: list[str] = field(default_factory=lambda: ["--no-kernel-layer"])
    daemon: subprocess.Popen[bytes] | None = None
    notify: socket.socket | None = None
    notifications: list[str] = field(default_factory=list)

    # -- set-up, as the machine's boot would do it --------------------------------------
    def start_journald(self) -> None:
        subprocess.Popen(
            [JOURNALD], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        wait_until(JOURNAL_SOCKET.exists, 60, "journald socket")
        # syslog(3) (the helper's log) writes to /dev/log; systemd-journald-dev-log.socket
        # would make this link on a booted system.
        with contextlib.suppress(FileExistsError):
            Path("/dev/log").symlink_to("/run/systemd/journal/dev-log")

    def install(self) -> dict[str, Any]:
        """The files `kmodctl install` wrote on the host (--prefix), copied into place."""
        copied = run(["cp", "-a", str(PREFIX / "usr"), "/"])
        applied = run(["/lib/systemd/systemd-sysctl", SYSCTL_DROPIN])
        return {"copy": copied, "sysctl": applied, "kernel_modprobe": read_modprobe_path()}

    def write_policy(self, name: str, text: str) -> Path:
        SITE_DIR.mkdir(parents=True, exist_ok=True)
        path = SITE_DIR / name
        tmp = path.with_name(f".{name}.tmp")  # dotfiles are ignored by the watcher
        tmp.write_text(text)
        tmp.rename(path)
        return path

    # -- the daemon -----------------------------------------------------------------------
    def start_daemon(self) -> dict[str, Any]:
        sock_path = "/run/kmodd-vm/notify.sock"
        Path(sock_path).unlink(missing_ok=True)
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(sock_path)
        self.notifications = []
        started = time.monotonic()
        env = dict(os.environ, NOTIFY_SOCKET=sock_path, PYTHONFAULTHANDLER="1")
        with Path("/run/kmodd-vm/kmodd.log").open("ab") as log:
            self.daemon = subprocess.Popen(
                [str(VENV_BIN / "kmodd"), *self.daemon_args],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        ready = self.wait_notify("READY=1", DAEMON_READY_S)
        took = round(time.monotonic() - started, 1)
        if ready is None:
            self._dump_stacks()
            raise TimeoutError(f"kmodd sent no READY=1 in {took} s: {self.notifications}")
        return {"ready": ready, "start_s": took}

    def _dump_stacks(self) -> None:
        """A daemon that never got ready: SIGABRT makes faulthandler (PYTHONFAULTHANDLER)
        write every thread's Python stack to its log, which the step's error carries."""
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGABRT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.daemon.wait(timeout=20)

    def wait_notify(self, want: str, timeout: float) -> str | None:
        """The first datagram naming WANT (a line such as READY=1), or None at the deadline."""
        assert self.notify is not None
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if self.daemon is not None and self.daemon.poll() is not None:
                return None
            self.notify.settimeout(min(left, 1.0))
            try:
                msg = self.notify.recv(4096).decode(errors="replace")
            except TimeoutError:
                continue
            self.notifications.append(msg)
            if want in msg.split("\n"):
                return msg
        return None

    def kill_daemon(self, sig: int = signal.SIGKILL) -> int | None:
        assert self.daemon is not None
        self.daemon.send_signal(sig)
        try:
            return self.daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            return None

    def daemon_log(self) -> str:
        try:
            return Path("/run/kmodd-vm/kmodd.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    # -- observing -----------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        res = run([str(VENV_BIN / "kmodctl"), "status", "--json"])
        try:
            return {"rc": res["rc"], "json": json.loads(res["stdout"]), "stderr": res["stderr"]}
        except ValueError:
            return {"rc": res["rc"], "json": None, "stdout": res["stdout"], "stderr": res["stderr"]}


def journal(since_us: int, *idents: str) -> list[Record]:
    """Records of the given SYSLOG_IDENTIFIERs written at or after SINCE_US."""
    argv = ["journalctl", "-o", "json", "--no-pager", f"--since=@{since_us // 1_000_000}"]
    for ident in idents or ("kmodd", "kmodd-modprobe"):
        argv += ["-t", ident]
    res = run(argv)
    out = []
    for line in res["stdout"].splitlines():
        with contextlib.suppress(ValueError):
            rec = json.loads(line)
            if int(rec.get("__REALTIME_TIMESTAMP", 0)) >= since_us:
                out.append(slim(rec))
    return out


def slim(rec: Record) -> Record:
    """The fields worth reporting (journald adds ~20 trusted ones we never assert on)."""
    keep = ("MESSAGE", "MESSAGE_ID", "PRIORITY", "SYSLOG_IDENTIFIER", "__REALTIME_TIMESTAMP")
    return {k: v for k, v in rec.items() if k in keep or k.startswith("KMODD_")}


def wait_records(
    since_us: int,
    pred: Callable[[Record], bool],
    *,
    count: int = 1,
    timeout: float = JOURNAL_WAIT_S,
) -> list[Record]:
    """All records since SINCE_US once COUNT of them match PRED, or all at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        records = journal(since_us)
        if sum(1 for r in records if pred(r)) >= count or time.monotonic() > deadline:
            return records
        time.sleep(0.5)


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} after {timeout} s")
        time.sleep(0.1)


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise StepTimeout("step deadline")


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(int(seconds))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


Step = Callable[[Guest], Any]


def run_step(guest: Guest, name: str, step: Step, timeout: float = STEP_S) -> bool:
    """Run STEP, write OUT/NAME.json; True if it returned (its data may still show a bug)."""
    started = time.monotonic()
    result: dict[str, Any] = {"ok": False, "data": None, "error": None}
    try:
        with deadline(timeout):
            result["data"] = step(guest)
        result["ok"] = True
    except BaseException as err:  # report everything, including step timeouts
        result["error"] = "".join(traceback.format_exception(err))[-3000:]
        result["daemon_log"] = guest.daemon_log()
    result["duration_s"] = round(time.monotonic() - started, 1)
    OUT.mkdir(parents=True, exist_ok=True)
    tmp = OUT / f".{name}.tmp"
    tmp.write_text(json.dumps(result, indent=1, default=str))
    tmp.rename(OUT / f"{name}.json")
    print(
        f"kmodd-vm: step {name}: {'ok' if result['ok'] else 'ERROR'} ({result['duration_s']} s)",
        flush=True,
    )
    if result["error"]:
        print(result["error"], file=sys.stderr, flush=True)
    return bool(result["ok"])


def run_plan(steps: list[tuple[str, Step]], guest: Guest) -> int:
    """Every step in order; a failed set-up step (name starting 'setup') stops the plan."""
    Path("/run/kmodd-vm").mkdir(parents=True, exist_ok=True)
    for name, step in steps:
        timeout = SETUP_S if name.startswith("setup") else STEP_S
        if not run_step(guest, name, step, timeout) and name.startswith("setup"):
            return 1
    return 0


def main(argv: list[str]) -> int:
    from tests.vm import scenarios  # noqa: PLC0415 -- scenarios import this module

    if len(argv) != 2 or argv[1] not in scenarios.PLANS:
        print(f"usage: {argv[0]} {{{','.join(scenarios.PLANS)}}}", file=sys.stderr)
        return 2
    guest, steps = scenarios.PLANS[argv[1]]()
    return run_plan(steps, guest)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
