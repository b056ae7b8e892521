"""Issue 4's scenarios against the real Debian kernel: what the kernel did (/proc/modules,
errno), what the journal says, what `kmodctl status` says.

One boot per plan (tests/vm/scenarios.py): `main` runs scenarios 1-6 and 8 in order, each
on request names no other step touches, the daemon being SIGKILLed last; `permissive` is
its own boot because the kernel command line is fixed at boot.
"""

from __future__ import annotations

import errno
from typing import Any

import pytest

from tests.conftest import root_required
from tests.kerneltree import KernelTree
from tests.vm.harness import VMResult, boot_plan

# The first test of each plan pays for its boot (fixture set-up counts toward
# pytest-timeout); the harness's own hard timeouts end a hung guest well before this.
pytestmark = [pytest.mark.vm, root_required, pytest.mark.timeout(1500)]

MSG_ALLOW = "8bd2e8ad851f41c691d60a6769ff481b"
MSG_DENY = "3fd47b15f71a497a96fce61bb48c2e03"
MSG_WOULD_DENY = "9a9705a46d7f4c43be225164cbef514e"
MSG_RELOAD_FAILED = "75f0bddb413247d68fb3ada830a519fa"
HELPER = "/usr/local/libexec/kmodd/kmodd-modprobe"

Record = dict[str, Any]


@pytest.fixture(scope="module")
def main_run(kernel_tree: KernelTree) -> VMResult:
    return boot_plan("main", timeout_s=1500)


@pytest.fixture(scope="module")
def permissive_run(kernel_tree: KernelTree) -> VMResult:
    return boot_plan("permissive", append="kmodd.mode=permissive", timeout_s=1300)


def step(run: VMResult, name: str) -> dict[str, Any]:
    """The step's data; fails with the guest's traceback and output when it did not end."""
    result = run.result(name)
    if not result.get("ok"):
        pytest.fail(
            f"guest step {name} failed:\n{result.get('error')}\n"
            f"daemon log:\n{result.get('daemon_log')}\n{run.tail()}"
        )
    data: dict[str, Any] = result["data"]
    return data


def decisions(records: list[Record], request: str) -> list[Record]:
    return [
        r
        for r in records
        if r.get("SYSLOG_IDENTIFIER") == "kmodd" and r.get("KMODD_REQUEST") == request
    ]


def helper_messages(records: list[Record]) -> list[str]:
    return [r["MESSAGE"] for r in records if r.get("SYSLOG_IDENTIFIER") == "kmodd-modprobe"]


def status_json(observed: dict[str, Any]) -> dict[str, Any]:
    status = observed["status"]
    assert status["rc"] == 0, status
    doc: dict[str, Any] = status["json"]
    return doc


def test_setup_installs_the_helper_and_the_daemon_gets_ready(main_run: VMResult) -> None:
    data = step(main_run, "setup")
    assert data["ready"] is not None, data
    assert data["install"]["kernel_modprobe"] == HELPER  # the sysctl drop-in, as at boot
    assert data["kernel_modprobe"] == HELPER
    assert "install algif_aead " in data["enforcement"]


def test_1_allowed_autoload_loads_module_and_dependencies(main_run: VMResult) -> None:
    data = step(main_run, "s1_allow")
    assert "appletalk" not in data["before"]
    assert data["trigger"] == {"ok": True}
    assert {"appletalk", "psnap", "llc"} <= set(data["modules"])
    (record,) = decisions(data["journal"], "net-pf-5")
    assert record["KMODD_VERDICT"] == "allow"
    assert record["KMODD_RULE"] == "vm-site-appletalk"
    assert record["KMODD_SOURCE"] == "kernel"
    assert record["MESSAGE_ID"] == MSG_ALLOW
    assert set(record["KMODD_MODULES"].split()) == {"appletalk", "psnap", "llc"}
    status = status_json(data)
    assert status["decisions"]["verdicts"].get("allow", 0) >= 1
    assert status["kernel_modprobe"]["points_at_helper"] is True


def test_2_denied_af_alg_aead_and_denied_filesystem(main_run: VMResult) -> None:
    data = step(main_run, "s2_deny")
    assert data["alg"]["ok"] is False
    assert data["alg"]["errno"] == errno.ENOENT  # af_alg_bind: no "aead" type after all
    assert "algif_aead" not in data["modules"]
    (aead,) = decisions(data["journal"], "algif-aead")
    assert (aead["KMODD_VERDICT"], aead["KMODD_RULE"]) == ("deny", "copy-fail")
    assert aead["MESSAGE_ID"] == MSG_DENY
    # The shipped baseline's copy-fail rule, its reason text after the deciding module.
    assert aead["KMODD_REASON"].startswith(
        'algif_aead denied by rule copy-fail: CVE-2026-31431 "Copy Fail": local root'
    ), aead["KMODD_REASON"]
    assert data["mount"]["rc"] != 0
    assert "unknown filesystem type 'hfsplus'" in data["mount"]["stderr"]
    assert "hfsplus" not in data["modules"]
    (fs,) = decisions(data["journal"], "fs-hfsplus")
    assert (fs["KMODD_VERDICT"], fs["KMODD_RULE"]) == ("deny", "rare-filesystems")
    status = status_json(data)
    assert status["decisions"]["rules"].get("copy-fail", 0) >= 1
    assert status["decisions"]["verdicts"].get("deny", 0) >= 2


def test_3_root_modprobe_is_refused_by_the_rendered_modprobe_d(main_run: VMResult) -> None:
    data = step(main_run, "s3_layer2")
    assert data["modprobe"]["rc"] != 0
    assert "algif_aead" not in data["modules"]
    assert any(f"{HELPER} --deny algif_aead" in line for line in data["enforcement_lines"])
    assert "denied algif_aead through modprobe.d" in helper_messages(data["journal"])


def test_4_unprivileged_trigger_gets_the_policy_verdict(main_run: VMResult) -> None:
    data = step(main_run, "s4_unprivileged")
    ran = data["nobody"]["ran"]
    assert ran is not None, data["nobody"]
    assert (ran["uid"], ran["gid"]) == (65534, 65534)
    kcm, qrtr = ran["outcomes"]
    assert kcm["errno"] == errno.EAFNOSUPPORT
    assert "kcm" not in data["modules"]
    assert "qrtr" in data["modules"], qrtr
    (deny,) = decisions(data["journal"], "net-pf-41")
    assert (deny["KMODD_VERDICT"], deny["KMODD_RULE"]) == ("deny", "legacy-net-protocols")
    (allow,) = decisions(data["journal"], "net-pf-42")
    assert allow["KMODD_VERDICT"] == "allow"


def test_8_device_uevent_is_decided_and_logged_as_udev(main_run: VMResult) -> None:
    data = step(main_run, "s8_devices")
    records = [
        r for r in decisions(data["journal"], data["modalias"]) if r["KMODD_SOURCE"] == "udev"
    ]
    assert records, data
    # No baseline rule names a virtio driver: the one right outcome is the default allow.
    assert (records[0]["KMODD_VERDICT"], records[0]["KMODD_RULE"]) == ("allow", "default")
    assert records[0]["MESSAGE_ID"] == MSG_ALLOW
    assert records[0].get("KMODD_UDEV_ACTION") == "add"


def test_6_live_reload_allows_without_restart_and_rejects_invalid_edit(
    main_run: VMResult,
) -> None:
    data = step(main_run, "s6_reload")
    assert data["before"]["errno"] == errno.EAFNOSUPPORT
    assert data["reloaded"] is not None, data["notifications"]
    assert data["after"] == {"ok": True}
    assert "phonet" in data["modules"]
    first, second = decisions(data["after_reload"]["journal"], "net-pf-35")
    assert (first["KMODD_VERDICT"], first["KMODD_RULE"]) == ("deny", "legacy-net-protocols")
    assert (second["KMODD_VERDICT"], second["KMODD_RULE"]) == ("allow", "vm-reload-phonet")
    before = data["status_before"]["json"]
    after = status_json(data["after_reload"])
    assert after["pid"] == before["pid"]  # no restart
    assert after["generation"]["number"] == before["generation"]["number"] + 1
    failed = [r for r in data["broken_journal"] if r.get("MESSAGE_ID") == MSG_RELOAD_FAILED]
    assert failed, data["broken_journal"]
    assert all("06-vm-broken.yaml" in r["KMODD_ERRORS"] for r in failed)
    broken = data["status_broken"]["json"]
    assert broken["generation"]["number"] == after["generation"]["number"]
    assert broken["last_reload"]["ok"] is False
    assert any("06-vm-broken.yaml" in e for e in broken["last_reload"]["errors"])


def test_5_daemon_killed_snapshot_keeps_deciding(main_run: VMResult) -> None:
    data = step(main_run, "s5_daemon_killed")
    assert data["killed_rc"] == -9
    assert data["denied"]["errno"] == errno.EAFNOSUPPORT
    assert "atm" not in data["modules"]
    assert {"af_key", "xfrm_algo"} <= set(data["modules"])
    messages = helper_messages(data["journal"])
    assert any(
        m.startswith("fallback for net-pf-8:") and "snapshot denies (rule rare-net-atm)" in m
        for m in messages
    ), messages
    assert any(m.startswith("fallback for net-pf-15:") for m in messages), messages
    assert data["status"]["rc"] == 1  # kmodctl status says the daemon is not running
    assert "not running" in data["status"]["stderr"]


def test_7_permissive_cmdline_logs_would_deny_and_loads(permissive_run: VMResult) -> None:
    assert step(permissive_run, "setup")["ready"] is not None
    data = step(permissive_run, "s7_permissive")
    assert data["trigger"] == {"ok": True}
    assert "appletalk" in data["modules"]
    (record,) = decisions(data["journal"], "net-pf-5")
    assert record["KMODD_VERDICT"] == "deny"
    assert record["KMODD_MODE"] == "permissive"
    assert record["KMODD_RULE"] == "legacy-net-protocols"
    assert record["MESSAGE_ID"] == MSG_WOULD_DENY
    assert status_json(data)["mode"] == "permissive"
    assert "install " not in (data["enforcement"] or "")
