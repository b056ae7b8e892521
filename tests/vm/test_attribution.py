"""Issue 7 in the VM: who asked, on the real Debian kernel, with the MODHARDEN-style rules.

One boot.  In the guest (`python -m tests.vm.test_attribution`, steps below), with the
baseline masked and policies/20-modharden.yaml.example installed:

- uid 65534 opens socket(AF_APPLETALK): denied by `modharden`, the record names uid and
  comm; then root does the same and appletalk loads;
- uid 65534 inside a new user namespace (root there) asks for net-pf-9: attributed to
  uid 65534, marked as contained, denied;
- `kmodctl status` shows attribution available, with its counters and timings;
- `kmodctl generate` writes a policy that `validate` accepts and that allows every
  module loaded at boot; `kmodctl simulate` against a stricter candidate (appletalk
  denied for root too) reports exactly root's net-pf-5 request.

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
AF_APPLETALK, AF_X25 = 5, 9
WORK = Path("/run/kmodd-vm/attribution")
STRICTER = """\
kmodd: 1
rules:
  - id: no-appletalk-at-all
    action: deny
    match: {module: [appletalk]}
"""
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


def _kmodctl(*args: str) -> dict[str, Any]:
    from tests.vm.guest import VENV_BIN, run  # noqa: PLC0415

    return run([str(VENV_BIN / "kmodctl"), *args], timeout=240)


def g_setup(guest: Any) -> dict[str, Any]:
    from tests.vm.guest import SITE_DIR, loaded_modules, now_us  # noqa: PLC0415

    guest.start_journald()
    installed = guest.install()
    SITE_DIR.mkdir(parents=True, exist_ok=True)
    (SITE_DIR / "10-baseline.yaml").symlink_to("/dev/null")  # only the MODHARDEN rules
    guest.write_policy("20-modharden.yaml", MODHARDEN.read_text())
    at_boot = loaded_modules()
    started = guest.start_daemon()
    WORK.mkdir(parents=True, exist_ok=True)
    return {"install": installed, **started, "at_boot": at_boot, "since_us": now_us()}


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
    outcome = _trigger(prefix, AF_X25, socket.SOCK_SEQPACKET)
    return {"trigger": outcome, "records": _wait(since, "net-pf-9")}


def g_status(guest: Any) -> dict[str, Any]:
    return {"status": guest.status()}


def g_generate(guest: Any) -> dict[str, Any]:
    out = WORK / "generated.yaml"
    generated = _kmodctl("generate", "-o", str(out))
    validated = _kmodctl("validate", str(out))
    text = out.read_text() if out.exists() else None
    return {"generate": generated, "validate": validated, "text": text}


def g_simulate(guest: Any, since_us: int) -> dict[str, Any]:
    candidate = WORK / "candidate"
    candidate.mkdir(exist_ok=True)
    (candidate / "20-modharden.yaml").write_text(MODHARDEN.read_text())
    (candidate / "30-stricter.yaml").write_text(STRICTER)
    res = _kmodctl("simulate", "--json", f"--since=@{since_us // 1_000_000}", str(candidate))
    with contextlib.suppress(ValueError):
        res["json"] = json.loads(res["stdout"])
    return res


def guest_main() -> int:
    from tests.vm.guest import Guest, run_plan  # noqa: PLC0415

    guest = Guest()
    since: dict[str, int] = {}

    def setup(g: Any) -> dict[str, Any]:
        data = g_setup(g)
        since["us"] = data["since_us"]
        return data

    steps = [
        ("setup", setup),
        ("nobody", g_nobody),
        ("root", g_root),
        ("userns", g_userns),
        ("status", g_status),
        ("generate", g_generate),
        ("simulate", lambda g: g_simulate(g, since["us"])),
    ]
    return run_plan(steps, guest)


# --- host side ----------------------------------------------------------------------------

# The boot (2-3 min on a quiet machine, the daemon's start under TCG most of it) counts
# against the first test; the harness's 900 s hard timeout ends a hung guest first.
pytestmark = [pytest.mark.vm, root_required, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def vm(kernel_tree: Any) -> Any:
    from tests.vm.harness import VENV_BIN, boot, install_prefix  # noqa: PLC0415

    script = f"exec {shlex.quote(str(VENV_BIN / 'python'))} -m tests.vm.test_attribution\n"
    return boot(script, timeout_s=1300, prepare=install_prefix)


def step(vm: Any, name: str) -> dict[str, Any]:
    result = vm.result(name)
    if not result.get("ok"):
        pytest.fail(f"guest step {name}: {result.get('error')}\n{result.get('daemon_log')}")
    data: dict[str, Any] = result["data"]
    return data


def only(records: list[Record]) -> Record:
    assert len(records) == 1, records
    return records[0]


def test_unprivileged_autoload_is_denied_and_names_the_requester(vm: Any) -> None:
    data = step(vm, "nobody")
    assert data["trigger"]["json"]["uid"] == 65534
    assert data["trigger"]["json"]["outcomes"][0]["ok"] is False
    rec = only(data["records"])
    assert (rec["KMODD_VERDICT"], rec["KMODD_RULE"]) == ("deny", "modharden")
    assert rec["KMODD_REQUESTER_UID"] == "65534"
    assert rec["KMODD_REQUESTER_COMM"] == "python3"
    assert rec["KMODD_REQUESTER_CONTAINER"] == "no"
    assert rec["OBJECT_PID"].isdigit()
    assert "appletalk" not in data["modules"]


def test_root_autoload_loads_appletalk(vm: Any) -> None:
    data = step(vm, "root")
    assert data["trigger"]["json"]["outcomes"][0]["ok"] is True
    rec = only(data["records"])
    assert (rec["KMODD_VERDICT"], rec["KMODD_RULE"]) == ("allow", "default")
    assert (rec["KMODD_REQUESTER_UID"], rec["KMODD_REQUESTER_COMM"]) == ("0", "python3")
    assert "appletalk" in data["modules"]


def test_a_user_namespace_requester_is_attributed(vm: Any) -> None:
    data = step(vm, "userns")
    assert data["trigger"]["json"]["uid"] == 0  # root in its own namespace
    rec = only(data["records"])
    assert rec["KMODD_REQUESTER_UID"] == "65534"  # ... uid 65534 to the kernel
    assert rec["KMODD_REQUESTER_CONTAINER"] == "yes"
    assert (rec["KMODD_VERDICT"], rec["KMODD_RULE"]) == ("deny", "modharden")


def test_status_shows_attribution(vm: Any) -> None:
    status = step(vm, "status")["status"]
    assert status["rc"] == 0, status
    at = status["json"]["attribution"]
    print(f"\nattribution in the VM: {json.dumps(at)}", file=sys.stderr)
    assert at["available"] is True, at
    assert at["lockdown"] in (None, "none", "integrity")
    assert at["matched"] >= 3
    assert at["gone"] == 0


def test_generate_allows_everything_loaded_at_boot(vm: Any) -> None:
    from kmodd.policy.loader import parse_policy  # noqa: PLC0415

    at_boot = step(vm, "setup")["at_boot"]
    data = step(vm, "generate")
    assert data["generate"]["rc"] == 0, data["generate"]
    assert data["validate"]["rc"] == 0, data["validate"]
    model, _, issues = parse_policy(data["text"].encode(), "generated.yaml")
    assert model is not None, issues
    allowed = {
        m for rule in model.rules if rule.action.value == "allow" for m in rule.match.module or []
    }
    assert set(at_boot) <= allowed
    assert "appletalk" in allowed


def test_simulate_reports_exactly_what_a_stricter_policy_changes(vm: Any) -> None:
    data = step(vm, "simulate")
    assert data["rc"] == 1, data
    changes = data["json"]["changes"]
    assert [
        (c["request"], c["requester"]["uid"], c["before"]["outcome"], c["after"]["outcome"])
        for c in changes
    ] == [("net-pf-5", 0, "allow", "deny")]


if __name__ == "__main__":
    sys.exit(guest_main())
