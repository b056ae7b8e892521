"""The issue-4 scenarios as guest-side steps, grouped into plans (one plan = one boot).

Each step triggers something real (a socket family, an AF_ALG bind, a mount, modprobe,
a uevent, a signal, a policy edit), then records what the kernel did (/proc/modules, the
syscall's errno), what the journal says and what `kmodctl status` says.  Steps only
observe; tests/vm/test_scenarios.py asserts.  Each step uses request names no other step
uses, so the steps of one boot stay independent of each other's loads.

Plans: `main` (scenarios 1-6 and 8, daemon killed last), `permissive` (scenario 7, booted
with kmodd.mode=permissive), `demo` (make demo), `enforce` (issue 10: tests/vm/enforcement.py).
"""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.vm import trigger
from tests.vm.guest import (
    NOBODY,
    REPO,
    SITE_DIR,
    Guest,
    Record,
    Step,
    journal,
    loaded_modules,
    now_us,
    run,
    wait_records,
)

AF_ATMPVC = 8
AF_CAN = 29
AF_PHONET = 35
AF_KCM = 41
AF_QIPCRTR = 42
TRIGGER = str(REPO / "tests" / "vm" / "trigger.py")
MNT = "/run/kmodd-vm/mnt"

SITE_POLICY = """\
kmodd: 1
rules:
  - id: vm-site-appletalk
    action: allow
    match: {module: [appletalk]}
    reason: "this test site still speaks AppleTalk"
"""
RELOAD_POLICY = """\
kmodd: 1
rules:
  - id: vm-reload-phonet
    action: allow
    match: {module: [phonet]}
    reason: "allowed by a live edit"
"""
BROKEN_POLICY = "kmodd: 1\nrules:\n  - id: vm-broken\n    action: maybe\n"
MSG_RELOAD_FAILED = "75f0bddb413247d68fb3ada830a519fa"
# A reload re-resolves every request name for the snapshot: ~2.5 s of CPU natively, minutes
# under TCG on a busy 2-core host.
RELOAD_S = 360


def request_is(name: str) -> Callable[[Record], bool]:
    return lambda r: r.get("KMODD_REQUEST") == name


def observe(guest: Guest, since: int, names: list[str], *, status: bool = True) -> dict[str, Any]:
    """Modules now, the decision records for NAMES (waiting for each), kmodctl status."""
    for name in names:
        wait_records(since, request_is(name))
    out: dict[str, Any] = {"modules": loaded_modules(), "journal": journal(since)}
    if status:
        out["status"] = guest.status()
    return out


def as_nobody(*specs: str) -> dict[str, Any]:
    argv = ["setpriv", "--reuid", NOBODY, "--regid", NOBODY, "--clear-groups"]
    res = run([*argv, "/usr/bin/python3", "-IS", TRIGGER, *specs])
    try:
        res["ran"] = json.loads(res["stdout"])
    except ValueError:
        res["ran"] = None
    return res


def mount_fs(fstype: str) -> dict[str, Any]:
    Path(MNT).mkdir(parents=True, exist_ok=True)
    return run(["mount", "-t", fstype, "/dev/null", MNT])


# -- set-up ---------------------------------------------------------------------------------
def setup(guest: Guest, *, site: bool = True) -> dict[str, Any]:
    guest.start_journald()
    installed = guest.install()
    SITE_DIR.mkdir(parents=True, exist_ok=True)
    if site:
        guest.write_policy("05-vm-site.yaml", SITE_POLICY)
    started = guest.start_daemon()
    return {
        "install": installed,
        **started,
        "kernel_modprobe": Path("/proc/sys/kernel/modprobe").read_text().strip(),
        "enforcement": Path("/run/modprobe.d/00-kmodd.conf").read_text()[:20000]
        if Path("/run/modprobe.d/00-kmodd.conf").exists()
        else None,
        "notifications": guest.notifications,
    }


# -- scenario steps ---------------------------------------------------------------------------
def s1_allow(guest: Guest) -> dict[str, Any]:
    since = now_us()
    before = loaded_modules()
    outcome = trigger.open_socket(trigger.AF_APPLETALK, socket.SOCK_DGRAM)
    return {"before": before, "trigger": outcome, **observe(guest, since, ["net-pf-5"])}


def s2_deny(guest: Guest) -> dict[str, Any]:
    since = now_us()
    alg = trigger.bind_alg("aead", "gcm(aes)")
    mounted = mount_fs("hfsplus")
    obs = observe(guest, since, ["algif-aead", "fs-hfsplus"])
    return {"alg": alg, "mount": mounted, **obs}


def s3_layer2(guest: Guest) -> dict[str, Any]:
    since = now_us()
    probe = run(["modprobe", "algif_aead"])
    wait_records(since, lambda r: r.get("SYSLOG_IDENTIFIER") == "kmodd-modprobe")
    enforcement = Path("/run/modprobe.d/00-kmodd.conf")
    lines = [ln for ln in enforcement.read_text().splitlines() if "algif_aead" in ln]
    return {"modprobe": probe, "enforcement_lines": lines, **observe(guest, since, [])}


def s4_unprivileged(guest: Guest) -> dict[str, Any]:
    since = now_us()
    res = as_nobody(f"socket:{AF_KCM}:{socket.SOCK_DGRAM}", f"socket:{AF_QIPCRTR}:2")
    return {"nobody": res, **observe(guest, since, ["net-pf-41", "net-pf-42"])}


def s8_devices(guest: Guest) -> dict[str, Any]:
    devices = sorted(Path("/sys/bus/virtio/devices").iterdir())
    device = devices[0]
    modalias = (device / "modalias").read_text().strip()
    since = now_us()
    (device / "uevent").write_text("add\n")
    records = wait_records(since, request_is(modalias))
    return {"device": str(device.resolve()), "modalias": modalias, "journal": records}


def s6_reload(guest: Guest) -> dict[str, Any]:
    since = now_us()
    before = trigger.open_socket(AF_PHONET, socket.SOCK_DGRAM)
    wait_records(since, request_is("net-pf-35"))
    status_before = guest.status()
    guest.notifications.clear()
    guest.write_policy("05-vm-reload.yaml", RELOAD_POLICY)
    guest.wait_notify("RELOADING=1", 60)
    reloaded = guest.wait_notify("READY=1", RELOAD_S)
    after = trigger.open_socket(AF_PHONET, socket.SOCK_DGRAM)
    mid = observe(guest, since, [], status=True)
    mid["journal"] = wait_records(since, request_is("net-pf-35"), count=2)
    since_bad = now_us()
    guest.write_policy("06-vm-broken.yaml", BROKEN_POLICY)
    bad = wait_records(since_bad, lambda r: r.get("MESSAGE_ID") == MSG_RELOAD_FAILED)
    return {
        "before": before,
        "status_before": status_before,
        "reloaded": reloaded,
        "after": after,
        "after_reload": mid,
        "broken_journal": bad,
        "status_broken": guest.status(),
        "modules": loaded_modules(),
        "notifications": guest.notifications,
    }


def s5_daemon_killed(guest: Guest) -> dict[str, Any]:
    killed = guest.kill_daemon(signal.SIGKILL)
    since = now_us()
    timings = {}
    started = time.monotonic()
    denied = trigger.open_socket(AF_ATMPVC, socket.SOCK_DGRAM)
    timings["denied_s"] = round(time.monotonic() - started, 2)
    started = time.monotonic()
    allowed = trigger.open_socket(trigger.AF_KEY, socket.SOCK_RAW, trigger.PF_KEY_V2)
    timings["allowed_s"] = round(time.monotonic() - started, 2)
    helper = wait_records(since, lambda r: r.get("SYSLOG_IDENTIFIER") == "kmodd-modprobe", count=2)
    return {
        "killed_rc": killed,
        "denied": denied,
        "allowed": allowed,
        "timings": timings,
        "modules": loaded_modules(),
        "journal": helper,
        "status": guest.status(),
    }


def s7_permissive(guest: Guest) -> dict[str, Any]:
    since = now_us()
    outcome = trigger.open_socket(trigger.AF_APPLETALK, socket.SOCK_DGRAM)
    enforcement = Path("/run/modprobe.d/00-kmodd.conf")
    text = enforcement.read_text() if enforcement.exists() else None
    return {"trigger": outcome, "enforcement": text, **observe(guest, since, ["net-pf-5"])}


# -- demo -----------------------------------------------------------------------------------
# make demo: every ask says which layer decided.  Helper runs are the daemon's own count of
# the helper's decide queries (status decisions.sources.kernel): a request refused in-kernel
# never execs the helper, so that count does not move.
# Asked over the control socket from this process (what `kmodctl status --json` asks):
# each kmodctl would be another Python start, 5-10 s under TCG, twice per ask.
def helper_queries(_guest: Guest) -> int | None:
    from kmodd import helper, wire  # noqa: PLC0415 -- the guest imports kmodd only here
    from kmodd.cli import client  # noqa: PLC0415
    from kmodd.errors import KmoddError  # noqa: PLC0415

    try:
        doc = client.call(Path(helper.RUNTIME_DIR) / helper.CONTROL_SOCKET, wire.Method.STATUS)
    except (OSError, KmoddError):
        return None
    return int(doc["decisions"]["sources"].get("kernel", 0))


def _ask(guest: Guest, who: str, what: str, request: str | None, act: Callable[[], Any]) -> Any:
    before = helper_queries(guest)
    since, started = now_us(), time.monotonic()
    outcome = act()
    took = time.monotonic() - started
    if request is not None:  # the daemon's record, so its count is settled
        wait_records(since, request_is(request))
    after = helper_queries(guest)
    runs = None if before is None or after is None else after - before
    return {"who": who, "what": what, "request": request, "syscall": outcome,
            "helper_runs": runs, "took_s": round(took, 2)}  # fmt: skip


def _run_ok(argv: list[str]) -> dict[str, Any]:
    res = run(argv)
    return {"ok": res["rc"] == 0, "rc": res["rc"], "stderr": res["stderr"].strip()}


def demo_setup(guest: Guest) -> dict[str, Any]:
    """The daemon with its kernel layer on (as kmodd.service runs it): bpffs mounted as
    systemd's sys-fs-bpf.mount does, then the usual set-up."""
    guest.daemon_args = []
    if " /sys/fs/bpf bpf " not in Path("/proc/mounts").read_text():
        run(["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"])
    return setup(guest, site=False)


def demo_run(guest: Guest) -> dict[str, Any]:
    """What make demo shows: autoloads allowed and denied (in-kernel and by the helper),
    modprobe and insmod of a denied module, then the journal and kmodctl status."""
    since = now_us()
    started = time.monotonic()
    release = Path("/proc/sys/kernel/osrelease").read_text().strip()
    ko = f"/lib/modules/{release}/kernel/crypto/algif_aead.ko"

    def nobody_alg() -> Any:
        ran = as_nobody("alg:aead:gcm(aes)")["ran"] or {"outcomes": [{}]}
        return ran["outcomes"][0]

    asks = [
        _ask(guest, "root", "socket(AF_KEY, SOCK_RAW, PF_KEY_V2)", "net-pf-15",
             lambda: trigger.open_socket(trigger.AF_KEY, socket.SOCK_RAW, trigger.PF_KEY_V2)),
        _ask(guest, "nobody (uid 65534)", "socket(AF_ALG) + bind('aead')", "algif-aead",
             nobody_alg),
        _ask(guest, "root", "mount -t hfsplus", "fs-hfsplus",
             lambda: _run_ok(["mount", "-t", "hfsplus", "/dev/null", _mnt()])),
        _ask(guest, "root", "modprobe algif_aead", None,
             lambda: _run_ok(["modprobe", "algif_aead"])),
        _ask(guest, "root", f"insmod {ko}", None, lambda: _run_ok(["insmod", ko])),
    ]  # fmt: skip
    for name in ("net-pf-15", "algif-aead", "fs-hfsplus"):
        wait_records(since, request_is(name))
    wait_records(since, lambda r: "kernel layer refused loading" in str(r.get("MESSAGE")))
    steps_s = round(time.monotonic() - started, 1)
    status = run([str(REPO / ".venv/bin/kmodctl"), "status"])
    return {
        "asks": asks,
        "steps_s": steps_s,
        "modules": loaded_modules(),
        "journal": journal(since),
        "layers": (guest.status().get("json") or {}).get("layers"),
        "status_text": status["stdout"] + status["stderr"],
    }


def _mnt() -> str:
    Path(MNT).mkdir(parents=True, exist_ok=True)
    return MNT


def main_plan() -> tuple[Guest, list[tuple[str, Step]]]:
    return Guest(), [
        ("setup", setup),
        ("s1_allow", s1_allow),
        ("s2_deny", s2_deny),
        ("s3_layer2", s3_layer2),
        ("s4_unprivileged", s4_unprivileged),
        ("s8_devices", s8_devices),
        ("s6_reload", s6_reload),
        ("s5_daemon_killed", s5_daemon_killed),
    ]


def permissive_plan() -> tuple[Guest, list[tuple[str, Step]]]:
    return Guest(), [
        ("setup", lambda g: setup(g, site=False)),
        ("s7_permissive", s7_permissive),
    ]


def demo_plan() -> tuple[Guest, list[tuple[str, Step]]]:
    return Guest(), [("setup", demo_setup), ("demo", demo_run)]


def enforce_plan() -> tuple[Guest, list[tuple[str, Step]]]:
    from tests.vm import enforcement  # noqa: PLC0415 -- it imports this module

    return Guest(), list(enforcement.STEPS)


PLANS: dict[str, Callable[[], tuple[Guest, list[tuple[str, Step]]]]] = {
    "main": main_plan,
    "permissive": permissive_plan,
    "demo": demo_plan,
    "enforce": enforce_plan,
}
