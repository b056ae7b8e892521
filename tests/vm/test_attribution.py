"""Who asked, on the real Debian 6.1 kernel, with the shipped MODHARDEN rules
(policies/20-modharden.yaml.example, the baseline masked).  Two boots.

With the kernel layer (the BPF LSM program, Debian's default lsm list has bpf):
- uid 65534 opens socket(AF_APPLETALK): refused in-kernel by `modharden`, journaled
  from the ring buffer with the exact requester (uid, comm, tgid and tid, loginuid,
  session, cgroup id, user namespace), KMODD_DECIDED_BY=kernel; appletalk not loaded;
- root does the same: allowed in-kernel, the helper's request is answered `allow
  kernel` (no re-decision without the requester) and appletalk loads; one record;
- uid 65534 as root of a new user namespace asks for net-pf-35: attributed to uid 65534
  and its namespace (KMODD_REQUESTER_USERNS, CONTAINER=yes), refused;
- `kmodctl status` has no trace-attribution section (there is none any more).

Without it (`kmodd --no-kernel-layer`, as on Ubuntu without `lsm=…,bpf` or under
lockdown): nobody knows who asked, so `unknown_requester: deny` (the default) decides
the requester rule: uid 65534's request is denied and journaled `KMODD_REQUESTER=unknown:
no kernel layer`, KMODD_DECIDED_BY=daemon -- and so is root's (fail closed).

The host side asserts on what the guest recorded (tests/vm/guest.py writes one JSON per
step).
"""

from __future__ import annotations

import contextlib
import json
import shlex
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import root_required

REPO = Path(__file__).resolve().parents[2]
MODHARDEN = REPO / "policies/20-modharden.yaml.example"
TRIGGER = REPO / "tests/vm/trigger.py"
NOBODY = ("setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups")
# phonet, not x25: Debian's 6.1 tree has no net-pf-9 alias, so the kernel's table has no
# entry for it and the daemon decided it with the requester unknown (seen on 6.1).
AF_APPLETALK, AF_PHONET = 5, 35
MSG_DECISIONS = (
    "8bd2e8ad851f41c691d60a6769ff481b",
    "3fd47b15f71a497a96fce61bb48c2e03",
    "9a9705a46d7f4c43be225164cbef514e",
)

Record = dict[str, Any]

# --- guest side ---------------------------------------------------------------------------


def _records(since_us: int) -> list[Record]:
    """kmodd decision records since SINCE_US, with the requester and OBJECT_* fields."""
    from tests.vm.guest import run  # noqa: PLC0415 -- guest-only module

    argv = ["journalctl", "-o", "json", "--no-pager", f"--since=@{since_us // 1_000_000}"]
    res = run([*argv, "-t", "kmodd", *[f"MESSAGE_ID={m}" for m in MSG_DECISIONS]])
    out = []
    for line in res["stdout"].splitlines():
        with contextlib.suppress(ValueError):
            rec = json.loads(line)
            if int(rec.get("__REALTIME_TIMESTAMP", 0)) >= since_us:
                keep = ("MESSAGE", "_UID", "__REALTIME_TIMESTAMP")
                out.append(
                    {
                        k: v
                        for k, v in rec.items()
                        if k in keep or k.startswith(("KMODD_", "OBJECT_"))
                    }
                )
    return out


def _wait(since_us: int, request: str, count: int = 1) -> list[Record]:
    from tests.vm.guest import wait_until  # noqa: PLC0415

    found: list[Record] = []

    def enough() -> bool:
        nonlocal found
        found = [r for r in _records(since_us) if r.get("KMODD_REQUEST") == request]
        return len(found) >= count

    with contextlib.suppress(TimeoutError):
        wait_until(enough, 60, f"{request} record")
    return found


def _trigger(prefix: tuple[str, ...], family: int, kind: int) -> dict[str, Any]:
    from tests.vm.guest import run  # noqa: PLC0415

    res = run([*prefix, "/usr/bin/python3", "-IS", str(TRIGGER), f"socket:{family}:{kind}"])
    with contextlib.suppress(ValueError):
        res["json"] = json.loads(res["stdout"])
    return res


def g_setup(guest: Any, kernel_layer: bool) -> dict[str, Any]:
    from tests.vm.bpf_guest import mount_bpffs  # noqa: PLC0415
    from tests.vm.guest import SITE_DIR, loaded_modules  # noqa: PLC0415

    guest.daemon_args = [] if kernel_layer else ["--no-kernel-layer"]
    if kernel_layer:
        mount_bpffs()
    guest.start_journald()
    installed = guest.install()
    SITE_DIR.mkdir(parents=True, exist_ok=True)
    (SITE_DIR / "10-baseline.yaml").symlink_to("/dev/null")  # only the MODHARDEN rules
    guest.write_policy("20-modharden.yaml", MODHARDEN.read_text())
    at_boot = loaded_modules()
    started = guest.start_daemon()
    status = guest.status()
    return {"install": installed, **started, "at_boot": at_boot, "status": status}


def g_nobody(guest: Any) -> dict[str, Any]:
    from tests.vm.guest import loaded_modules, now_us  # noqa: PLC0415

    since = now_us()
    outcome = _trigger(NOBODY, AF_APPLETALK, socket.SOCK_DGRAM)
    return {"trigger": outcome, "records": _wait(since, "net-pf-5"), "modules": loaded_modules()}


def g_root(guest: Any) -> dict[str, Any]:
    from tests.vm.guest import loaded_modules, now_us  # noqa: PLC0415

    since = now_us()
    outcome = _trigger((), AF_APPLETALK, socket.SOCK_DGRAM)
    return {"trigger": outcome, "records": _wait(since, "net-pf-5"), "modules": loaded_modules()}


def g_userns(guest: Any) -> dict[str, Any]:
    from tests.vm.guest import now_us  # noqa: PLC0415

    since = now_us()
    prefix = (*NOBODY, "unshare", "--user", "--map-root-user")
    outcome = _trigger(prefix, AF_PHONET, socket.SOCK_DGRAM)
    return {"trigger": outcome, "records": _wait(since, "net-pf-35")}


def guest_main(plan: str) -> int:
    from tests.vm.guest import Guest, run_plan  # noqa: PLC0415

    kernel_layer = plan == "kernel"
    steps = [
        ("setup", lambda g: g_setup(g, kernel_layer)),
        ("nobody", g_nobody),
        ("root", g_root),
    ]
    if kernel_layer:
        steps.append(("userns", g_userns))
    return run_plan(steps, Guest())


# --- host side ----------------------------------------------------------------------------

# The boot (2-3 min on a quiet machine, the daemon's start under TCG most of it) counts
# against the first test; the harness's 900 s hard timeout ends a hung guest first.
pytestmark = [pytest.mark.vm, root_required, pytest.mark.timeout(1200)]


def _boot(plan: str) -> Any:
    from tests.vm.harness import VENV_BIN, boot, install_prefix  # noqa: PLC0415

    python = shlex.quote(str(VENV_BIN / "python"))
    script = f"exec {python} -m tests.vm.test_attribution {plan}\n"
    return boot(script, timeout_s=1300, prepare=install_prefix)


@pytest.fixture(scope="module")
def vm(kernel_tree: Any) -> Any:
    return _boot("kernel")


@pytest.fixture(scope="module")
def vm_no_kernel(kernel_tree: Any) -> Any:
    return _boot("nokernel")


def step(vm: Any, name: str) -> dict[str, Any]:
    result = vm.result(name)
    if not result.get("ok"):
        pytest.fail(f"guest step {name}: {result.get('error')}\n{result.get('daemon_log')}")
    data: dict[str, Any] = result["data"]
    return data


def only(records: list[Record]) -> Record:
    assert len(records) == 1, records
    return records[0]


def _exact_requester(rec: Record, uid: str) -> None:
    assert rec["KMODD_DECIDED_BY"] == "kernel"
    assert (rec["KMODD_REQUESTER_UID"], rec["KMODD_REQUESTER_EUID"]) == (uid, uid)
    assert rec["KMODD_REQUESTER_COMM"] == "python3"
    assert rec["OBJECT_PID"].isdigit() and rec["KMODD_REQUESTER_TID"].isdigit()
    assert rec["KMODD_REQUESTER_CGROUP_ID"].isdigit()
    for audit in ("KMODD_REQUESTER_LOGINUID", "KMODD_REQUESTER_SESSIONID"):
        assert rec[audit] == "unset" or rec[audit].isdigit(), rec
    assert "KMODD_REQUESTER" not in rec  # known, not "unknown: …"


def test_the_kernel_layer_is_active_and_trace_attribution_is_gone(vm: Any) -> None:
    status = step(vm, "setup")["status"]
    assert status["rc"] == 0, status
    assert status["json"]["layers"]["kernel"]["active"] is True, status["json"]["layers"]
    assert "attribution" not in status["json"]


def test_nobodys_appletalk_is_refused_in_kernel_with_the_exact_requester(vm: Any) -> None:
    data = step(vm, "nobody")
    assert data["trigger"]["json"]["uid"] == 65534
    assert data["trigger"]["json"]["outcomes"][0]["ok"] is False
    rec = only(data["records"])
    assert rec["MESSAGE"].startswith("in-kernel: denied net-pf-5"), rec
    assert (rec["KMODD_VERDICT"], rec["KMODD_RULE"], rec["KMODD_LAYERS"]) == (
        "deny",
        "modharden",
        "kernel",
    )
    _exact_requester(rec, "65534")
    assert (rec["KMODD_REQUESTER_USERNS"], rec["KMODD_REQUESTER_CONTAINER"]) == (
        "4026531837",
        "no",
    )
    assert "appletalk" not in data["modules"]


def test_roots_appletalk_loads_and_the_kernels_verdict_stands(vm: Any) -> None:
    data = step(vm, "root")
    assert data["trigger"]["json"]["outcomes"][0]["ok"] is True, data["trigger"]
    rec = only(data["records"])  # the kernel's event; the helper's "allow kernel" adds none
    assert (rec["KMODD_VERDICT"], rec["KMODD_RULE"]) == ("allow", "default")
    _exact_requester(rec, "0")
    assert "appletalk" in data["modules"]


def test_a_user_namespace_request_is_attributed_through_the_ring_buffer(vm: Any) -> None:
    data = step(vm, "userns")
    assert data["trigger"]["json"]["uid"] == 0  # root in its own namespace ...
    rec = only(data["records"])
    _exact_requester(rec, "65534")  # ... uid 65534 to the kernel
    assert rec["KMODD_REQUESTER_USERNS"] != "4026531837"
    assert rec["KMODD_REQUESTER_CONTAINER"] == "yes"
    assert (rec["KMODD_VERDICT"], rec["KMODD_RULE"]) == ("deny", "modharden")


def test_without_the_kernel_layer_unknown_requester_denies(vm_no_kernel: Any) -> None:
    status = step(vm_no_kernel, "setup")["status"]
    assert status["json"]["layers"]["kernel"]["active"] is False
    data = step(vm_no_kernel, "nobody")
    assert data["trigger"]["json"]["outcomes"][0]["ok"] is False
    rec = only(data["records"])
    assert (rec["KMODD_VERDICT"], rec["KMODD_RULE"]) == ("deny", "modharden")
    assert rec["KMODD_REQUESTER"] == "unknown: no kernel layer"
    assert rec["KMODD_DECIDED_BY"] == "daemon"
    assert "unknown_requester: deny" in rec["KMODD_REASON"]
    assert "KMODD_REQUESTER_UID" not in rec
    assert "appletalk" not in data["modules"]


def test_without_the_kernel_layer_roots_request_fails_closed_too(vm_no_kernel: Any) -> None:
    data = step(vm_no_kernel, "root")
    rec = only(data["records"])
    assert (rec["KMODD_VERDICT"], rec["KMODD_RULE"]) == ("deny", "modharden")
    assert data["trigger"]["json"]["outcomes"][0]["ok"] is False
    assert "appletalk" not in data["modules"]


if __name__ == "__main__":
    sys.exit(guest_main(sys.argv[1] if len(sys.argv) > 1 else "kernel"))
