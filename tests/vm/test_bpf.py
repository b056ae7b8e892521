"""The kernel layer on the real Debian 6.1 kernel (tests/vm/bpf_guest.py runs the steps).

Boot `enforce` (Debian's default LSM list, which ends in bpf): kmodd's BPF object is
loaded, attached and pinned by a holder process with MODHARDEN-style tables; the kernel's
answers (errno, /proc/modules, the count of helper execs) are asserted, and every ring-
buffer event is checked against who really asked.  Boot `no_bpf_lsm` (`lsm=` without
bpf): detection says inactive and why, and the attached program indeed never runs.
"""

from __future__ import annotations

import shlex
import statistics
import sys
from typing import Any

import pytest

from kmodd.bpf.layout import USER_NS_INIT_INO
from tests.conftest import root_required
from tests.kerneltree import KernelTree
from tests.vm import bpf_guest as g
from tests.vm.harness import VENV_BIN, VMResult, boot, install_prefix

pytestmark = [pytest.mark.vm, root_required, pytest.mark.timeout(1500)]
NO_BPF = "lsm=lockdown,capability,landlock,yama,apparmor,tomoyo"


def _boot(tree: KernelTree, plan: str, append: str = "") -> VMResult:
    script = f"exec {shlex.quote(str(VENV_BIN / 'python'))} -m tests.vm.bpf_guest {plan}\n"
    return boot(script, tree=tree, append=append, timeout_s=1200)


@pytest.fixture(scope="module")
def vm(kernel_tree: KernelTree) -> VMResult:
    return _boot(kernel_tree, "enforce")


@pytest.fixture(scope="module")
def vm_no_bpf(kernel_tree: KernelTree) -> VMResult:
    return _boot(kernel_tree, "no_bpf_lsm", NO_BPF)


def step(vm: VMResult, name: str) -> dict[str, Any]:
    result = vm.result(name)
    if not result.get("ok"):
        pytest.fail(f"guest step {name}: {result.get('error')}\n{vm.tail()}")
    data: dict[str, Any] = result["data"]
    return data


def only(events: list[dict[str, Any]]) -> dict[str, Any]:
    assert len(events) == 1, events
    return events[0]


def test_detection_and_pins_on_debians_default_lsm_list(vm: VMResult) -> None:
    detect = step(vm, "detect")
    assert "bpf" in detect["lsm"].strip().split(",")  # last on 6.1; 6.12 adds ipe,ima,evm
    assert detect["detect"]["active"] is True, detect
    setup = step(vm, "setup")
    maps = ["kmodd_config", "kmodd_events", "kmodd_files", "kmodd_names", "kmodd_stats"]
    assert setup["pins"] == sorted([*maps, "link_load_data", "link_read_file", "link_request"])
    print(f"\nBPF object loaded, attached, pinned in {setup['load_s']} s (TCG)", file=sys.stderr)


def test_nobodys_request_is_denied_in_kernel_and_the_helper_never_runs(vm: VMResult) -> None:
    data = step(vm, "nobody")
    assert data["trigger"]["uid"] == 65534
    assert data["trigger"]["outcomes"][0]["error"] == "EAFNOSUPPORT"  # socket()'s own errno
    assert data["helper_runs"] == 0
    assert "appletalk" not in data["modules"]
    ev = only(data["events"])
    assert (ev["kind"], ev["action"], ev["rule"]) == ("REQUEST", "DENIED", g.R_PF5_UNPRIV)
    assert (ev["uid"], ev["euid"], ev["gid"], ev["comm"]) == (65534, 65534, 65534, "python3")
    assert ev["tgid"] == data["pid"] and ev["userns_inum"] == USER_NS_INIT_INO
    assert ev["cgroup_id"] > 0


def test_a_forged_request_name_is_one_event_with_its_exact_name(vm: VMResult) -> None:
    data = step(vm, "forged")
    assert data["ip"]["rc"] != 0
    ev = only(data["events"])
    assert ev["name"] == f"rtnl-link-{g.FORGED_KIND}"
    assert (ev["action"], ev["rule"], ev["uid"]) == ("DENIED", g.R_USERNS, 65534)
    assert ev["userns_inum"] != USER_NS_INIT_INO
    assert data["helper_runs"] == 0


def test_a_newline_comm_changes_nothing(vm: VMResult) -> None:
    data = step(vm, "newline_comm")
    assert data["exit"] == 0
    ev = only(data["events"])
    assert ev["comm"] == g.FORGED_COMM.decode()
    assert (ev["action"], ev["rule"], ev["uid"]) == ("DENIED", g.R_PF5_UNPRIV, 65534)
    assert data["helper_runs"] == 0


def test_a_user_namespace_request_is_attributed_to_its_namespace(vm: VMResult) -> None:
    data = step(vm, "userns")
    assert data["trigger"]["uid"] == 0  # root inside its namespace ...
    ev = only(data["events"])
    assert (ev["uid"], ev["euid"]) == (65534, 65534)  # ... uid 65534 to the kernel
    assert ev["userns_inum"] != USER_NS_INIT_INO
    assert data["init_userns"] == USER_NS_INIT_INO
    assert (ev["action"], ev["rule"]) == ("DENIED", g.R_USERNS)
    assert data["helper_runs"] == 0


def test_roots_request_is_allowed_and_appletalk_loads(vm: VMResult) -> None:
    data = step(vm, "root")
    assert data["trigger"]["outcomes"][0]["ok"] is True
    ev = only(data["events"])
    assert (ev["action"], ev["rule"], ev["uid"]) == ("ALLOWED", g.R_PF5_ROOT, 0)
    assert data["helper"] == ["-q -- net-pf-5"]
    assert {"appletalk", "psnap", "llc"} <= set(data["modules"])


def test_concurrent_requests_of_one_name_each_get_their_own_verdict(vm: VMResult) -> None:
    data = step(vm, "concurrent")
    uids = {int(pid): uid for pid, uid in data["uids"].items()}
    events = data["events"]
    assert len(events) == g.CONCURRENT
    assert {ev["tgid"] for ev in events} == set(uids)
    for ev in events:
        assert ev["uid"] == uids[ev["tgid"]]
        want = ("DENIED", g.R_PF4_RANGE) if ev["uid"] else ("ALLOWED", g.R_PF4_ALLOW)
        assert (ev["action"], ev["rule"]) == want, ev
    assert len(data["helper"]) == sum(1 for uid in uids.values() if uid == 0)


def _file_denials(data: dict[str, Any]) -> list[dict[str, Any]]:
    denied = [e for e in data["events"] if e["name"] == data["denied_file"]]
    st = data["stat"]
    assert {(e["dev"], e["ino"]) for e in denied} == {(st["major"] << 20 | st["minor"], st["ino"])}
    return denied


def test_a_denied_module_file_is_refused_on_every_load_path(vm: VMResult) -> None:
    data = step(vm, "files")
    if data["load_data"] != "DENY":
        pytest.skip("load_data ALLOW here (kmod < 31 on a compressed tree): the next test")
    assert data["insmod"]["rc"] != 0
    assert "Operation not permitted" in data["insmod"]["stderr"]
    assert data["ignore_install"]["rc"] != 0
    assert "Operation not permitted" in data["ignore_install"]["stderr"]
    assert data["init_module_errno"] == 1  # EPERM: init_module from memory, load_data deny
    assert data["control"]["rc"] == 0, data["control"]
    assert "dummy" not in data["modules"] and "ifb" in data["modules"]
    denied = _file_denials(data)
    assert [(e["kind"], e["action"], e["rule"]) for e in denied] == [
        ("READ_FILE", "DENIED", g.R_FILE)
    ] * 2
    blob = [e for e in data["events"] if e["kind"] == "LOAD_DATA"]
    assert [e["action"] for e in blob] == ["DENIED"]


def test_under_kmod_30_a_compressed_file_is_refused_only_when_the_kernel_reads_it(
    vm: VMResult,
) -> None:
    """6.12 booted with Debian 12's kmod 30 (KMODD_TEST_KERNEL=trixie): kmod decompresses
    .ko.xz itself and calls init_module, which carries no file, so the layer must allow it
    or refuse every module.  The kernel reading the file (finit_module, decompressing) is
    still refused; init_module from memory of the same module loads (docs/attribution.md)."""
    data = step(vm, "files")
    if data["load_data"] == "DENY":
        pytest.skip("load_data DENY here: the previous test covers every path")
    assert data["finit_compressed_errno"] == 1  # EPERM in kernel_read_file
    assert data["init_module_errno"] == 0  # the gap: a blob has no file identity
    assert data["rmmod"]["rc"] == 0, data["rmmod"]  # it had loaded
    assert data["control"]["rc"] == 0, data["control"]
    assert "ifb" in data["modules"]
    denied = _file_denials(data)
    assert [(e["kind"], e["action"], e["rule"]) for e in denied] == [
        ("READ_FILE", "DENIED", g.R_FILE)
    ]
    blob = [e for e in data["events"] if e["kind"] == "LOAD_DATA"]
    assert [e["action"] for e in blob] == ["ALLOWED", "ALLOWED"]  # dummy, then ifb (kmod 30)


def test_enforcement_survives_kill_9_and_a_new_process_adopts_it(vm: VMResult) -> None:
    killed = step(vm, "kill9")
    assert killed["holder_exit"] == -9
    assert killed["helper_runs"] == 0  # still denied in-kernel with nobody holding an fd
    assert "link_request" in killed["pins"]
    adopted = step(vm, "adopt")
    assert adopted["ready"]["adopted"] is True and adopted["ready"]["generation"] == 1
    ev = only(adopted["events"])  # written while no process read the ring
    assert (ev["action"], ev["uid"], ev["rule"]) == ("DENIED", 1000, g.R_PF4_RANGE)


def test_permissive_mode_logs_would_deny_and_refuses_nothing(vm: VMResult) -> None:
    data = step(vm, "permissive")
    assert data["ctl"]["rc"] == 0, data["ctl"]
    ev = only(data["events"])
    assert (ev["action"], ev["verdict"], ev["mode"]) == ("WOULD_DENY", "DENY", "PERMISSIVE")
    assert data["helper_runs"] == 1
    assert data["insmod"]["rc"] == 0, data["insmod"]
    assert "dummy" in data["modules"]
    assert [e["action"] for e in data["file_events"]] == ["WOULD_DENY"]
    assert data["enforce"]["rc"] == 0


def test_in_kernel_deny_latency_against_a_helper_deny(vm: VMResult) -> None:
    data = step(vm, "latency")
    kernel = statistics.median(data["kernel_ns"]) / 1e6
    helper = statistics.median(data["helper_ns"]) / 1e6
    print(
        f"\nmedian socket() latency under TCG: denied in-kernel {kernel:.3f} ms, "
        f"helper /bin/false {helper:.1f} ms ({len(data['kernel_ns'])} interleaved rounds)",
        file=sys.stderr,
    )
    assert kernel < helper  # the in-kernel deny spawns nothing


def test_uninstall_ends_enforcement(vm: VMResult) -> None:
    data = step(vm, "uninstall")
    stats = data["stats"]["json"]
    assert stats["DENIED"] >= 30 + 25 + 5 and stats["DROPPED"] == 0, stats
    assert "link_request" in data["removed"]["json"]
    assert data["left"] is False
    assert data["helper_runs"] == 1  # the same request now reaches the helper


def test_without_bpf_in_lsm_detection_says_inactive_and_the_program_never_runs(
    vm_no_bpf: VMResult,
) -> None:
    detect = step(vm_no_bpf, "detect")
    assert "bpf" not in detect["lsm"].split(",")
    assert detect["detect"]["active"] is False
    assert "lsm=" in detect["detect"]["reason"] and ",bpf`" in detect["detect"]["reason"]
    step(vm_no_bpf, "setup")  # loading and attaching succeed ...
    data = step(vm_no_bpf, "inactive")
    assert data["helper"] == ["-q -- net-pf-5"]  # ... and the deny table is never consulted
    assert data["events"] == []
    assert data["stats"]["json"]["REQUESTS"] == 0


@pytest.fixture(scope="module")
def vm_daemon(kernel_tree: KernelTree) -> VMResult:
    script = f"exec {shlex.quote(str(VENV_BIN / 'python'))} -m tests.vm.bpf_guest daemon\n"
    return boot(script, tree=kernel_tree, timeout_s=1500, prepare=install_prefix)


def test_the_daemon_loads_the_layer_and_status_says_so(vm_daemon: VMResult) -> None:
    data = step(vm_daemon, "setup")
    kernel = data["status"]["json"]["layers"]["kernel"]
    assert kernel["active"] is True, kernel
    assert "loaded and pinned under /sys/fs/bpf/kmodd" in kernel["reason"]
    assert "request names decided in-kernel" in kernel["reason"]
    print(f"\nkmodd start with the kernel layer: {data['start_s']} s (TCG)", file=sys.stderr)


def test_the_daemon_journals_an_in_kernel_deny_with_the_exact_requester(
    vm_daemon: VMResult,
) -> None:
    data = step(vm_daemon, "nobody")
    assert data["trigger"]["json"]["uid"] == 65534
    rec = only(data["records"])
    assert rec["MESSAGE"].startswith("in-kernel: denied net-pf-5")
    assert (rec["KMODD_VERDICT"], rec["KMODD_RULE"], rec["KMODD_LAYERS"]) == (
        "deny",
        "modharden",
        "kernel",
    )
    assert (rec["KMODD_REQUESTER_UID"], rec["KMODD_REQUESTER_COMM"]) == ("65534", "python3")
    assert rec["OBJECT_PID"].isdigit()
    # the helper never ran: it would have logged as kmodd-modprobe or asked the daemon
    assert [r for r in data["helper_lines"] if r.get("SYSLOG_IDENTIFIER") != "kmodd"] == []
    assert "appletalk" not in data["modules"]


def test_roots_request_goes_to_the_helper_and_loads(vm_daemon: VMResult) -> None:
    data = step(vm_daemon, "root")
    assert data["trigger"]["json"]["outcomes"][0]["ok"] is True
    rec = only(data["records"])
    assert rec["KMODD_VERDICT"] == "allow" and "KMODD_LAYERS" not in rec
    assert "appletalk" in data["modules"]
