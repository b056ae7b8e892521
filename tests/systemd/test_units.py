"""The shipped systemd files: systemd-analyze verify, the hardening we promise, and the
tmpfiles drop-in applied for real by systemd-tmpfiles under a temporary root."""

from __future__ import annotations

import configparser
import stat
import subprocess
from pathlib import Path

from kmodd.cli.install import UNITS, render
from kmodd.daemon.lastgood import EXIT_NO_ENFORCEMENT
from kmodd.daemon.startup import COMMIT_WAIT_S, EXIT_START_GAVE_UP, EXTEND_BY_S, EXTEND_EVERY_S
from kmodd.paths import HELPER_PATH as DEFAULT_HELPER_PATH
from tests.conftest import root_required

SYSTEMD = Path(__file__).resolve().parents[2] / "systemd"


def fake_bindir(tmp_path: Path) -> Path:
    bindir = tmp_path / "venv/bin"
    bindir.mkdir(parents=True)
    for tool in ("kmodd", "kmodctl"):
        (bindir / tool).write_text("#!/bin/sh\nexit 0\n")
        (bindir / tool).chmod(0o755)
    return bindir


def rendered_units(tmp_path: Path) -> list[Path]:
    bindir = fake_bindir(tmp_path)
    out = []
    for unit in UNITS:
        path = tmp_path / unit
        path.write_bytes(render((SYSTEMD / unit).read_text(), bindir))
        out.append(path)
    return out


def verify(*units: Path) -> tuple[int, str]:
    result = subprocess.run(
        ["systemd-analyze", "verify", *map(str, units)],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.returncode, result.stderr


def service_section(path: Path) -> dict[str, list[str]]:
    """[Service] keys with every value (systemd allows repeated keys)."""
    values: dict[str, list[str]] = {}
    section = ""
    for line in path.read_text().splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service" and "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    assert verify(*rendered_units(tmp_path)) == (0, "")


def test_security_exposure_stays_low(tmp_path: Path) -> None:
    # systemd-analyze's 0-10 exposure score (x10 for --threshold): 2.2 today.  A dropped
    # hardening line raises it; the test then fails rather than the unit quietly weakening.
    service = rendered_units(tmp_path)[0]
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--threshold=25", str(service)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-400:]


def test_verify_would_catch_a_broken_unit(tmp_path: Path) -> None:
    # The check above can fail: a missing binary and an unknown key are both reported.
    service = rendered_units(tmp_path)[0]
    service.write_text(service.read_text().replace(str(tmp_path / "venv/bin"), "/nonexistent"))
    code, err = verify(service)
    assert code != 0
    assert "/nonexistent/kmodd" in err
    service.write_text(service.read_text() + "Bogus=1\n")
    assert "Bogus" in verify(service)[1]


def test_service_contract(tmp_path: Path) -> None:
    service = service_section(rendered_units(tmp_path)[0])
    bindir = tmp_path / "venv/bin"
    assert service["Type"] == ["notify"]
    assert service["ExecStart"] == [f"{bindir}/kmodd"]
    # Validate first; only a valid policy reaches the reload.
    assert service["ExecReload"] == [f"{bindir}/kmodctl validate", f"{bindir}/kmodctl reload"]
    assert service["Restart"] == ["on-failure"]
    assert service["WatchdogSec"] == ["30s"]
    assert service["ProtectSystem"] == ["strict"]
    assert service["ReadWritePaths"] == ["/run/kmodd /run/modprobe.d -/proc/sys/kernel/modprobe"]
    assert service["RestrictAddressFamilies"] == ["AF_UNIX AF_NETLINK"]
    # CAP_BPF and CAP_PERFMON load the kernel layer's LSM programs, nothing more.
    assert service["CapabilityBoundingSet"] == ["CAP_CHOWN CAP_BPF CAP_PERFMON"]
    assert service["SystemCallFilter"] == ["@system-service", "bpf"]
    for key in ("ProtectHome", "PrivateTmp", "NoNewPrivileges", "RuntimeDirectoryPreserve"):
        assert service[key] == ["yes"], key
    # libkmod reads /usr/lib/modules and kernel.modprobe must stay writable.
    assert "ProtectKernelModules" not in service
    assert "ProtectKernelTunables" not in service


def test_sockets_match_the_daemon_names() -> None:
    for kind in ("decide", "control"):
        unit = configparser.ConfigParser(strict=False, interpolation=None)
        unit.read(SYSTEMD / f"kmodd-{kind}.socket")
        assert unit["Socket"]["ListenStream"] == f"/run/kmodd/{kind}.sock"
        assert unit["Socket"]["FileDescriptorName"] == kind
        assert unit["Socket"]["Service"] == "kmodd.service"
        assert unit["Socket"]["SocketMode"] == "0600"


def test_sysctl_points_at_the_helper(tmp_path: Path) -> None:
    text = render((SYSTEMD / "50-kmodd.sysctl").read_text(), tmp_path).decode()
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert lines == [f"-kernel.modprobe = {DEFAULT_HELPER_PATH}"]


@root_required
def test_tmpfiles_creates_the_runtime_dirs(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    subprocess.run(
        ["systemd-tmpfiles", "--create", f"--root={root}", str(SYSTEMD / "kmodd.tmpfiles")],
        check=True,
    )
    for directory in ("run/kmodd", "run/modprobe.d"):
        st = (root / directory).stat()
        assert stat.S_ISDIR(st.st_mode)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o755, 0, 0)


def unit_values(path: Path, section: str, key: str) -> list[str]:
    """Every word of KEY= in SECTION (repeated keys add up, as systemd reads them)."""
    words: list[str] = []
    current = ""
    for line in path.read_text().splitlines():
        if line.startswith("["):
            current = line.strip("[]")
        elif current == section and line.startswith(f"{key}="):
            words += line.partition("=")[2].split()
    return words


def test_boot_ordering_keeps_kmodd_off_the_critical_chain(tmp_path: Path) -> None:
    """The boot step (and, on the slow path, the wait) is what udev and modules-load.d
    wait for; kmodd.service itself waits for nothing of sysinit and blocks nothing."""
    units = {p.name: p for p in rendered_units(tmp_path)}
    early = {"systemd-udevd.service", "systemd-udev-trigger.service"}
    early |= {"systemd-modules-load.service", "sysinit.target"}
    for name in ("kmodd-boot-publish.service", "kmodd-boot-wait.service"):
        assert early <= set(unit_values(units[name], "Unit", "Before")), name
        assert unit_values(units[name], "Unit", "DefaultDependencies") == ["no"]
        assert unit_values(units[name], "Service", "ExecStart")[:2] == ["/usr/bin/python3", "-IS"]
    service = units["kmodd.service"]
    assert unit_values(service, "Unit", "Before") == ["shutdown.target"]
    assert "kmodd-boot-publish.service" in unit_values(service, "Unit", "After")
    # The wait must not be ordered after the daemon (udev would wait for it every boot).
    wait = units["kmodd-boot-wait.service"]
    assert "kmodd.service" not in unit_values(wait, "Unit", "After")
    assert unit_values(wait, "Unit", "ConditionPathExists") == ["!/run/kmodd/published"]
    assert unit_values(service, "Service", "RestartPreventExitStatus") == ["75", "78"]
    assert unit_values(service, "Install", "Also") == [
        "kmodd-boot-publish.service",
        "kmodd-boot-wait.service",
    ]


def test_udev_never_waits_for_local_fs(tmp_path: Path) -> None:
    """udevd starts before local-fs.target on Debian, and a mount of local-fs.target may
    wait for a device only udev brings up (an LV the initramfs left inactive, a crypttab
    volume).  A unit udev waits for (the boot step, the wait, and kmodd.service, which
    the wait waits for at run time on the slow path) ordered after local-fs.target would
    hold that mount until its device job timed out: emergency mode.  Each waits for the
    mounts of the paths it reads instead (tests/realboot asks the booted systemd)."""
    units = {p.name: p for p in rendered_units(tmp_path)}
    for name in ("kmodd-boot-publish.service", "kmodd-boot-wait.service", "kmodd.service"):
        assert "local-fs.target" not in unit_values(units[name], "Unit", "After"), name
    publish = unit_values(units["kmodd-boot-publish.service"], "Unit", "RequiresMountsFor")
    assert "/var/lib/kmodd/last-good" in publish
    service = units["kmodd.service"]
    assert "systemd-remount-fs.service" in unit_values(service, "Unit", "After")
    assert unit_values(service, "Service", "StateDirectory") == ["kmodd"]


def test_verify_catches_an_ordering_cycle_of_the_boot_units(tmp_path: Path) -> None:
    # Why kmodd-boot-wait is not After=kmodd.service and kmodd.service keeps
    # DefaultDependencies=no: with both, sysinit.target -> wait -> kmodd -> sysinit.target.
    # systemd-analyze verify builds the start transaction and finds it (systemd 252+).
    units = {p.name: p for p in rendered_units(tmp_path)}
    wait, service = units["kmodd-boot-wait.service"], units["kmodd.service"]
    wait.write_text(wait.read_text().replace("[Unit]\n", "[Unit]\nAfter=kmodd.service\n", 1))
    text = service.read_text().replace("DefaultDependencies=no", "DefaultDependencies=yes")
    service.write_text(text)
    code, err = verify(*units.values())
    assert code != 0 and "ordering cycle" in err, err


def test_boot_units_are_hardened(tmp_path: Path) -> None:
    # 1.7 (publish: writes /run and kernel.modprobe, reads the module tree) and 1.3 (wait).
    units = {p.name: p for p in rendered_units(tmp_path)}
    for name in ("kmodd-boot-publish.service", "kmodd-boot-wait.service"):
        result = subprocess.run(
            ["systemd-analyze", "security", "--offline=yes", "--threshold=20", str(units[name])],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stdout[-400:]


def _seconds(value: str) -> float:
    units = {"min": 60.0, "s": 1.0, "ms": 0.001}
    for suffix, scale in units.items():
        if value.endswith(suffix) and value[: -len(suffix)].isdigit():
            return float(value[: -len(suffix)]) * scale
    raise AssertionError(f"not a time span this test reads: {value!r}")


def test_a_failing_start_stops_retrying(tmp_path: Path) -> None:
    """Issue 14: a start slower than TimeoutStartSec= was killed and restarted forever.
    Now a slow build extends its timeout (tests/daemon/test_startup.py), the exits that a
    restart cannot mend are not restarted, and whatever else fails is retried at most
    StartLimitBurst= times: also starts that each run into TimeoutStartSec= fit the window
    (systemd's start limit counts in a fixed window from its first start)."""
    service = rendered_units(tmp_path)[0]
    burst = int(unit_values(service, "Unit", "StartLimitBurst")[0])
    window = _seconds(unit_values(service, "Unit", "StartLimitIntervalSec")[0])
    start = _seconds(unit_values(service, "Service", "TimeoutStartSec")[0])
    pause = _seconds(unit_values(service, "Service", "RestartSec")[0])
    assert 2 <= burst <= 10
    assert burst * (start + pause) < window  # the (burst+1)th timed-out start is refused
    prevent = unit_values(service, "Service", "RestartPreventExitStatus")
    assert {str(EXIT_START_GAVE_UP), str(EXIT_NO_ENFORCEMENT)} == set(prevent)
    stop = _seconds(unit_values(service, "Service", "TimeoutStopSec")[0])
    assert COMMIT_WAIT_S < stop <= 30  # a publish under way may end; never 90 s of waiting
    assert EXTEND_EVERY_S * 2 < EXTEND_BY_S  # one late send is not a timeout
