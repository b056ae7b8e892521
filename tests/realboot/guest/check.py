"""The real-boot image's check unit (kmodd-realboot-check.service), run by the image's own
/usr/bin/python3 as root once systemd has finished booting.

It reads its plan from the kernel command line (`kmodd_realboot.plan=NAME`), runs that
plan's steps against the real system, collects facts (what systemd, the kernel, the
journal and kmodctl say; no verdicts: the pytest side asserts), writes them as JSON to the
second disk after every step, then powers the machine off.  Stdlib only: it runs on any
Debian's python3 with nothing installed.

Results disk format: b"KMODDRB1 <length>\\n" then <length> bytes of JSON, at offset 0.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS_DEV = "/dev/vdb"
RESULTS_MAX = 15 << 20  # the disk is 16 MiB


def _route() -> str:
    """How the image installed kmodd (tests/realboot/image.py writes it): venv or deb."""
    try:
        return str(json.loads(Path("/etc/kmodd-realboot.json").read_text())["route"])
    except (OSError, ValueError, KeyError):
        return "venv"


ROUTE = _route()
KMODCTL = "/usr/bin/kmodctl" if ROUTE == "deb" else "/opt/kmodd/bin/kmodctl"
NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
POLICY_DIR = Path("/etc/kmodd/policy.d")
ENFORCEMENT = Path("/run/modprobe.d/00-kmodd.conf")
UNITS = ("kmodd.service", "kmodd-boot-publish.service", "kmodd-boot-wait.service")
UNIT_PROPS = (
    "ActiveState",
    "SubState",
    "Result",
    "MainPID",
    "NRestarts",
    "ExecMainStatus",
    "InactiveExitTimestampMonotonic",
    "ActiveEnterTimestampMonotonic",
    "ConditionResult",
)
# socket(AF_ALG) + bind("aead"): the Copy Fail path; prints the errno or "bound".
AEAD = (
    "import socket\n"
    "s = socket.socket(38, 5, 0)\n"
    "try:\n"
    "    s.bind(('aead', 'gcm(aes)'))\n"
    "    print('bound')\n"
    "except OSError as e:\n"
    "    print('errno', e.errno)\n"
)
APPLETALK = "import socket; socket.socket(5, socket.SOCK_DGRAM); print('opened')"
RELOAD_POLICY = (
    "kmodd: 1\nrules:\n  - id: realboot-reload-nlmon\n    action: deny\n"
    "    match: {module: [nlmon]}\n    reason: real-boot reload scenario\n"
)
BROKEN_POLICY = "kmodd: 1\nrules:\n  - id: realboot-broken-edit\n    action: maybe\n"
Facts = dict[str, Any]
UDEVD_AFTER = [
    *("systemctl", "list-dependencies", "--after", "--all", "--plain", "--no-pager"),
    "systemd-udevd.service",
]


class StepTimeout(Exception):
    pass


def sh(argv: list[str], timeout: float = 120, cap: int | None = 20000) -> Facts:
    """ARGV's result; its output cut to the last CAP characters (the results go back over
    the console), or whole for a caller that filters it itself (cap None)."""
    start = time.monotonic()
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"rc": None, "out": "", "err": f"timed out after {timeout} s", "s": timeout}
    return {
        "rc": p.returncode,
        "out": p.stdout if cap is None else p.stdout[-cap:],
        "err": p.stderr[-4000:],
        "s": round(time.monotonic() - start, 3),
    }


def modules() -> list[str]:
    return [line.split()[0] for line in Path("/proc/modules").read_text().splitlines()]


def modprobe_path() -> str:
    return Path("/proc/sys/kernel/modprobe").read_text().strip()


def cursor() -> str:
    out = sh(["journalctl", "-b", "-n", "1", "-o", "json", "--no-pager"])["out"]
    lines = out.strip().splitlines()
    return str(json.loads(lines[-1])["__CURSOR"]) if lines else ""


def journal(*matches: str, after: str = "", limit: int = 300) -> list[Facts]:
    """This boot's records (matches as journalctl takes them), the fields that matter."""
    time.sleep(0.5)  # the helper's datagram and the daemon's records are asynchronous
    argv = ["journalctl", "-b", "-o", "json", "--no-pager", *matches]
    if after:
        argv.append(f"--after-cursor={after}")
    keep: list[Facts] = []
    # Whole, then the newest LIMIT: cut at 20000 characters (a dozen JSON records), the
    # oldest records after the cursor were lost, the very ones a step asks for.
    for line in sh(argv, cap=None)["out"].splitlines()[-limit:]:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        keep.append(
            {
                k: (v[:600] if isinstance(v, str) else v)
                for k, v in rec.items()
                if k.startswith("KMODD_")
                or k
                in ("MESSAGE", "MESSAGE_ID", "SYSLOG_IDENTIFIER", "_PID", "UNIT", "_SYSTEMD_UNIT")
            }
        )
    return keep


def kmodd_records(after: str = "") -> list[Facts]:
    """Everything the daemon and the helper logged (the helper's syslog identifier too)."""
    recs = journal(after=after)
    return [r for r in recs if "kmodd" in str(r.get("SYSLOG_IDENTIFIER", ""))]


def kmodd_records_naming(after: str, request: str, deadline_s: float = 60) -> list[Facts]:
    """kmodd_records(after) once one of them names REQUEST, or at the deadline: the
    daemon journals on its own thread, behind a boot's coldplug records under TCG."""
    start = time.monotonic()
    while True:
        recs = kmodd_records(after)
        if any(request in str(r.get("KMODD_REQUEST", r.get("MESSAGE"))) for r in recs):
            return recs
        if time.monotonic() - start > deadline_s:
            return recs
        time.sleep(2)


def show(unit: str, props: tuple[str, ...] = UNIT_PROPS) -> dict[str, str]:
    # No unit: the manager's own properties (userspace and finish timestamps).
    argv = ["systemctl", "show", *([unit] if unit else []), *(f"--property={p}" for p in props)]
    out = sh(argv)["out"]
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def status() -> Facts:
    res = sh([KMODCTL, "status", "--json"], timeout=120)
    try:
        doc = json.loads(res["out"])
    except ValueError:
        return {"rc": res["rc"], "err": res["err"], "out": res["out"][-2000:]}
    small = {k: v for k, v in doc.items() if len(json.dumps(v)) < 3000}
    return {"rc": res["rc"], "doc": small}


def nobody_aead() -> Facts:
    res = sh([*NOBODY, "python3", "-c", AEAD + "import os; print('uid', os.getuid())"])
    return {**res, "loaded": "algif_aead" in modules()}


def wait_active(unit: str, old_pid: str, deadline_s: float) -> Facts:
    """Wait until UNIT is active with a main pid other than OLD_PID."""
    start = time.monotonic()
    while time.monotonic() - start < deadline_s:
        props = show(unit)
        if props.get("ActiveState") == "active" and props.get("MainPID") not in ("0", old_pid):
            return {**props, "waited_s": round(time.monotonic() - start, 2)}
        time.sleep(1)
    return {**show(unit), "waited_s": None}


# -- steps --------------------------------------------------------------------------------


def step_boot() -> Facts:
    """Wait for the boot to finish (the check unit is Type=simple), then what it took."""
    start = time.monotonic()
    while sh(["systemd-analyze", "time"])["rc"] != 0 and time.monotonic() - start < 420:
        time.sleep(2)
    mgr = ("UserspaceTimestampMonotonic", "FinishTimestampMonotonic", "KernelTimestamp")
    return {
        "waited_s": round(time.monotonic() - start, 2),
        "analyze_time": sh(["systemd-analyze", "time"])["out"],
        "critical_chain": sh(["systemd-analyze", "critical-chain", "--no-pager"])["out"],
        "kmodd_chain": sh(["systemd-analyze", "critical-chain", "kmodd.service", "--no-pager"])[
            "out"
        ],
        "blame": sh(["systemd-analyze", "blame", "--no-pager"])["out"][:4000],
        "manager": show("", mgr),
        "units": {u: show(u) for u in (*UNITS, "systemd-udev-trigger.service")},
        "published": _read("/run/kmodd/published"),
        "cmdline": _read("/proc/cmdline"),
        "failed": sh(["systemctl", "--failed", "--no-legend", "--plain"])["out"],
        # What the booted systemd orders udevd after, kmodd's units included (their
        # implicit mount dependencies too): local-fs.target must not be among them.
        "udevd_after": sh(UDEVD_AFTER)["out"],
        "kmodd_after": {u: show(u, ("After", "RequiresMountsFor")) for u in UNITS},
        "unit_journal": {u: journal(f"_SYSTEMD_UNIT={u}") + journal(f"UNIT={u}") for u in UNITS},
    }


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()[:4000]
    except OSError as err:
        return f"<{err.__class__.__name__}: {err}>" if Path(path).exists() else None


def step_sanity() -> Facts:
    conf = _read(str(ENFORCEMENT)) or ""
    return {
        "active": sh(["systemctl", "is-active", "kmodd.service"])["out"].strip(),
        "enabled": sh(["systemctl", "is-enabled", "kmodd.service"])["out"].strip(),
        "modprobe_path": modprobe_path(),
        "status": status(),
        "enforcement_lines": [ln for ln in conf.splitlines() if ln and not ln.startswith("#")],
    }


def step_coldplug() -> Facts:
    recs = journal("KMODD_SOURCE=udev", limit=2000)
    return {
        "modules": modules(),
        "udev_records": [
            {
                k: r.get(k)
                for k in (
                    "KMODD_DEVPATH",
                    "KMODD_VERDICT",
                    "KMODD_REQUEST",
                    "KMODD_UDEV_ACTION",
                    "KMODD_RULE",
                    "KMODD_MODULES",
                )
            }
            for r in recs
        ],
        "kmsg_kmodd": [r.get("MESSAGE") for r in journal("-k") if "kmodd" in str(r.get("MESSAGE"))],
        "serio_drivers": {
            p.name: (p / "driver").resolve().name if (p / "driver").exists() else None
            for p in sorted(Path("/sys/bus/serio/devices").glob("*"))
        },
    }


def step_aead_nobody() -> Facts:
    c = cursor()
    return {**nobody_aead(), "records": kmodd_records(c)}


def step_dummy_root() -> Facts:
    c = cursor()
    res = sh(["ip", "link", "add", "kmoddrb0", "type", "dummy"])
    return {**res, "loaded": "dummy" in modules(), "records": kmodd_records(c)}


def step_modprobe_af_key() -> Facts:
    c = cursor()
    res = sh(["modprobe", "af_key"])
    return {**res, "loaded": "af_key" in modules(), "records": kmodd_records(c)}


def step_security() -> Facts:
    return {
        u: sh(["systemd-analyze", "security", u, "--no-pager"])["out"].strip().splitlines()[-1:]
        for u in UNITS
    }


def _generation() -> Any:
    return status().get("doc", {}).get("generation")


def step_reload() -> Facts:
    before = {"generation": _generation(), "pid": show("kmodd.service")["MainPID"]}
    (POLICY_DIR / "06-realboot-reload.yaml").write_text(RELOAD_POLICY)
    reload = sh(["systemctl", "reload", "kmodd.service"], timeout=300)
    after = {"generation": _generation(), "pid": show("kmodd.service")["MainPID"]}
    c = cursor()
    nlmon = sh(["ip", "link", "add", "kmoddrb1", "type", "nlmon"])
    nlmon_facts = {**nlmon, "loaded": "nlmon" in modules(), "records": kmodd_records(c)}
    c = cursor()
    (POLICY_DIR / "07-realboot-broken.yaml").write_text(BROKEN_POLICY)
    broken = sh(["systemctl", "reload", "kmodd.service"], timeout=300)
    after_broken = {
        "generation": _generation(),
        "pid": show("kmodd.service")["MainPID"],
        "active": show("kmodd.service")["ActiveState"],
        "records": kmodd_records(c),
    }
    (POLICY_DIR / "07-realboot-broken.yaml").unlink()
    fixed = sh(["systemctl", "reload", "kmodd.service"], timeout=300)
    return {
        "before": before,
        "reload": reload,
        "after": after,
        "nlmon": nlmon_facts,
        "broken_reload": broken,
        "after_broken": after_broken,
        "fixed_reload": fixed,
        "after_fixed": {"generation": _generation()},
    }


def step_snapshot_stopped() -> Facts:
    stop = sh(["systemctl", "stop", "kmodd.service"], timeout=120)
    state = show("kmodd.service")["ActiveState"]
    c = cursor()
    aead = nobody_aead()
    veth = sh(["ip", "link", "add", "kmoddrb2", "type", "veth", "peer", "name", "kmoddrb3"])
    facts = {
        "stop": stop,
        "state": state,
        "modprobe_path": modprobe_path(),
        "aead": aead,
        "veth": {**veth, "loaded": "veth" in modules()},
        "records": kmodd_records(c),
    }
    facts["start"] = sh(["systemctl", "start", "kmodd.service"], timeout=600)
    return facts


def step_restart() -> Facts:
    pid0 = show("kmodd.service")["MainPID"]
    res = sh(["systemctl", "restart", "kmodd.service"], timeout=600)
    return {
        "pid_before": pid0,
        "restart": res,
        "after": show("kmodd.service"),
        "modprobe_path": modprobe_path(),
        "generation": _generation(),
    }


def step_kill9() -> Facts:
    props = show("kmodd.service")
    pid0 = props["MainPID"]
    c = cursor()
    os.kill(int(pid0), signal.SIGKILL)
    aead = nobody_aead()  # at once: the snapshot (or the restarted daemon) decides
    back = wait_active("kmodd.service", pid0, 600)
    return {
        "pid_before": pid0,
        "restarts_before": props["NRestarts"],
        "aead": aead,
        "after": back,
        "records": kmodd_records(c),
    }


def step_slow_start() -> Facts:
    """TimeoutStartSec=5s, shorter than a start under TCG: the daemon must ask for more
    (EXTEND_TIMEOUT_USEC) rather than be killed and restarted in a loop."""
    dropin = Path("/run/systemd/system/kmodd.service.d/50-realboot-timeout.conf")
    dropin.parent.mkdir(parents=True, exist_ok=True)
    dropin.write_text("[Service]\nTimeoutStartSec=5s\n")
    sh(["systemctl", "daemon-reload"])
    before = show("kmodd.service")
    c = cursor()
    res = sh(["systemctl", "restart", "kmodd.service"], timeout=600)
    time.sleep(5)  # a restart loop would show here
    after = show("kmodd.service")
    msgs = journal("UNIT=kmodd.service", after=c) + journal("_SYSTEMD_UNIT=kmodd.service", after=c)
    dropin.unlink()
    sh(["systemctl", "daemon-reload"])
    recover = None
    if sh(["systemctl", "is-active", "kmodd.service"])["out"].strip() != "active":
        recover = sh(["systemctl", "restart", "kmodd.service"], timeout=600)
    return {"before": before, "restart": res, "after": after, "journal": msgs, "recover": recover}


def step_sockets() -> Facts:
    socks = ["kmodd-decide.socket", "kmodd-control.socket"]
    # The steps before started kmodd 4 times in ~3 minutes on a quiet host (boot,
    # snapshot, restart, kill -9's Restart=); this step's start is the 5th and the
    # activation below would be the 6th within 10 minutes, which StartLimitBurst=5
    # refuses (the sockets then fail too) until reset-failed, as docs/operations.md says.
    limit = show("kmodd.service", ("NRestarts", "StartLimitBurst", "StartLimitIntervalUSec"))
    sh(["systemctl", "reset-failed", "kmodd.service"])
    # docs/operations.md's order: the sockets cannot start while kmodd.service runs with
    # sockets of its own ("Socket service kmodd.service already active, refusing").
    sh(["systemctl", "stop", "kmodd.service"], timeout=120)
    enable = sh(["systemctl", "enable", "--now", *socks])
    start = sh(["systemctl", "start", "kmodd.service"], timeout=600)
    with_sockets = {"status": status(), "sockets": {s: show(s, ("ActiveState",)) for s in socks}}
    stop = sh(["systemctl", "stop", "kmodd.service"], timeout=120)
    stopped = show("kmodd.service")["ActiveState"]
    c = cursor()
    # The kernel layer refuses algif-aead in-kernel: no helper runs, so nothing connects
    # to decide.sock.  An allowed request (rtnl-link-ifb) execs the helper, whose
    # connection makes systemd start kmodd; the helper itself decides from the snapshot.
    aead = nobody_aead()
    ifb = sh(["ip", "link", "add", "kmoddrb4", "type", "ifb"])
    ifb_loaded = "ifb" in modules()
    back = wait_active("kmodd.service", "0", 600)
    facts = {
        "start_limit": limit,
        "enable": enable,
        "start": start,
        "with_sockets": with_sockets,
        "stop": stop,
        "stopped_state": stopped,
        "aead": aead,
        "ifb": {**ifb, "loaded": ifb_loaded},
        "activated": back,
        "status_after": status(),
        "records": kmodd_records(c),
    }
    facts["disable"] = sh(["systemctl", "disable", "--now", *socks])
    facts["final_restart"] = sh(["systemctl", "restart", "kmodd.service"], timeout=600)
    return facts


def step_initramfs_update() -> Facts:
    # MODULES=dep (this machine's root device and file system only), not Debian's
    # default "most": the image is the same, kmodd's hook runs the same, and mkinitramfs
    # took 660 s under TCG with "most" (most of the first boot).  The second boot boots
    # from this initramfs.
    conf = Path("/etc/initramfs-tools/conf.d/50-kmodd-realboot.conf")
    conf.write_text("MODULES=dep\n")
    res = sh(["update-initramfs", "-u"], timeout=900)
    rel = os.uname().release
    # Whole and filtered here: thousands of lines, over sh()'s output cap.
    listing = sh(["lsinitramfs", f"/boot/initrd.img-{rel}"], timeout=300, cap=None)
    sh(["sync"])
    return {
        "update": res,
        "release": rel,
        "modules_conf": conf.read_text(),
        "listing_rc": listing["rc"],
        "listing_lines": len(listing["out"].splitlines()),
        "kmodd_files": [ln for ln in listing["out"].splitlines() if "kmodd" in ln],
    }


def step_broken() -> Facts:
    c = cursor()
    return {
        "kmodd": show("kmodd.service"),
        "published": _read("/run/kmodd/published"),
        "modprobe_path": modprobe_path(),
        "kmodd_journal": journal("_SYSTEMD_UNIT=kmodd.service")
        + journal("UNIT=kmodd.service")
        + journal("_SYSTEMD_UNIT=kmodd-boot-wait.service"),
        # Its errors by priority: coldplug's per-device records (hundreds) push the reload
        # failure out of the newest 300 of the unit's records.
        "kmodd_errors": journal("_SYSTEMD_UNIT=kmodd.service", "--priority=err"),
        "enforcement": _read(str(ENFORCEMENT)),
        "status_before": status(),  # the daemon answers before the request is made
        "aead": nobody_aead(),
        "records": kmodd_records_naming(c, "algif-aead"),
        "status_after": status(),
    }


def step_permissive() -> Facts:
    Path("/run/kmodd/policy.d/01-realboot-broken.yaml").unlink()
    restart = sh(["systemctl", "restart", "kmodd.service"], timeout=600)
    c = cursor()
    # AF_APPLETALK (baseline rule legacy-net-protocols): a request the broken step did not
    # already load (its aead bind loaded algif_aead: no snapshot, the helper ran modprobe).
    appletalk = sh([*NOBODY, "python3", "-c", APPLETALK])
    return {
        "restart": restart,
        "active": show("kmodd.service")["ActiveState"],
        "status": status(),
        "appletalk": {**appletalk, "loaded": "appletalk" in modules()},
        "records": kmodd_records(c),
        "enforcement": _read(str(ENFORCEMENT)),
    }


LEFT_BY_NOBODY = (  # what neither uninstall route may leave
    "/usr/share/initramfs-tools/hooks/kmodd",
    "/run/modprobe.d/00-kmodd.conf",
    "/run/kmodd/snapshot",
    "/run/kmodd/published",
    "/run/kmodd/kmod-mask",
    "/var/lib/kmodd/last-good",
    "/sys/fs/bpf/kmodd",
)
UNINSTALLED = {
    "venv": (
        "/usr/local/libexec/kmodd/kmodd-modprobe",
        "/usr/local/libexec/kmodd",
        "/usr/local/lib/systemd/system/kmodd.service",
        "/usr/local/lib/sysctl.d/50-kmodd.conf",
        *LEFT_BY_NOBODY,
    ),
    "deb": (
        "/usr/libexec/kmodd/kmodd-modprobe",
        "/usr/libexec/kmodd",
        "/usr/lib/systemd/system/kmodd.service",
        "/usr/bin/kmodctl",
        "/var/lib/kmodd",
        *LEFT_BY_NOBODY,
    ),
}
# venv: `kmodctl uninstall` (README.md); deb: `apt purge kmodd` (dpkg owns the files).
UNINSTALL = {"venv": [KMODCTL, "uninstall"], "deb": ["apt-get", "purge", "-y", "-q", "kmodd"]}


def step_uninstall() -> Facts:
    res = sh(UNINSTALL[ROUTE], timeout=300)
    c = cursor()
    af_key = sh(["modprobe", "af_key"])
    return {
        "uninstall": res,
        "modprobe_path": modprobe_path(),
        "active": sh(["systemctl", "is-active", "kmodd.service"])["out"].strip(),
        "route": ROUTE,
        "left": [p for p in UNINSTALLED[ROUTE] if os.path.lexists(p)],
        "af_key": {**af_key, "loaded": "af_key" in modules()},
        "records": kmodd_records(c),
    }


PLANS: dict[str, list[tuple[str, Callable[[], Facts]]]] = {
    "first": [
        ("boot", step_boot),
        ("sanity", step_sanity),
        ("coldplug", step_coldplug),
        ("aead_nobody", step_aead_nobody),
        ("dummy_root", step_dummy_root),
        ("modprobe_af_key", step_modprobe_af_key),
        ("security", step_security),
        ("reload", step_reload),
        ("snapshot_stopped", step_snapshot_stopped),
        ("restart", step_restart),
        ("kill9", step_kill9),
        ("sockets", step_sockets),
        ("slow_start", step_slow_start),
        ("initramfs_update", step_initramfs_update),
    ],
    "second": [
        ("boot", step_boot),
        ("sanity", step_sanity),
        ("coldplug", step_coldplug),
        ("uninstall", step_uninstall),
    ],
    "measure": [("boot", step_boot)],  # analyze.bench_boot_share
    "broken": [
        ("boot", step_boot),
        ("broken", step_broken),
        ("permissive", step_permissive),
    ],
}


def write_results(doc: Facts) -> None:
    data = json.dumps(doc, default=str).encode()
    if len(data) > RESULTS_MAX:
        data = json.dumps({"error": f"results too large: {len(data)} bytes"}).encode()
    fd = os.open(RESULTS_DEV, os.O_WRONLY)
    try:
        os.write(fd, b"KMODDRB1 %d\n" % len(data) + data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _alarm(signum: int, frame: object) -> None:
    raise StepTimeout("step deadline")


def run(plan: str) -> None:
    doc: Facts = {"plan": plan, "steps": {}, "done": False}
    signal.signal(signal.SIGALRM, _alarm)
    for name, step in PLANS.get(plan, []):
        start = time.monotonic()
        entry: Facts = {}
        signal.alarm(1500)
        try:
            entry["facts"] = step()
        except Exception as err:  # a failed step is a fact for pytest, not the end
            entry["error"] = f"{err.__class__.__name__}: {err}"
        finally:
            signal.alarm(0)
        entry["seconds"] = round(time.monotonic() - start, 2)
        doc["steps"][name] = entry
        print(f"kmodd-realboot: step {name} {entry['seconds']} s", flush=True)
        write_results(doc)
    doc["done"] = True
    write_results(doc)


def main() -> None:
    words = Path("/proc/cmdline").read_text().split()
    plan = next((w.split("=", 1)[1] for w in words if w.startswith("kmodd_realboot.plan=")), "")
    try:
        run(plan)
    finally:
        subprocess.run(["systemctl", "poweroff", "--no-block"], check=False, timeout=60)


if __name__ == "__main__":
    main()
