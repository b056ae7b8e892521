"""The last good generation, end to end: the real kmodd writes the store under a temp
root, the real boot step (kmodd/bootpublish.py run as `/usr/bin/python3 -IS FILE`)
publishes it, and the helper run as the kernel runs it decides from what was published."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kmodd import bootpublish, helper
from kmodd.daemon.lastgood import EXIT_NO_ENFORCEMENT
from kmodd.paths import POLICY_DIRS
from tests.conftest import root_required
from tests.daemon.running import BASE_POLICY, REPO, Daemon, SystemRoot, make_root, run_helper
from tests.kerneltree import KernelTree

pytestmark = [root_required, pytest.mark.root]

PUBLISHER = REPO / "kmodd/bootpublish.py"
KMODCTL = [sys.executable, "-m", "kmodd.cli.main"]


@pytest.fixture
def sr(kernel_tree: KernelTree) -> Iterator[SystemRoot]:
    root = make_root(kernel_tree)
    yield root
    shutil.rmtree(root.root.parent, ignore_errors=True)


def boot_publish(sr: SystemRoot, *extra: str) -> subprocess.CompletedProcess[str]:
    """The boot step as its unit runs it (no daemon: /run is what a boot leaves)."""
    cmd = ["/usr/bin/python3", "-IS", str(PUBLISHER), "--root", str(sr.root)]
    cmd += ["--kernel", sr.release, "--runtime-dir", str(sr.runtime), "--cmdline", str(sr.cmdline)]
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    return subprocess.run([*cmd, *extra], capture_output=True, text=True, env=env, check=False)


def reboot(sr: SystemRoot) -> None:
    """What a reboot does to the temp root: /run is empty again."""
    shutil.rmtree(sr.runtime, ignore_errors=True)
    sr.enforcement.unlink(missing_ok=True)


def kmodctl(sr: SystemRoot, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [*KMODCTL, "--root", str(sr.root), "--runtime-dir", str(sr.runtime), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=200, check=False)


def run_once(sr: SystemRoot) -> tuple[int, str, str]:
    """Start kmodd, let it build (or fail), stop it; (number, enforcement, snapshot)."""
    daemon = Daemon(sr).start()
    number = daemon.generation()
    assert number is not None
    assert daemon.stop() == 0
    snapshot = (sr.runtime / helper.SNAPSHOT_FILE).read_text()
    return number, sr.enforcement.read_text(), snapshot


def test_persist_publish_round_trip_and_numbers_continue(sr: SystemRoot) -> None:
    number, enforcement, snapshot = run_once(sr)
    store = sr.root / bootpublish.STORE_DIR
    assert stat_mode(store) == 0o700
    assert "install algif_aead" in enforcement
    reboot(sr)
    assert not (sr.runtime / helper.SNAPSHOT_FILE).exists()
    out = boot_publish(sr)
    assert out.returncode == 0, out.stdout
    assert f"published last good generation {number}" in out.stdout
    # Byte for byte what the daemon published; the helper (no daemon) denies from it.
    assert sr.enforcement.read_text() == enforcement
    assert (sr.runtime / helper.SNAPSHOT_FILE).read_text() == snapshot
    assert run_helper(sr, "-q", "--", "algif-aead") == (1, None)
    published = (sr.runtime / bootpublish.PUBLISHED_FILE).read_text()
    assert published.startswith(f"boot-publish generation {number} ")
    # The daemon after a boot publish: same inputs, same output, same generation number.
    daemon = Daemon(sr).start()
    doc = daemon.status()
    assert doc["generation"]["number"] == number
    assert doc["last_good"]["verified"].startswith(f"generation {number} rebuilt")
    assert doc["last_good"]["boot_published"] == published.strip()
    # A real change: the next number continues, across a restart too.
    sr.write_policy(sr.policy_dir.joinpath("10-test.yaml").read_text() + "# edit\n")
    doc = daemon.wait_status(lambda d: d["generation"]["number"] == number + 1)
    assert doc["last_good"]["stored"]["generation"] == number + 1
    assert daemon.stop() == 0
    # A restart with nothing changed rebuilds the same generation: the same number.
    again = Daemon(sr).start()
    assert again.generation() == number + 1
    assert again.stop() == 0
    # A change while the daemon was down: the number continues from the store, never 1.
    sr.write_policy(sr.policy_dir.joinpath("10-test.yaml").read_text() + "# again\n")
    again = Daemon(sr).start()
    assert again.generation() == number + 2
    assert again.stop() == 0


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o7777


def test_torn_or_edited_store_is_refused_loudly(sr: SystemRoot) -> None:
    run_once(sr)
    store = sr.root / bootpublish.STORE_DIR
    manifest = store / bootpublish.MANIFEST
    good = manifest.read_bytes()
    reboot(sr)
    manifest.write_bytes(good[: len(good) // 2])  # torn: a crash mid-write of a copy
    out = boot_publish(sr)
    assert out.returncode == 1
    assert "refused the last-good store" in out.stdout and "torn" in out.stdout
    assert not sr.enforcement.exists()
    manifest.write_bytes(good)
    snapshot = next(store.glob("snapshot.*"))
    data = snapshot.read_bytes()
    snapshot.write_bytes(data.replace(b" d copy-fail\n", b" a copy-fail\n"))  # tampered
    out = boot_publish(sr)
    assert out.returncode == 1 and "does not match the manifest" in out.stdout, out.stdout
    assert not sr.enforcement.exists() and not (sr.runtime / helper.SNAPSHOT_FILE).exists()
    # The daemon refuses it too (journal + status), and the next good generation heals it.
    daemon = Daemon(sr).start()
    doc = daemon.status()
    assert "does not match the manifest" in doc["last_good"]["refused"]
    assert doc["last_good"]["stored"]["generation"] == doc["generation"]["number"]
    assert daemon.stop() == 0
    reboot(sr)
    assert boot_publish(sr).returncode == 0


def test_inputs_changed_take_the_slow_path(sr: SystemRoot) -> None:
    number, _, _ = run_once(sr)
    extra_policy = sr.policy_dir / "20-more.yaml"
    extra_conf = sr.root / "etc/modprobe.d/x.conf"
    cmdline = sr.cmdline.read_text()
    steps: list[tuple[Callable[[], object], Callable[[], object], str]] = [
        (lambda: extra_policy.write_text("kmodd: 1\n"), extra_policy.unlink, "policy"),
        (lambda: extra_conf.write_text("options a b=1\n"), extra_conf.unlink, "modprobe_d"),
        (
            lambda: sr.cmdline.write_text("quiet kmodd.mode=permissive\n"),
            lambda: sr.cmdline.write_text(cmdline),
            "cmdline",
        ),
    ]
    for change, undo, what in steps:
        reboot(sr)
        change()
        out = boot_publish(sr)
        assert out.returncode == 0
        assert f"inputs changed since generation {number} ({what})" in out.stdout, out.stdout
        assert "slow path" in out.stdout
        assert not sr.enforcement.exists()
        undo()
    out = boot_publish(sr, "--kernel", "9.9.9-other")
    assert out.returncode == 0 and "was built for" in out.stdout
    assert not sr.enforcement.exists()
    # Changes undone: the same inputs again, published.
    assert boot_publish(sr).returncode == 0 and sr.enforcement.exists()


def test_invalid_policy_at_start_publishes_the_last_good(sr: SystemRoot) -> None:
    number, enforcement, snapshot = run_once(sr)
    reboot(sr)
    sr.write_policy("kmodd: 2\n")  # broken while the machine was down
    daemon = Daemon(sr).start()
    doc = daemon.status()
    assert doc["generation"] is None and doc["last_reload"]["ok"] is False
    assert doc["last_good"]["fallback"]["generation"] == number
    assert "enforcing the last good generation" in doc["last_good"]["fallback"]["message"]
    assert sr.enforcement.read_text() == enforcement
    assert (sr.runtime / helper.SNAPSHOT_FILE).read_text() == snapshot
    # The daemon has no generation: the helper falls back to the last good snapshot.
    assert run_helper(sr, "-q", "--", "algif-aead") == (1, None)
    assert daemon.status()["decisions"]["no_generation"] == 1
    log = daemon.log.read_text()
    assert "enforcing the last good generation" in log
    # Publishing the last good file is our own write: no second (failing) reload for it.
    assert log.count("reload failed") == 1, log
    sr.write_policy(BASE_POLICY + "# fixed\n")
    doc = daemon.wait_status(lambda d: d["generation"] is not None)
    assert doc["generation"]["number"] == number + 1
    assert doc["last_good"]["fallback"] is None
    assert daemon.stop() == 0


def test_escape_hatch_is_not_overridden_by_the_last_good(sr: SystemRoot) -> None:
    run_once(sr)
    reboot(sr)
    sr.write_policy("kmodd: 2\n")
    sr.cmdline.write_text("quiet kmodd.mode=permissive\n")
    proc = subprocess.run(
        [*Daemon(sr).argv(), "--log-stderr"], capture_output=True, text=True, cwd=REPO,
        env={k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "LISTEN_"))},
        timeout=200, check=False,
    )  # fmt: skip
    assert proc.returncode == EXIT_NO_ENFORCEMENT, proc.stderr[-2000:]
    assert "kmodd.mode=permissive on the kernel command line: not enforced" in proc.stderr
    assert not sr.enforcement.exists()


def test_invalid_policy_and_no_store_is_not_ready(sr: SystemRoot) -> None:
    sr.write_policy("kmodd: 2\n")
    daemon = Daemon(sr)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "LISTEN_"))}
    proc = subprocess.run(
        [*daemon.argv(), "--log-stderr"], capture_output=True, text=True, env=env, cwd=REPO,
        timeout=200, check=False,
    )  # fmt: skip
    assert proc.returncode == EXIT_NO_ENFORCEMENT, proc.stderr[-2000:]
    assert "no enforcement" in proc.stderr and "no last good generation" in proc.stderr
    assert (sr.runtime / bootpublish.PUBLISHED_FILE).read_text().startswith("none: ")


def ship_baseline(sr: SystemRoot) -> Path:
    """The repo's baseline where the package and `kmodctl install` put it."""
    shipped = sr.root / POLICY_DIRS[0]
    shipped.mkdir(parents=True)
    return Path(shutil.copy(REPO / "policies/10-baseline.yaml", shipped))


def kmod_plan(sr: SystemRoot, name: str) -> list[str]:
    """kmod's own `modprobe -n -v NAME` with the published enforcement file."""
    argv = ["modprobe", "-n", "-v", "-d", str(sr.root), "-S", sr.release]
    argv += ["-C", str(sr.enforcement.parent), "--", name]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    return proc.stdout.splitlines()


def test_invalid_policy_at_first_start_enforces_the_shipped_policy(sr: SystemRoot) -> None:
    """Issue 14's real first boot: a broken file and no store left the helper with no
    snapshot, so it ran modprobe for everyone (algif_aead loaded).  The shipped baseline
    stands in, loudly, until the policy is fixed; it is never persisted as last good."""
    ship_baseline(sr)
    sr.write_policy("kmodd: 1\nrules:\n  - id: x\n    action: deny\n    match: {modul: [a]}\n")
    daemon = Daemon(sr).start()
    doc = daemon.status()
    gen = doc["generation"]
    assert gen is not None and gen["stands_in"] is not None, doc
    assert "enforcing the shipped policy only" in gen["stands_in"], gen
    assert "10-baseline.yaml" in gen["stands_in"]
    assert doc["last_reload"]["ok"] is False
    assert any("10-test.yaml:5" in e for e in doc["last_reload"]["errors"]), doc["last_reload"]
    assert doc["last_good"]["stored"] is None  # not the admin's policy: never last good
    # Asked of the enforcers: the daemon's helper answer, kmod's own plan, the snapshot.
    assert run_helper(sr, "-q", "--", "algif-aead") == (1, None)
    plan = kmod_plan(sr, "algif_aead")
    assert any(line.startswith("install ") and "--deny algif_aead" in line for line in plan)
    assert not any("algif_aead.ko" in line for line in plan), plan  # af_alg, its dep, may
    assert run_helper(sr, "-q", "--", "dummy")[1] is not None  # the rest still loads
    text = kmodctl(sr, "status").stdout
    assert "POLICY INVALID: " in text, text
    assert daemon.stop() == 0
    assert run_helper(sr, "-q", "--", "algif-aead") == (1, None)  # the snapshot, no daemon
    log = daemon.log.read_text()
    assert "enforcing the shipped policy only" in log and "reload failed" in log
    # Fixed: the admin's policy decides again and becomes the last good.
    sr.write_policy(BASE_POLICY.replace("id: copy-fail", "id: site-aead"))  # ids are unique
    daemon = Daemon(sr).start()
    doc = daemon.wait_status(lambda d: d["last_good"]["stored"] is not None)
    assert doc["generation"]["stands_in"] is None and doc["last_reload"]["ok"] is True
    assert daemon.stop() == 0


def test_invalid_policy_with_the_shipped_policy_masked_is_not_ready(sr: SystemRoot) -> None:
    """The admin masked the baseline: it does not stand in against that (EXIT_NO_ENFORCEMENT)."""
    ship_baseline(sr)
    (sr.policy_dir / "10-baseline.yaml").symlink_to("/dev/null")
    sr.write_policy("kmodd: 2\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "LISTEN_"))}
    proc = subprocess.run(
        [*Daemon(sr).argv(), "--log-stderr"], capture_output=True, text=True, env=env, cwd=REPO,
        timeout=200, check=False,
    )  # fmt: skip
    assert proc.returncode == EXIT_NO_ENFORCEMENT, proc.stderr[-2000:]
    assert "no shipped policy files" in proc.stderr, proc.stderr[-2000:]


def test_removed_policy_dir_keeps_the_last_good_until_accepted(sr: SystemRoot) -> None:
    daemon = Daemon(sr, extra=["--no-watch"]).start()
    number = daemon.generation()
    assert number is not None
    moved = sr.root / "etc/kmodd/policy.d.moved"
    sr.policy_dir.rename(moved)
    out = kmodctl(sr, "reload")
    assert out.returncode == 1
    assert f"{sr.policy_dir}: policy dir is gone" in out.stderr
    assert "--accept-removed /etc/kmodd/policy.d" in out.stderr
    assert f"keeping generation {number}" in out.stderr
    doc = daemon.status()
    assert doc["generation"]["number"] == number and doc["last_reload"]["ok"] is False
    assert run_helper(sr, "-q", "--", "algif-aead") == (1, None)
    assert "install algif_aead" in sr.enforcement.read_text()
    log = daemon.log.read_text()
    assert f"keeping generation {number}" in log and "policy dir is gone" in log
    # Across a restart as well: the store remembers the dir had files.
    assert daemon.stop() == 0
    daemon = Daemon(sr, extra=["--no-watch"]).start()
    doc = daemon.status()
    assert doc["generation"] is None and doc["last_good"]["fallback"]["generation"] == number
    assert "policy dir is gone" in "\n".join(doc["last_reload"]["errors"])
    # Explicit: only a policy dir may be named, then the change goes through.
    bad = kmodctl(sr, "reload", "--accept-removed", "/etc")
    assert bad.returncode == 1 and "is not a policy dir" in bad.stderr
    ok = kmodctl(sr, "reload", "--accept-removed", "/etc/kmodd/policy.d")
    assert ok.returncode == 0, ok.stderr
    doc = daemon.status()
    assert doc["generation"]["number"] == number + 1 and doc["generation"]["files"] == []
    assert "install algif_aead" not in sr.enforcement.read_text()
    assert doc["last_good"]["stored"]["policy_dirs"] == []
    assert daemon.stop() == 0


def test_policy_dir_with_a_parent_owned_by_a_user_is_refused(sr: SystemRoot) -> None:
    daemon = Daemon(sr, extra=["--no-watch"]).start()
    number = daemon.generation()
    parent = sr.root / "etc/kmodd"
    os.chown(parent, 65534, 65534)
    out = kmodctl(sr, "reload")
    assert out.returncode == 1
    assert f"its parent {parent} is owned by uid 65534" in out.stderr, out.stderr
    assert f"chown root:root {parent}" in out.stderr
    # Why: that user really can move root's policy dir away (a real setpriv'd process).
    moved = sr.root / "etc/kmodd/gone"
    mv = subprocess.run(
        ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "--",
         "mv", str(sr.policy_dir), str(moved)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert mv.returncode == 0, mv.stderr
    out = kmodctl(sr, "reload")
    assert out.returncode == 1 and "policy dir is gone" in out.stderr
    assert daemon.status()["generation"]["number"] == number
    assert run_helper(sr, "-q", "--", "algif-aead") == (1, None)
    assert daemon.stop() == 0


def test_boot_step_points_kernel_modprobe_where_the_daemon_did(sr: SystemRoot) -> None:
    sysctl = sr.root.parent / "kernel.modprobe"  # stands in for /proc/sys/kernel/modprobe
    sysctl.write_text("/sbin/modprobe\n")
    helper_path = sr.root.parent / "kmodd-modprobe"
    shutil.copyfile(REPO / "kmodd/helper.py", helper_path)
    helper_path.chmod(0o755)
    extra = ["--modprobe-sysctl", str(sysctl), "--helper-path", str(helper_path)]
    daemon = Daemon(sr, extra=extra).start()
    assert daemon.stop() == 0
    reboot(sr)
    sysctl.write_text("/sbin/modprobe\n")  # what the kernel boots with
    out = boot_publish(sr, "--modprobe-sysctl", str(sysctl))
    assert out.returncode == 0, out.stdout
    assert f"kernel.modprobe -> {helper_path} (was /sbin/modprobe)" in out.stdout
    assert sysctl.read_text() == f"{helper_path}\n"
    # The daemon started after it finds it done and keeps the admin's value for uninstall.
    daemon = Daemon(sr, extra=extra)
    mark = len(daemon.log.read_text())
    daemon.start()
    km = daemon.wait_status(lambda d: d["kernel_modprobe"]["managed"])["kernel_modprobe"]
    assert km["points_at_helper"] is True
    assert (sr.runtime / "modprobe_path.previous").read_text() == "/sbin/modprobe\n"
    assert daemon.stop() == 0
    # ...and says so: not "-> helper (was /sbin/modprobe)", which every boot logged.
    log = daemon.log.read_text()[mark:]
    already = f"kernel.modprobe already {helper_path} (set before kmodd started; uninstall "
    assert already + "restores /sbin/modprobe)" in log
    assert "(was /sbin/modprobe)" not in log
