"""Issue 10 against the real Debian kernel: a module kmodd calls denied is not loaded, by
modprobe, by udev, by the kernel with the daemon dead; asked of /proc/modules and errno,
not of kmodd's verdict (plan `enforce`, tests/vm/enforcement.py, one boot)."""

from __future__ import annotations

import errno
import json
from typing import Any

import pytest

from tests.conftest import root_required
from tests.kerneltree import KernelTree
from tests.vm.enforcement import LAST_GOOD
from tests.vm.harness import VMResult, boot_plan
from tests.vm.test_scenarios import decisions, helper_messages, step

pytestmark = [pytest.mark.vm, root_required, pytest.mark.timeout(1800)]

MSG_DENY = "3fd47b15f71a497a96fce61bb48c2e03"


@pytest.fixture(scope="module")
def enforce_run(kernel_tree: KernelTree, tmp_path_factory: pytest.TempPathFactory) -> VMResult:
    run = boot_plan("enforce", timeout_s=1800)
    kept = tmp_path_factory.mktemp("enforce") / "results.json"
    kept.write_text(json.dumps(run.results, indent=1, default=str))
    print(f"guest results kept in {kept}")
    return run


def test_setup(enforce_run: VMResult) -> None:
    data = step(enforce_run, "setup")
    assert data["ready"] is not None, data
    assert "psmouse" in data["enforcement"]  # the source: [udev] rule is rendered


def test_root_modprobe_ksmbd_is_refused(enforce_run: VMResult) -> None:
    data = step(enforce_run, "e1_modprobe_ksmbd")
    assert data["modprobe"]["rc"] != 0, data["modprobe"]
    assert "ksmbd" not in data["modules"]
    assert any("denied ksmbd through modprobe.d" in m for m in helper_messages(data["journal"]))
    verify = data["verify"]
    assert verify["doc"] is not None, verify
    rows = {row["module"]: row for row in verify["doc"]["modules"]}
    for name in ("ksmbd", "algif_aead"):
        assert rows[name]["loaded"] is False  # the real /proc/modules
        assert rows[name]["kernel_request"] == "refused (helper)"
        assert rows[name]["modprobe"]["refused"] is True, rows[name]
        assert rows[name]["cis"]["pass"] is True, rows[name]["cis"]


def test_udev_does_not_load_a_driver_denied_for_udev(enforce_run: VMResult) -> None:
    data = step(enforce_run, "e2_udev_drivers")
    assert data["settle"]["rc"] == 0, data["settle"]
    assert "pcspkr" in data["modules"], "control: udev's kmod builtin loads allowed drivers"
    assert "psmouse" not in data["modules"]
    assert data["serio_driver"] is False
    # udev's kmod builtin loads by alias with the blacklist applied: the rendered
    # `blacklist psmouse` makes it skip the module quietly (the install line, and so the
    # stub's log line, is for loads by name: e1).
    # One record per device per generation since boot: kmodd's coldplug scan, or udev's add.
    records = decisions(data["journal"], data["modalias"])
    assert records, data["journal"]
    generations = [r["KMODD_POLICY_GENERATION"] for r in records]
    assert len(set(generations)) == len(generations), records
    for record in records:
        assert record["KMODD_SOURCE"] == "udev" and record["KMODD_VERDICT"] == "deny"
        assert record["MESSAGE_ID"] == MSG_DENY
        assert record["KMODD_ENFORCED"] == "yes", record
        assert "modprobe_d" in record["KMODD_LAYERS"].split()


def test_a_device_whose_driver_is_loaded_is_not_called_denied(enforce_run: VMResult) -> None:
    data = step(enforce_run, "e3_already_loaded")
    assert data["insmod"]["rc"] == 0, data["insmod"]  # insmod reads no modprobe.d
    assert "psmouse" in data["modules_after_insmod"]
    (record,) = decisions(data["journal"], "serio:ty01pr00id00ex00")
    assert record["MESSAGE"].startswith("already loaded /devices/platform/i8042/serio1"), record
    assert "denied" not in record["MESSAGE"], record
    assert record["MESSAGE_ID"] != MSG_DENY
    assert record["KMODD_ENFORCED"].startswith("no: "), record
    assert record["KMODD_LOADED"] == "psmouse"


@pytest.mark.skipif(not LAST_GOOD, reason="kmodd.daemon.lastgood (branch last-good) not merged")
def test_removed_policy_dir_keeps_the_last_good_generation(enforce_run: VMResult) -> None:
    data = step(enforce_run, "e5_last_good")
    before = data["status_before"]["json"]
    after = data["status_after"]["json"]
    assert after["generation"] == before["generation"], (before, after)
    assert data["mount"]["rc"] != 0
    assert "coda" not in data["modules"]
    (record,) = decisions(data["journal"], "fs-coda")
    assert record["KMODD_VERDICT"] == "deny" and record["KMODD_RULE"] == "vm-kernel-coda"


def test_daemon_killed_char_major_67_0_is_denied(enforce_run: VMResult) -> None:
    data = step(enforce_run, "e4_char_major_daemon_killed")
    opened: dict[str, Any] = data["open"]
    assert opened["ok"] is False and opened["errno"] == errno.ENXIO, opened
    assert "coda" not in data["modules"]
    messages = helper_messages(data["journal"])
    assert any(
        "fallback for char-major-67-0" in m and "snapshot denies (rule vm-kernel-coda)" in m
        for m in messages
    ), messages
