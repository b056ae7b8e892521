"""`kmodctl install` / `uninstall` into a temporary prefix (DESTDIR-like)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmodd import bootpublish, helper
from kmodd.cli.install import (
    UNITS,
    InstallError,
    Step,
    StepAction,
    check_interpreter,
    find_shipped,
    install,
    uninstall,
)
from kmodd.cli.layout import (
    BOOT_PUBLISH_DEST,
    HELPER_DEST,
    MANIFEST,
    POLICY_DEST,
    SYSCTL_DEST,
    UNIT_DIR,
)
from kmodd.cli.main import main
from kmodd.host.modprobe_path import PREVIOUS_FILE, ModprobePath
from kmodd.paths import HELPER_PATH as DEFAULT_HELPER_PATH
from tests.conftest import root_required
from tests.daemon.running import Daemon, make_root
from tests.kerneltree import KernelTree

REPO = Path(__file__).resolve().parents[2]
BINDIR = Path(sys.executable).parent  # this venv: holds kmodd and kmodctl
PYTHON = Path("/usr/bin/python3")


@pytest.fixture
def prefix(tmp_path: Path) -> Path:
    path = tmp_path / "prefix"
    path.mkdir()
    return path


@pytest.fixture
def tight_umask() -> Iterator[None]:
    old = os.umask(0o077)  # install must not let the umask narrow modes
    yield
    os.umask(old)


def tree(root: Path) -> dict[str, tuple[int, int, bytes | None]]:
    """Every path under ROOT with its mode, owner and (for files) content."""
    out: dict[str, tuple[int, int, bytes | None]] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        content = path.read_bytes() if stat.S_ISREG(st.st_mode) else None
        out[str(path.relative_to(root))] = (st.st_mode, st.st_uid, content)
    return out


def actions(steps: list[Step]) -> set[StepAction]:
    return {step.action for step in steps}


def do_install(prefix: Path, *, dry_run: bool = False) -> list[Step]:
    return install(prefix, bindir=BINDIR, python=PYTHON, dry_run=dry_run)


def test_install_twice_is_idempotent(prefix: Path, tight_umask: None) -> None:
    first = do_install(prefix)
    assert {StepAction.INSTALLED, StepAction.CREATED} == actions(first)
    before = tree(prefix)
    second = do_install(prefix)
    assert actions(second) == {StepAction.UNCHANGED}
    assert tree(prefix) == before
    assert len(second) == len([s for s in first if s.action is StepAction.INSTALLED])


def test_modes_owners_and_shebang(prefix: Path, tight_umask: None) -> None:
    do_install(prefix)
    helper_file = prefix / HELPER_DEST
    assert DEFAULT_HELPER_PATH.lstrip("/") == HELPER_DEST  # what the daemon points at
    st = helper_file.stat()
    assert stat.S_IMODE(st.st_mode) == 0o755
    first, rest = helper_file.read_bytes().split(b"\n", 1)
    assert first == b"#!/usr/bin/python3 -IS"
    assert rest == Path(helper.__file__).read_bytes().split(b"\n", 1)[1]
    for name in (*(f"{UNIT_DIR}/{u}" for u in UNITS), SYSCTL_DEST, MANIFEST):
        assert stat.S_IMODE((prefix / name).stat().st_mode) == 0o644
    for directory in (p for p in prefix.rglob("*") if p.is_dir()):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o755, directory
    if os.geteuid() == 0:
        assert {(p.stat().st_uid, p.stat().st_gid) for p in prefix.rglob("*")} == {(0, 0)}


def test_installed_helper_runs_through_its_shebang(prefix: Path, tmp_path: Path) -> None:
    do_install(prefix)
    # Executed the way the kernel does it (the shebang picks the interpreter), with a name
    # the helper must refuse without asking anyone: exit 1 (deny).
    env = {"HOME": "/", "TERM": "linux", "PATH": "/sbin:/usr/sbin:/bin:/usr/bin"}
    env[helper.RUNTIME_DIR_ENV] = str(tmp_path / "no-daemon")
    result = subprocess.run(
        [prefix / HELPER_DEST, "-q", "--", "../evil"], env=env, check=False, timeout=30
    )
    assert result.returncode == helper.EXIT_DENY


def test_units_and_sysctl_name_the_real_paths(prefix: Path) -> None:
    do_install(prefix)
    service = (prefix / UNIT_DIR / "kmodd.service").read_text()
    assert f"ExecStart={BINDIR}/kmodd\n" in service
    assert f"ExecReload={BINDIR}/kmodctl validate\n" in service
    assert "@" not in service.replace("@system-service", "")
    sysctl = (prefix / SYSCTL_DEST).read_text()
    assert f"-kernel.modprobe = {DEFAULT_HELPER_PATH}\n" in sysctl
    shipped = sorted(p.name for p in (REPO / "policies").glob("*.yaml"))
    assert sorted(p.name for p in (prefix / POLICY_DEST).iterdir()) == shipped


def test_systemd_analyze_verify_installed_units(prefix: Path) -> None:
    do_install(prefix)
    units = [str(prefix / UNIT_DIR / unit) for unit in UNITS]
    result = subprocess.run(
        ["systemd-analyze", "verify", *units], capture_output=True, text=True, check=False
    )
    assert (result.returncode, result.stderr) == (0, "")


def test_reinstall_repairs_edits_and_modes(prefix: Path) -> None:
    do_install(prefix)
    service = prefix / UNIT_DIR / "kmodd.service"
    pristine = service.read_bytes()
    service.write_text("[Service]\nExecStart=/bin/evil\n")
    (prefix / HELPER_DEST).chmod(0o777)
    steps = do_install(prefix)
    updated = {s.path for s in steps if s.action is StepAction.UPDATED}
    assert updated == {str(service), str(prefix / HELPER_DEST)}
    assert service.read_bytes() == pristine
    assert stat.S_IMODE((prefix / HELPER_DEST).stat().st_mode) == 0o755


def test_planted_symlink_is_replaced_not_followed(prefix: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (prefix / Path(HELPER_DEST).parent).mkdir(parents=True)
    (prefix / HELPER_DEST).symlink_to(victim)
    do_install(prefix)
    assert victim.read_text() == "precious\n"
    assert not (prefix / HELPER_DEST).is_symlink()


def test_stale_files_of_an_older_install_are_removed(prefix: Path) -> None:
    do_install(prefix)
    manifest = json.loads((prefix / MANIFEST).read_text())
    old = f"{POLICY_DEST}/05-retired.yaml"
    (prefix / old).write_text("kmodd: 1\n")
    manifest["files"].append(old)
    (prefix / MANIFEST).write_text(json.dumps(manifest))
    steps = do_install(prefix)
    assert Step(StepAction.REMOVED, str(prefix / old)) in steps
    assert not (prefix / old).exists()


def test_uninstall_leaves_nothing(prefix: Path) -> None:
    do_install(prefix)
    steps = uninstall(prefix)
    assert StepAction.REMOVED in actions(steps)
    assert list(prefix.iterdir()) == []
    assert actions(uninstall(prefix)) == {StepAction.ABSENT}  # idempotent too


def test_uninstall_keeps_what_was_there_before(prefix: Path) -> None:
    (prefix / "usr/lib").mkdir(parents=True)
    (prefix / "usr/lib/os-release").write_text("ID=debian\n")
    do_install(prefix)
    (prefix / POLICY_DEST / "50-site.yaml").write_text("kmodd: 1\n")  # the admin's
    steps = uninstall(prefix)
    assert (prefix / "usr/lib/os-release").read_text() == "ID=debian\n"
    assert (prefix / POLICY_DEST / "50-site.yaml").exists()
    assert Step(StepAction.KEPT, str(prefix / POLICY_DEST), "not empty: 1 entries") in steps
    assert not (prefix / "usr/local").exists()


def test_uninstall_restores_kernel_modprobe_before_removing_the_helper(
    prefix: Path, tmp_path: Path
) -> None:
    do_install(prefix)
    proc = tmp_path / "proc-modprobe"
    proc.write_text(f"{DEFAULT_HELPER_PATH}\n")
    state = tmp_path / "run-kmodd"
    state.mkdir()
    (state / PREVIOUS_FILE).write_text("/usr/sbin/admin-modprobe\n")
    mp = ModprobePath(Path(DEFAULT_HELPER_PATH), state, proc_path=proc)
    steps = uninstall(prefix, modprobe=mp)
    assert steps[0] == Step(StepAction.RESTORED, str(proc), "/usr/sbin/admin-modprobe")
    assert proc.read_text() == "/usr/sbin/admin-modprobe\n"


def test_uninstall_removes_the_rendered_deny_file(prefix: Path) -> None:
    do_install(prefix)
    deny = prefix / "run/modprobe.d/00-kmodd.conf"
    deny.parent.mkdir(parents=True)
    deny.write_text("install dccp /bin/false\n")
    uninstall(prefix)
    assert not deny.exists()
    assert deny.parent.is_dir()  # not ours to remove


def test_dry_run_changes_nothing(prefix: Path) -> None:
    steps = do_install(prefix, dry_run=True)
    assert StepAction.INSTALLED in actions(steps)
    assert list(prefix.iterdir()) == []
    do_install(prefix)
    before = tree(prefix)
    steps = uninstall(prefix, dry_run=True)
    assert tree(prefix) == before
    assert StepAction.KEPT not in actions(steps)  # it knows the dirs would end up empty


def test_interpreter_must_be_a_real_binary(tmp_path: Path, prefix: Path) -> None:
    shim = tmp_path / "python3"
    shim.write_text('#!/usr/bin/env bash\nexec pyenv exec python3 "$@"\n')
    shim.chmod(0o755)
    for bad in (shim, Path("python3"), tmp_path / "missing"):
        with pytest.raises(InstallError):
            check_interpreter(bad)
    with pytest.raises(InstallError, match="shim"):
        install(prefix, bindir=BINDIR, python=shim)
    assert list(prefix.iterdir()) == []


def test_bindir_without_kmodd_is_refused(prefix: Path, tmp_path: Path) -> None:
    with pytest.raises(InstallError, match="start nothing"):
        install(prefix, bindir=tmp_path, python=PYTHON)


def test_shipped_files_come_from_the_checkout() -> None:
    shipped = find_shipped()
    assert shipped.base == REPO
    assert shipped.policies == tuple(sorted((REPO / "policies").glob("*.yaml")))


def test_shipped_files_from_a_wheel_layout(tmp_path: Path) -> None:
    # pip puts the wheel's data-files (pyproject [tool.setuptools.data-files]) here.
    share = tmp_path / "venv/share/kmodd"
    shutil.copytree(REPO / "systemd", share / "systemd")
    shutil.copytree(REPO / "policies", share / "policies")
    shutil.copytree(REPO / "initramfs", share / "initramfs")
    shipped = find_shipped([tmp_path / "not-a-checkout", share])
    assert shipped.systemd == share / "systemd"
    assert shipped.initramfs == share / "initramfs"
    assert [p.name for p in shipped.policies] == sorted(
        p.name for p in (REPO / "policies").glob("*.yaml")
    )
    with pytest.raises(InstallError, match="cannot find"):
        find_shipped([tmp_path / "nothing"])


def test_pyproject_ships_what_install_reads() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert config["tool"]["setuptools"]["data-files"] == {
        "share/kmodd/systemd": ["systemd/*"],
        "share/kmodd/policies": ["policies/*.yaml"],
        "share/kmodd/initramfs": ["initramfs/*"],
    }


def test_cli_json_and_exit_codes(prefix: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["install", "--prefix", str(prefix), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["prefix"] == str(prefix)
    assert {"action": "installed", "path": str(prefix / HELPER_DEST),
            "detail": "0755, #!/usr/bin/python3 -IS"} in report["steps"]  # fmt: skip
    assert main(["uninstall", "--prefix", str(prefix)]) == 0
    assert "removed" in capsys.readouterr().out
    assert main(["install", "--prefix", str(prefix), "--python", "/bin/sh"]) == 1
    assert "is not a Python >= 3.11" in capsys.readouterr().err


def test_kmodctl_entry_point_installs(prefix: Path) -> None:
    kmodctl = shutil.which("kmodctl", path=str(BINDIR))
    assert kmodctl is not None
    result = subprocess.run(
        [kmodctl, "install", "--prefix", str(prefix), "--dry-run"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("dry run:")


def test_install_creates_a_missing_prefix(tmp_path: Path) -> None:
    prefix = tmp_path / "stage" / "root"
    steps = install(prefix, bindir=BINDIR, python=PYTHON)
    assert (prefix / "usr/local/libexec/kmodd/kmodd-modprobe").is_file()
    assert steps[0].path == str(prefix)


def test_uninstall_unpins_the_kernel_layer(tmp_path: Path) -> None:
    """Pins under PREFIX/sys/fs/bpf/kmodd go with the rest (plain files here: on bpffs an
    unlink is what detaches the programs once no process holds them)."""
    from kmodd.bpf.layer import MAPS, PROGRAMS  # noqa: PLC0415

    pins = tmp_path / "sys/fs/bpf/kmodd"
    pins.mkdir(parents=True)
    for name in (*PROGRAMS.values(), *MAPS):
        (pins / name).write_text("")
    steps = uninstall(tmp_path)
    removed = {s.path for s in steps if s.action is StepAction.REMOVED}
    assert {str(pins / n) for n in (*PROGRAMS.values(), *MAPS)} <= removed
    assert not pins.exists()


def test_boot_publisher_is_installed_and_runs_through_its_shebang(
    prefix: Path, tmp_path: Path
) -> None:
    do_install(prefix)
    script = prefix / BOOT_PUBLISH_DEST
    assert stat.S_IMODE(script.stat().st_mode) == 0o755
    first, rest = script.read_bytes().split(b"\n", 1)
    assert first == b"#!/usr/bin/python3 -IS"
    assert rest == Path(bootpublish.__file__).read_bytes().split(b"\n", 1)[1]
    unit = (prefix / UNIT_DIR / "kmodd-boot-publish.service").read_text()
    assert f"ExecStart=/usr/bin/python3 -IS /{BOOT_PUBLISH_DEST}\n" in unit
    empty = tmp_path / "empty-root"
    empty.mkdir()
    result = subprocess.run(
        [script, "--root", str(empty), "--runtime-dir", str(tmp_path / "rt")],
        capture_output=True, text=True, env={}, check=False, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0 and "no last good generation" in result.stdout


def test_uninstall_removes_the_last_good_store(prefix: Path) -> None:
    do_install(prefix)
    store = prefix / bootpublish.STORE_DIR
    store.mkdir(parents=True)
    for name in (bootpublish.MANIFEST, "snapshot.0123456789abcdef", "enforcement.01.conf"):
        (store / name).write_text("x\n")
    (prefix / "run/kmodd").mkdir(parents=True)
    (prefix / "run/kmodd" / bootpublish.PUBLISHED_FILE).write_text("daemon generation 1\n")
    uninstall(prefix)
    assert not store.exists() and not store.parent.exists()
    assert not (prefix / "run/kmodd" / bootpublish.PUBLISHED_FILE).exists()
    assert (prefix / "var/lib").is_dir()  # not ours


@root_required
def test_uninstall_removes_what_the_daemon_made_in_run(kernel_tree: KernelTree) -> None:
    """Issue 14: uninstall left /run/kmodd/kmod-mask/.  A real daemon run (generation,
    snapshot, published marker, mask, sockets) over a root whose /run/kmodd is its
    runtime dir; then uninstall leaves no /run/kmodd at all."""
    sr = make_root(kernel_tree)
    try:
        sr = dataclasses.replace(sr, runtime=sr.root / "run/kmodd")
        daemon = Daemon(sr, extra=["--no-watch"]).start()
        runtime = sr.root / "run/kmodd"
        (runtime / ".snapshot.4242.boot.tmp").write_bytes(b"torn")  # a crash mid-write
        assert (runtime / "kmod-mask/00-kmodd.conf").exists()
        assert {p.name for p in runtime.iterdir()} >= {"snapshot", "published", "kmod-mask"}
        assert daemon.stop() == 0
        steps = uninstall(sr.root)
        assert not runtime.exists(), sorted(p.name for p in runtime.rglob("*"))
        assert Step(StepAction.REMOVED, str(runtime / "kmod-mask")) in steps
        assert not (sr.root / "run/modprobe.d/00-kmodd.conf").exists()
    finally:
        shutil.rmtree(sr.root.parent, ignore_errors=True)


def test_uninstall_keeps_an_admins_runtime_policy(prefix: Path) -> None:
    runtime = prefix / "run/kmodd"
    (runtime / "policy.d").mkdir(parents=True)
    (runtime / "policy.d/50-today.yaml").write_text("kmodd: 1\n")  # the admin's, volatile
    (runtime / "kmod-mask").mkdir()
    (runtime / "kmod-mask/00-kmodd.conf").write_bytes(b"")
    (runtime / "snapshot").write_bytes(b"kmodd-snapshot\n")
    (runtime / "stranger").write_text("not ours\n")
    steps = uninstall(prefix)
    assert sorted(p.name for p in runtime.iterdir()) == ["policy.d", "stranger"]
    assert Step(StepAction.KEPT, str(runtime), "not empty: 2 entries") in steps
