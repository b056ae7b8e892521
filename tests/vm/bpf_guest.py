"""Inside the VM: the kernel layer (kmodd/bpf) against the real Debian 6.1 kernel.

`python -m tests.vm.bpf_guest PLAN` runs a plan's steps (each writes OUT/STEP.json through
tests/vm/guest.run_plan); `hold install|adopt EVENTS` is the process that loads or adopts
the pinned layer and copies ring-buffer events to EVENTS (JSON lines) until it is killed;
`ctl permissive|enforce|stats|uninstall` adopts the pins, does one thing and exits.

kernel.modprobe points at a counting shell script (one line per exec, then the real
modprobe), so "the helper never ran" is a count, not an inference.  No daemon: what is
under test is the kernel's verdict from the maps, and the requester facts it took.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import lzma
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tests.vm.guest import OUT, Guest, loaded_modules, run, run_plan, wait_until

SHARED = Path(os.environ.get("KMODD_VM_SHARED", "/tmp"))
RELEASE = os.environ.get("KMODD_VM_RELEASE", os.uname().release)
MODDIR = Path("/lib/modules") / RELEASE / "kernel"


def _module(stem: str) -> Path:
    """STEM's file as the tree has it: .ko on Debian 12's 6.1, .ko.xz on Debian 13's 6.12."""
    for suffix in (".ko", ".ko.xz", ".ko.zst", ".ko.gz"):
        path = MODDIR / f"{stem}{suffix}"
        if path.exists():
            return path
    return MODDIR / f"{stem}.ko"


DENIED_KO = _module("drivers/net/dummy")
CONTROL_KO = _module("drivers/net/ifb")
COUNTER = SHARED / "count-helper.sh"
RUNS = SHARED / "helper-runs.txt"
TRIGGER = Path(__file__).with_name("trigger.py")
PY = "/usr/bin/python3"
NOBODY = ("setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups")
AF_IPX, AF_APPLETALK, AF_X25, AF_DECNET = 4, 5, 9, 12  # 4 and 12 have no module in 6.1
# rtnl-link-KIND is requested with KIND as given: a fake trace line as a request name.
FORGED_KIND = "x-1 [000] 1.1: module_request: net-pf-5"
FORGED_COMM = b"x\n"
# The tables' rule numbers, echoed by the kernel in every event.
R_PF5_UNPRIV, R_PF5_ROOT, R_USERNS, R_PF4_RANGE, R_PF4_ALLOW, R_FILE, R_PF12 = range(1, 8)
RANGE = (1000, 1999)
CONCURRENT = 50
LATENCY_ROUNDS = 30
PR_SET_NAME = 15
MODULE_INIT_COMPRESSED_FILE = 4  # finit_module flag (include/uapi/linux/module.h)


def tables(generation: int = 1) -> Any:
    from kmodd.bpf.layer import Tables, denied_files  # noqa: PLC0415
    from kmodd.bpf.layout import Condition, Mode, NameRules, Verdict  # noqa: PLC0415

    deny, allow = Verdict.DENY, Verdict.ALLOW
    names = {
        # MODHARDEN for appletalk: unprivileged requesters denied, root allowed
        "net-pf-5": NameRules(
            (Condition(deny, R_PF5_UNPRIV, unprivileged=True),), allow, R_PF5_ROOT
        ),
        # a uid range denied, everybody else allowed
        "net-pf-4": NameRules((Condition(deny, R_PF4_RANGE, uid=RANGE),), allow, R_PF4_ALLOW),
        "net-pf-12": NameRules((), deny, R_PF12),
        # every other name: denied from a non-initial user namespace, else no verdict
        "": NameRules((Condition(deny, R_USERNS, userns=True),)),
    }
    files = denied_files([(str(DENIED_KO), R_FILE)])
    return Tables(names, files, Mode.ENFORCE, load_data(), generation)


def load_data() -> Any:
    """The daemon's kernel_load_data verdict for this guest's kernel, tree and kmod: DENY
    on 6.1 (uncompressed) and on 6.12 under kmod >= 31; ALLOW on 6.12 under Debian 12's kmod
    30, which decompresses .ko.xz itself and loads every module through init_module."""
    from kmodd.daemon.kernel_tables import kmod_version, load_data_verdict  # noqa: PLC0415

    return load_data_verdict(MODDIR.parent, kmod_version=kmod_version())


# --- the holder and control processes ----------------------------------------------------


def hold(how: str, events: Path) -> int:
    from kmodd.bpf.layer import KernelLayer  # noqa: PLC0415

    layer = KernelLayer.install() if how == "install" else KernelLayer.adopt()
    if how == "install":
        layer.apply(tables())
    reader = layer.events()
    cfg = layer.config()
    ready = {"pid": os.getpid(), "adopted": layer.adopted, "generation": cfg.generation}
    events.with_suffix(".ready").write_text(json.dumps(ready))
    with events.open("a") as out:
        while True:
            for event in reader.read(200):
                row = asdict(event)
                row.update(kind=event.kind.name, action=event.action.name)
                row.update(verdict=event.verdict.name, mode=event.mode.name)
                out.write(json.dumps(row) + "\n")
                out.flush()


def ctl(what: str) -> int:
    from kmodd.bpf.layer import KernelLayer  # noqa: PLC0415
    from kmodd.bpf.layout import Mode, Verdict  # noqa: PLC0415

    if what == "uninstall":
        print(json.dumps(KernelLayer.uninstall()))
        return 0
    with KernelLayer.adopt() as layer:
        cfg = layer.config()
        if what in ("permissive", "enforce"):
            mode = Mode.PERMISSIVE if what == "permissive" else Mode.ENFORCE
            layer.set_config(mode, Verdict(cfg.load_data), cfg.generation + 1)
        print(json.dumps({s.name: n for s, n in layer.stats().items()}))
    return 0


# --- helpers of the plan ---------------------------------------------------------------------


def helper_runs() -> list[str]:
    return RUNS.read_text().splitlines() if RUNS.exists() else []


def start_holder(how: str, events: Path) -> subprocess.Popen[bytes]:
    ready = events.with_suffix(".ready")
    with contextlib.suppress(FileNotFoundError):
        ready.unlink()
    argv = [sys.executable, "-m", "tests.vm.bpf_guest", "hold", how, str(events)]
    log = events.with_suffix(".log").open("ab")
    proc = subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True)
    try:
        wait_until(lambda: ready.exists() or proc.poll() is not None, 240, "holder ready")
    finally:
        log.close()
    if proc.poll() is not None:
        raise RuntimeError(
            f"holder exited {proc.returncode}: {events.with_suffix('.log').read_text()}"
        )
    return proc


def events_of(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_events(path: Path, pred: Callable[[dict[str, Any]], bool], count: int = 1) -> list[Any]:
    found: list[Any] = []

    def enough() -> bool:
        nonlocal found
        found = [e for e in events_of(path) if pred(e)]
        return len(found) >= count

    with contextlib.suppress(TimeoutError):
        wait_until(enough, 60, "ring-buffer events")
    return found


def trigger(prefix: tuple[str, ...], spec: str) -> dict[str, Any]:
    proc = subprocess.run(
        [*prefix, PY, "-IS", str(TRIGGER), spec],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    out: dict[str, Any] = {"rc": proc.returncode, "stderr": proc.stderr[-500:]}
    with contextlib.suppress(ValueError):
        out["json"] = json.loads(proc.stdout)
    return out


def as_user(uid: int, family: int, comm: bytes | None = None) -> int:
    """Fork a child that becomes UID (gid too), optionally renames itself, opens
    socket(FAMILY); returns its pid (reap it with wait_child)."""
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        if comm is not None:
            libc = ctypes.CDLL(None)
            libc.prctl(PR_SET_NAME, ctypes.c_char_p(comm), 0, 0, 0)
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        with contextlib.suppress(OSError):
            socket.socket(family, socket.SOCK_DGRAM).close()
    except BaseException:
        code = 1
    os._exit(code)


def wait_child(pid: int) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def ev_by(events: Path, name: str, tgid: int) -> list[Any]:
    return wait_events(events, lambda e: e["name"] == name and e["tgid"] == tgid)


# --- the plan's steps ----------------------------------------------------------------------

EVENTS_A = OUT / "events-a.jsonl"  # the first holder's copy of the ring buffer
EVENTS_B = OUT / "events-b.jsonl"  # the adopting holder's
_HOLDERS: dict[str, subprocess.Popen[bytes]] = {}


def s_detect(_guest: Guest) -> dict[str, Any]:
    from kmodd.bpf.detect import detect  # noqa: PLC0415

    lsm = Path("/sys/kernel/security/lsm")
    return {"detect": asdict(detect()), "lsm": lsm.read_text() if lsm.exists() else None}


def mount_bpffs() -> None:
    """What systemd does at boot (sys-fs-bpf.mount); virtme does not."""
    if " /sys/fs/bpf bpf " not in Path("/proc/mounts").read_text():
        run(["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"])


def s_setup(_guest: Guest) -> dict[str, Any]:
    mount_bpffs()
    COUNTER.write_text(
        f'#!/bin/sh\necho "$*" >> {shlex.quote(str(RUNS))}\nexec /sbin/modprobe "$@"\n'
    )
    COUNTER.chmod(0o755)
    Path("/proc/sys/kernel/modprobe").write_text(str(COUNTER))
    started = time.monotonic()
    _HOLDERS["a"] = start_holder("install", EVENTS_A)
    pins = sorted(p.name for p in Path("/sys/fs/bpf/kmodd").iterdir())
    return {"load_s": round(time.monotonic() - started, 1), "pins": pins}


def s_nobody(_guest: Guest) -> dict[str, Any]:
    """setpriv'd nobody: net-pf-5 denied in-kernel, the helper never runs."""
    before = len(helper_runs())
    proc = subprocess.Popen(
        [*NOBODY, PY, "-IS", str(TRIGGER), f"socket:{AF_APPLETALK}:2"],
        stdout=subprocess.PIPE,
        text=True,
    )
    stdout, _ = proc.communicate(timeout=120)
    events = ev_by(EVENTS_A, "net-pf-5", proc.pid)
    return {
        "pid": proc.pid,
        "trigger": json.loads(stdout or "{}"),
        "events": events,
        "helper_runs": len(helper_runs()) - before,
        "modules": loaded_modules(),
    }


def s_forged(_guest: Guest) -> dict[str, Any]:
    """A fake trace line as a request name (rtnl-link-KIND from a user+net namespace)."""
    if shutil.which("ip") is None:  # its exit 127 would pass for the kernel's refusal
        raise RuntimeError("ip is missing (iproute2: the Makefile's APT_PACKAGES has it)")
    before = len(helper_runs())
    argv = [
        *NOBODY,
        "unshare",
        "--user",
        "--map-root-user",
        "--net",
        "ip",
        "link",
        "add",
        "x0",
        "type",
        FORGED_KIND,
    ]
    res = run(argv, timeout=120)
    name = f"rtnl-link-{FORGED_KIND}"
    events = wait_events(EVENTS_A, lambda e: e["name"] == name)
    return {"ip": res, "events": events, "helper_runs": len(helper_runs()) - before}


def s_newline_comm(_guest: Guest) -> dict[str, Any]:
    before = len(helper_runs())
    pid = as_user(65534, AF_APPLETALK, FORGED_COMM)
    code = wait_child(pid)
    return {
        "pid": pid,
        "exit": code,
        "events": ev_by(EVENTS_A, "net-pf-5", pid),
        "helper_runs": len(helper_runs()) - before,
    }


def s_userns(_guest: Guest) -> dict[str, Any]:
    before = len(helper_runs())
    prefix = (*NOBODY, "unshare", "--user", "--map-root-user")
    proc = subprocess.Popen(
        [*prefix, PY, "-IS", str(TRIGGER), f"socket:{AF_X25}:5"], stdout=subprocess.PIPE, text=True
    )
    stdout, _ = proc.communicate(timeout=120)
    init_ns = Path("/proc/self/ns/user").stat().st_ino
    return {
        "trigger": json.loads(stdout or "{}"),
        "init_userns": init_ns,
        "events": ev_by(EVENTS_A, "net-pf-9", proc.pid),
        "helper_runs": len(helper_runs()) - before,
    }


def s_root(_guest: Guest) -> dict[str, Any]:
    before = len(helper_runs())
    proc = subprocess.Popen(
        [PY, "-IS", str(TRIGGER), f"socket:{AF_APPLETALK}:2"], stdout=subprocess.PIPE, text=True
    )
    stdout, _ = proc.communicate(timeout=120)
    return {
        "trigger": json.loads(stdout or "{}"),
        "events": ev_by(EVENTS_A, "net-pf-5", proc.pid),
        "helper": helper_runs()[before:],
        "modules": loaded_modules(),
    }


def s_concurrent(_guest: Guest) -> dict[str, Any]:
    """50 requests of net-pf-4 at once, half root, half uids 1000-1024: each its own verdict."""
    before = len(helper_runs())
    uids = [0 if i % 2 else 1000 + i // 2 for i in range(CONCURRENT)]
    gate_r, gate_w = os.pipe()
    pids = {}
    for uid in uids:
        pid = os.fork()
        if pid == 0:
            os.close(gate_w)
            os.read(gate_r, 1)  # all start together when the gate closes
            if uid:
                os.setgroups([])
                os.setresgid(uid, uid, uid)
                os.setresuid(uid, uid, uid)
            with contextlib.suppress(OSError):
                socket.socket(AF_IPX, socket.SOCK_DGRAM).close()
            os._exit(0)
        pids[pid] = uid
    os.close(gate_r)
    os.close(gate_w)
    for pid in pids:
        wait_child(pid)
    events = wait_events(
        EVENTS_A, lambda e: e["name"] == "net-pf-4" and e["tgid"] in pids, CONCURRENT
    )
    return {
        "uids": {str(p): u for p, u in pids.items()},
        "events": events,
        "helper": [r for r in helper_runs()[before:] if "net-pf-4" in r],
    }


def _init_module(path: Path) -> int:
    """init_module(2) from memory: 0 or the errno."""
    libc = ctypes.CDLL(None, use_errno=True)
    image = path.read_bytes()
    if path.suffix == ".xz":  # what kmod < 31 does: decompress, then init_module
        image = lzma.decompress(image)
    rc = libc.syscall(175, ctypes.c_char_p(image), ctypes.c_ulong(len(image)), b"")
    return 0 if rc == 0 else ctypes.get_errno()


def _finit_compressed(path: Path) -> int:
    """finit_module(2) of a compressed file, the kernel decompressing (what kmod >= 31
    does): 0 or the errno."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        rc = libc.syscall(313, fd, b"", MODULE_INIT_COMPRESSED_FILE)
        return 0 if rc == 0 else ctypes.get_errno()
    finally:
        os.close(fd)


def s_files(_guest: Guest) -> dict[str, Any]:
    """Loads that never ask for a name: insmod by path, modprobe --ignore-install, and
    init_module from memory, of a denied module file; insmod of another file works.
    Where the layer must allow init_module (load_data ALLOW: kmod < 31 decompressing
    .ko.xz), the file is still refused when the kernel reads it (finit_module, the
    kernel decompressing), and init_module from memory loads it: the documented gap."""
    st = DENIED_KO.stat()
    verdict = load_data().name
    since = time.monotonic_ns()  # bpf_ktime_get_ns: earlier steps' kmod 30 loads are LOAD_DATA
    if verdict == "DENY":
        loads = {
            "insmod": run(["insmod", str(DENIED_KO)]),
            "ignore_install": run(["modprobe", "--ignore-install", "dummy"]),
            "init_module_errno": _init_module(DENIED_KO),
        }
    else:
        loads = {
            "finit_compressed_errno": _finit_compressed(DENIED_KO),
            "init_module_errno": _init_module(DENIED_KO),
            "rmmod": run(["rmmod", "dummy"]),  # the later steps load it again
        }
    return {
        "load_data": verdict,
        **loads,
        "control": run(["insmod", str(CONTROL_KO)]),
        "stat": {
            "dev": st.st_dev,
            "ino": st.st_ino,
            "major": os.major(st.st_dev),
            "minor": os.minor(st.st_dev),
        },
        "events": wait_events(
            EVENTS_A,
            lambda e: (
                e["ktime_ns"] >= since
                and (e["kind"] == "LOAD_DATA" or e["name"] in (DENIED_KO.name, CONTROL_KO.name))
            ),
            4 if verdict == "DENY" else 3,
        ),
        "modules": loaded_modules(),
        "denied_file": DENIED_KO.name,
    }


def s_kill9(_guest: Guest) -> dict[str, Any]:
    """SIGKILL the loading process: the pinned layer keeps denying (nobody reads the ring)."""
    holder = _HOLDERS.pop("a")
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    before = len(helper_runs())
    pid = as_user(1000, AF_IPX)
    wait_child(pid)
    pins = sorted(p.name for p in Path("/sys/fs/bpf/kmodd").iterdir())
    return {
        "holder_exit": holder.returncode,
        "pid": pid,
        "pins": pins,
        "helper_runs": len(helper_runs()) - before,
    }


def s_adopt(_guest: Guest) -> dict[str, Any]:
    """A new process adopts the pins and reads what arrived while nobody was reading."""
    _HOLDERS["b"] = start_holder("adopt", EVENTS_B)
    ready = json.loads(EVENTS_B.with_suffix(".ready").read_text())
    kill9 = json.loads((OUT / "kill9.json").read_text())["data"]
    return {"ready": ready, "events": ev_by(EVENTS_B, "net-pf-4", kill9["pid"])}


def _ctl(what: str) -> dict[str, Any]:
    res = run([sys.executable, "-m", "tests.vm.bpf_guest", "ctl", what], timeout=120)
    with contextlib.suppress(ValueError):
        res["json"] = json.loads(res["stdout"])
    return res


def s_permissive(_guest: Guest) -> dict[str, Any]:
    """Mode permissive: the same deny verdicts are logged as would-deny, nothing refused."""
    switched = _ctl("permissive")
    before = len(helper_runs())
    pid = as_user(1000, AF_IPX)
    wait_child(pid)
    if load_data().name == "DENY":
        insmod = run(["insmod", str(DENIED_KO)])
    else:  # kmod 30's insmod would decompress: no file for the layer to see
        insmod = {"rc": _finit_compressed(DENIED_KO), "how": "finit_module, compressed"}
    return {
        "ctl": switched,
        "helper_runs": len(helper_runs()) - before,
        "insmod": insmod,
        "events": ev_by(EVENTS_B, "net-pf-4", pid),
        "file_events": wait_events(EVENTS_B, lambda e: e["name"] == DENIED_KO.name),
        "modules": loaded_modules(),
        "enforce": _ctl("enforce"),
    }


def _time_socket(family: int) -> int:
    started = time.perf_counter_ns()
    with contextlib.suppress(OSError):
        socket.socket(family, socket.SOCK_DGRAM).close()
    return time.perf_counter_ns() - started


def s_latency(_guest: Guest) -> dict[str, Any]:
    """Same boot, interleaved: net-pf-12 denied in-kernel vs net-pf-4 passed to a helper
    that denies at once (/bin/false: the cheapest possible helper, a lower bound)."""
    Path("/proc/sys/kernel/modprobe").write_text("/bin/false")
    kernel, helper = [], []
    try:
        for _ in range(LATENCY_ROUNDS):
            kernel.append(_time_socket(AF_DECNET))
            helper.append(_time_socket(AF_IPX))
    finally:
        Path("/proc/sys/kernel/modprobe").write_text(str(COUNTER))
    return {"kernel_ns": kernel, "helper_ns": helper}


def s_uninstall(_guest: Guest) -> dict[str, Any]:
    """Unpinning ends enforcement once no process holds the links (the holder is gone)."""
    stats = _ctl("stats")
    holder = _HOLDERS.pop("b")
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    removed = _ctl("uninstall")
    time.sleep(1)  # the links' release is deferred (RCU)
    before = len(helper_runs())
    pid = as_user(1000, AF_IPX)
    wait_child(pid)
    left = Path("/sys/fs/bpf/kmodd").exists()
    return {
        "stats": stats,
        "removed": removed,
        "left": left,
        "helper_runs": len(helper_runs()) - before,
    }


def s_inactive(_guest: Guest) -> dict[str, Any]:
    """Booted without bpf in lsm=: the layer loads and attaches, and never runs."""
    before = len(helper_runs())
    pid = as_user(65534, AF_APPLETALK)
    wait_child(pid)
    time.sleep(1)
    return {
        "helper": helper_runs()[before:],
        "events": events_of(EVENTS_A),
        "stats": _ctl("stats"),
        "modules": loaded_modules(),
    }


PLANS: dict[str, list[tuple[str, Callable[[Guest], Any]]]] = {
    "enforce": [
        ("detect", s_detect),
        ("setup", s_setup),
        ("nobody", s_nobody),
        ("forged", s_forged),
        ("newline_comm", s_newline_comm),
        ("userns", s_userns),
        ("root", s_root),
        ("concurrent", s_concurrent),
        ("files", s_files),
        ("kill9", s_kill9),
        ("adopt", s_adopt),
        ("permissive", s_permissive),
        ("latency", s_latency),
        ("uninstall", s_uninstall),
    ],
    "no_bpf_lsm": [("detect", s_detect), ("setup", s_setup), ("inactive", s_inactive)],
}


def main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[1] == "hold":
        return hold(argv[2], Path(argv[3]))
    if len(argv) == 3 and argv[1] == "ctl":
        return ctl(argv[2])
    if len(argv) == 2 and argv[1] in PLANS:
        return run_plan(PLANS[argv[1]], Guest())
    print(
        f"usage: {argv[0]} {{{','.join(PLANS)}}} | hold install|adopt EVENTS | ctl WHAT",
        file=sys.stderr,
    )
    return 2


# --- the daemon with its kernel layer (plan "daemon") ---------------------------------------

MODHARDEN = Path(__file__).resolve().parents[2] / "policies/20-modharden.yaml.example"


def _kmodd_records(since_us: int, request: str) -> list[dict[str, Any]]:
    from tests.vm.guest import journal  # noqa: PLC0415

    return [
        r for r in journal(since_us, "kmodd", "kmodd-modprobe") if request in str(r.get("MESSAGE"))
    ]


def _full_records(since_us: int, request: str) -> list[dict[str, Any]]:
    """Decision records of REQUEST with the requester fields (journal.slim drops them)."""
    res = run(
        [
            "journalctl",
            "-o",
            "json",
            "--no-pager",
            f"--since=@{since_us // 1_000_000}",
            "-t",
            "kmodd",
            f"KMODD_REQUEST={request}",
        ]
    )
    out = []
    for line in res["stdout"].splitlines():
        with contextlib.suppress(ValueError):
            rec = json.loads(line)
            # --since takes whole seconds: without this, a record of the step before,
            # received in the same second, is counted here too (CI: the nobody step's deny
            # in the root step's records, 1.1 s apart).
            if int(rec.get("__REALTIME_TIMESTAMP", 0)) < since_us:
                continue
            out.append(
                {k: v for k, v in rec.items() if k.startswith(("KMODD_", "OBJECT_PID", "MESSAGE"))}
            )
    return out


def _wait_records(since_us: int, request: str, count: int = 1) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []

    def enough() -> bool:
        nonlocal found
        found = _full_records(since_us, request)
        return len(found) >= count

    with contextlib.suppress(TimeoutError):
        wait_until(enough, 90, f"{request} records")
    return found


def d_setup(guest: Guest) -> dict[str, Any]:
    from tests.vm.guest import SITE_DIR, now_us  # noqa: PLC0415

    guest.daemon_args = []  # the kernel layer on, as on Debian by default
    mount_bpffs()
    guest.start_journald()
    installed = guest.install()
    SITE_DIR.mkdir(parents=True, exist_ok=True)
    (SITE_DIR / "10-baseline.yaml").symlink_to("/dev/null")  # only the MODHARDEN rules
    guest.write_policy("20-modharden.yaml", MODHARDEN.read_text())
    started = guest.start_daemon()
    return {"install": installed, **started, "status": guest.status(), "since_us": now_us()}


def d_nobody(_guest: Guest) -> dict[str, Any]:
    from tests.vm.guest import now_us  # noqa: PLC0415

    since = now_us()
    outcome = trigger(NOBODY, f"socket:{AF_APPLETALK}:2")
    return {
        "trigger": outcome,
        "records": _wait_records(since, "net-pf-5"),
        "helper_lines": _kmodd_records(since, "net-pf-5"),
        "modules": loaded_modules(),
    }


def d_root(_guest: Guest) -> dict[str, Any]:
    from tests.vm.guest import now_us  # noqa: PLC0415

    since = now_us()
    outcome = trigger((), f"socket:{AF_APPLETALK}:2")
    return {
        "trigger": outcome,
        "records": _wait_records(since, "net-pf-5"),
        "modules": loaded_modules(),
    }


PLANS["daemon"] = [("setup", d_setup), ("nobody", d_nobody), ("root", d_root)]


if __name__ == "__main__":
    sys.exit(main(sys.argv))
