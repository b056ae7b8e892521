"""`kmodctl install [--prefix DIR]` / `kmodctl uninstall`: put kmodd's system files in place.

pip cannot write to /usr/lib/systemd or /usr/local/libexec (wheels carry no absolute
paths, Debian's python refuses system installs: research python-ecosystem.md §7), so the
venv that holds kmodd installs them itself.  --prefix works like DESTDIR: files land under
it, while their contents name the final paths (for images, and for tests).

Shipped files (systemd/*, policies/*.yaml) are found next to the package in a checkout or
an editable install (the repository's own dirs), else under sys.prefix/share/kmodd (the
wheel's data-files).  The helper is kmodd/helper.py with its shebang pinned to a real
interpreter: the kernel execs it directly, so a pyenv shim or a venv wrapper would break
or slow down every module autoload.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path

import kmodd
from kmodd import bootpublish, helper
from kmodd.atomic import write_atomic
from kmodd.bpf.layer import MAPS, PIN_DIR, PROGRAMS
from kmodd.cli.common import print_json, wants_json
from kmodd.cli.layout import (
    BOOT_PUBLISH_DEST,
    CATALOG_DEST,
    DRACUT_MODULE_DEST,
    HELPER_DEST,
    INITRAMFS_SCRIPT_DEST,
    INITRAMFS_TOOLS_HOOK_DEST,
    LAYOUTS,
    LOCAL,
    MANIFEST,
    POLICY_DEST,
    SYSCTL_DEST,
    TMPFILES_DEST,
    UNIT_DIR,
    Layout,
    LayoutName,
)
from kmodd.cli.verbs import Verb, VerbSpec
from kmodd.errors import KmoddError
from kmodd.host.modprobe_path import PREVIOUS_FILE, ModprobePath
from kmodd.paths import ENFORCEMENT_FILE, HELPER_NAME, MASK_DIR, PACKAGED

UNITS = (
    "kmodd.service",
    "kmodd-decide.socket",
    "kmodd-control.socket",
    "kmodd-boot-publish.service",
    "kmodd-boot-wait.service",
)
DEFAULT_PYTHON = "/usr/bin/python3"
ELF_MAGIC = b"\x7fELF"
MIN_PYTHON = (3, 11)  # what the project (and so the helper) is tested with


class InstallError(KmoddError):
    """Something kmodctl install/uninstall cannot do safely."""


class StepAction(StrEnum):
    INSTALLED = "installed"
    UPDATED = "updated"
    UNCHANGED = "unchanged"
    CREATED = "created"  # a directory
    REMOVED = "removed"
    ABSENT = "absent"  # uninstall: nothing there
    KEPT = "kept"  # uninstall: a directory that is not empty
    RESTORED = "restored"  # kernel.modprobe
    RAN = "ran"  # a command (systemctl daemon-reload...)


@dataclass(frozen=True, slots=True)
class Step:
    action: StepAction
    path: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class FileSpec:
    dest: str  # relative to the prefix
    content: bytes
    mode: int


@dataclass(frozen=True, slots=True)
class Shipped:
    base: Path  # the dir holding systemd/, initramfs/ and policies/
    systemd: Path
    policies: tuple[Path, ...]
    initramfs: Path


@dataclass
class Manifest:
    files: list[str] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)  # created by us, removed if empty


def shipped_bases() -> tuple[Path, ...]:
    """Where shipped files may live, first match wins: the checkout (editable install)
    holding this package, then the wheel's data-files under sys.prefix/share/kmodd."""
    package = Path(kmodd.__file__).resolve().parent
    return (package.parent, Path(sys.prefix) / "share/kmodd")


def find_shipped(bases: Sequence[Path] | None = None) -> Shipped:
    """systemd/ and policies/ from the first base that has systemd/kmodd.service."""
    bases = shipped_bases() if bases is None else tuple(bases)
    for base in bases:
        if (base / "systemd/kmodd.service").is_file():
            policies = tuple(sorted((base / "policies").glob("*.yaml")))
            return Shipped(base, base / "systemd", policies, base / "initramfs")
    raise InstallError(
        "cannot find the shipped systemd units",
        hint="looked for systemd/kmodd.service under " + ", ".join(map(str, bases)),
    )


def check_interpreter(python: Path) -> None:
    """The helper's shebang must name a real ELF interpreter: the kernel execs it with a
    bare environment, where pyenv shims (shell scripts) misbehave and cost ~100 ms."""
    if not python.is_absolute():
        raise InstallError(f"interpreter {python} is not an absolute path")
    try:
        with python.open("rb") as binary:
            magic = binary.read(4)
    except OSError as err:
        raise InstallError(f"interpreter {python}: {err.strerror}") from err
    if magic != ELF_MAGIC or not python.stat().st_mode & 0o111:
        raise InstallError(
            f"interpreter {python} is not an executable binary (a shim or a script?)",
            hint=f"use --python {DEFAULT_PYTHON}",
        )
    import subprocess  # noqa: PLC0415 -- only when installing; every kmodctl run imports us

    probe = "import sys; print(*sys.version_info[:2])"
    try:
        out = subprocess.run(
            [python, "-IS", "-c", probe], capture_output=True, text=True, timeout=30, check=True
        ).stdout.split()
        version = (int(out[0]), int(out[1]))
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        version = (0, 0)
    if version < MIN_PYTHON:
        raise InstallError(
            f"interpreter {python} is not a Python >= {MIN_PYTHON[0]}.{MIN_PYTHON[1]}",
            hint=f"use --python {DEFAULT_PYTHON}",
        )


def helper_source(python: Path, script: Path | None = None) -> bytes:
    """SCRIPT (default: the helper) with its shebang pinned to PYTHON -IS."""
    lines = Path(script or helper.__file__).read_bytes().split(b"\n", 1)
    body = lines[1] if lines[0].startswith(b"#!") else b"\n".join(lines)
    return f"#!{python} -IS\n".encode() + body


def render(
    template: str, bindir: Path, python: Path = Path(DEFAULT_PYTHON), layout: Layout = LOCAL
) -> bytes:
    """Substitute @BINDIR@ (the venv holding kmodd/kmodctl), @HELPER@, @LIBEXEC@ (its
    directory), @BOOT_PUBLISH@ and @PYTHON@ (the interpreter of the helper and the boot
    step)."""
    for key, value in (
        ("@BINDIR@", str(bindir)),
        ("@HELPER@", "/" + layout.helper),
        ("@LIBEXEC@", "/" + layout.libexec),
        ("@BOOT_PUBLISH@", "/" + layout.boot_publish),
        ("@PYTHON@", str(python)),
    ):
        template = template.replace(key, value)
    return template.encode()


def plan(shipped: Shipped, bindir: Path, python: Path, layout: Layout = LOCAL) -> list[FileSpec]:
    """Every file to install, with its final content and mode."""
    units = shipped.systemd
    publisher = Path(bootpublish.__file__)
    specs = [
        FileSpec(layout.helper, helper_source(python), 0o755),
        FileSpec(layout.boot_publish, helper_source(python, publisher), 0o755),
    ]
    specs += [
        FileSpec(
            f"{layout.units}/{unit}",
            render((units / unit).read_text(), bindir, python, layout),
            0o644,
        )
        for unit in UNITS
    ]
    if layout.sysctl is not None:
        sysctl = render((units / "50-kmodd.sysctl").read_text(), bindir, layout=layout)
        specs.append(FileSpec(layout.sysctl, sysctl, 0o644))
    specs.append(FileSpec(layout.tmpfiles, (units / "kmodd.tmpfiles").read_bytes(), 0o644))
    if (units / "kmodd.catalog").is_file():
        specs.append(FileSpec(layout.catalog, (units / "kmodd.catalog").read_bytes(), 0o644))
    specs += [
        FileSpec(dest, render((shipped.initramfs / name).read_text(), bindir, layout=layout), 0o755)
        for name, dest in layout.initramfs_files
    ]
    specs += [FileSpec(f"{POLICY_DEST}/{p.name}", p.read_bytes(), 0o644) for p in shipped.policies]
    return specs


# -- file operations (all honour dry_run) ------------------------------------------------


def _as_root() -> bool:
    return os.geteuid() == 0


def _missing_dirs(prefix: Path, files: list[str]) -> list[str]:
    """The parent dirs (relative, outermost first) that installing FILES would create."""
    missing: list[str] = []
    for rel in files:
        for part in reversed(Path(rel).parents):
            if str(part) != "." and str(part) not in missing:
                target = prefix / part
                if not (target.is_symlink() or target.exists()):
                    missing.append(str(part))
    return missing


def _ensure_dir(prefix: Path, rel: Path, dry_run: bool, steps: list[Step]) -> None:
    """mkdir -p under the prefix, 0755 whatever the umask."""
    for part in _missing_dirs(prefix, [str(rel / "x")]):
        if any(step.path == str(prefix / part) for step in steps):
            continue  # a dry run "created" it already
        if not dry_run:
            (prefix / part).mkdir(mode=0o755)
            (prefix / part).chmod(0o755)
        steps.append(Step(StepAction.CREATED, str(prefix / part)))


def _up_to_date(path: Path, spec: FileSpec) -> bool:
    try:
        st = path.lstat()
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode) or stat.S_IMODE(st.st_mode) != spec.mode:
        return False
    if _as_root() and (st.st_uid, st.st_gid) != (0, 0):
        return False
    return path.read_bytes() == spec.content


def _write(path: Path, spec: FileSpec) -> None:
    # kmodd.atomic: a reader (the kernel exec'ing the helper) sees old or new, and a
    # symlink planted at the destination is replaced, never followed.
    write_atomic(path, spec.content, mode=spec.mode, owner=(0, 0) if _as_root() else None)


def _install_file(prefix: Path, spec: FileSpec, dry_run: bool, steps: list[Step]) -> None:
    path = prefix / spec.dest
    _ensure_dir(prefix, Path(spec.dest).parent, dry_run, steps)
    detail = f"{spec.mode:04o}"
    if spec.dest.endswith((f"/{HELPER_NAME}", "/kmodd-boot-publish")):
        shebang = spec.content.split(b"\n", 1)[0].decode()
        detail += f", {shebang}"
    if _up_to_date(path, spec):
        steps.append(Step(StepAction.UNCHANGED, str(path), detail))
        return
    action = StepAction.UPDATED if path.exists() or path.is_symlink() else StepAction.INSTALLED
    if not dry_run:
        _write(path, spec)
    steps.append(Step(action, str(path), detail))


def _remove(path: Path, dry_run: bool, steps: list[Step]) -> None:
    if not (path.exists() or path.is_symlink()):
        steps.append(Step(StepAction.ABSENT, str(path)))
        return
    if not dry_run:
        path.unlink()
    steps.append(Step(StepAction.REMOVED, str(path)))


def read_manifest(prefix: Path) -> Manifest | None:
    try:
        data = json.loads((prefix / MANIFEST).read_text())
        return Manifest([str(f) for f in data["files"]], [str(d) for d in data["dirs"]])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _safe_rel(rel: str) -> bool:
    # The manifest is root-owned, but a hand-edited one must not steer removals outside.
    parts = Path(rel).parts
    return bool(parts) and not Path(rel).is_absolute() and ".." not in parts


def _systemd_running(prefix: Path) -> bool:
    return prefix == Path("/") and Path("/run/systemd/system").is_dir()


def _systemctl(args: list[str], steps: list[Step], dry_run: bool) -> None:
    _run(["systemctl", *args], steps, dry_run)


def _run(command: list[str], steps: list[Step], dry_run: bool) -> None:
    import subprocess  # noqa: PLC0415 -- only on a live install; every kmodctl run imports us

    if not dry_run:
        try:
            result = subprocess.run(command, check=False, capture_output=True, text=True)
        except OSError as err:
            steps.append(Step(StepAction.RAN, " ".join(command), f"failed: {err.strerror}"))
            return
        if result.returncode != 0:
            steps.append(
                Step(StepAction.RAN, " ".join(command), f"failed: {result.stderr.strip()}")
            )
            return
    steps.append(Step(StepAction.RAN, " ".join(command)))


# -- the two verbs ------------------------------------------------------------------------


def install(
    prefix: Path, *, bindir: Path, python: Path, dry_run: bool = False, layout: Layout = LOCAL
) -> list[Step]:
    """Install (or update) every file; idempotent.  Files of an older install that are no
    longer shipped are removed.  The package layout (debian/rules) stages into a prefix:
    the tools are looked for there, and dpkg keeps the list of files."""
    check_interpreter(python)
    tools = bindir if layout.manifest is not None else prefix / str(bindir).lstrip("/")
    for tool in ("kmodd", "kmodctl"):
        if not (tools / tool).is_file():
            raise InstallError(
                f"{tools / tool} does not exist: the units would start nothing",
                hint="run kmodctl from the venv that holds kmodd, or pass --bindir",
            )
    specs = plan(find_shipped(), bindir, python, layout)
    if layout.manifest is None:
        steps: list[Step] = []
        for spec in specs:
            _install_file(prefix, spec, dry_run, steps)
        return steps
    old = read_manifest(prefix) or Manifest()
    wanted = [spec.dest for spec in specs]
    new_dirs = _missing_dirs(prefix, [*wanted, MANIFEST])
    manifest = Manifest(sorted(wanted), sorted(set(old.dirs) | set(new_dirs)))
    specs.append(
        FileSpec(MANIFEST, (json.dumps(asdict(manifest), indent=1) + "\n").encode(), 0o644)
    )
    steps = []
    if not prefix.exists():  # like DESTDIR: a fresh staging dir is fine
        if not dry_run:
            prefix.mkdir(mode=0o755, parents=True)
        steps.append(Step(StepAction.CREATED, str(prefix)))
    for spec in specs:
        _install_file(prefix, spec, dry_run, steps)
    for stale in sorted(set(old.files) - set(wanted)):
        if _safe_rel(stale):
            _remove(prefix / stale, dry_run, steps)
    changed = {s.path for s in steps if s.action in (StepAction.INSTALLED, StepAction.UPDATED)}
    if prefix == Path("/") and "/" + CATALOG_DEST in changed:
        _run(["journalctl", "--update-catalog"], steps, dry_run)
    if _systemd_running(prefix):
        _systemctl(["daemon-reload"], steps, dry_run)
    return steps


def uninstall(
    prefix: Path, *, modprobe: ModprobePath | None = None, dry_run: bool = False
) -> list[Step]:
    """Stop and disable the service (live system), restore kernel.modprobe (before the
    helper goes away), remove every installed file and the dirs install created."""
    steps: list[Step] = []
    if _systemd_running(prefix):
        _systemctl(["disable", "--now", *UNITS], steps, dry_run)
    if modprobe is not None and modprobe.check().ok:
        value = modprobe.previous() or helper.DEFAULT_MODPROBE
        if not dry_run:
            value = modprobe.restore() or value
        steps.append(Step(StepAction.RESTORED, str(modprobe.proc_path), value))
    manifest = read_manifest(prefix)
    if manifest is None:  # no manifest (older install, or none): the files we would ship
        manifest = Manifest([spec.dest for spec in _default_plan()], [])
    for rel in sorted(set(manifest.files) | {MANIFEST}):
        if _safe_rel(rel):
            _remove(prefix / rel, dry_run, steps)
    # Without the daemon, the rendered deny file would go on blocking modules nobody
    # manages any more; the helper snapshot is meaningless without the helper.
    if (prefix / ENFORCEMENT_FILE).exists():
        _remove(prefix / ENFORCEMENT_FILE, dry_run, steps)
    _remove_runtime(prefix / helper.RUNTIME_DIR.lstrip("/"), dry_run, steps)
    _unpin_kernel_layer(prefix, dry_run, steps)
    _remove_store(prefix, dry_run, steps)
    for rel in sorted(filter(_safe_rel, manifest.dirs), key=lambda d: -len(Path(d).parts)):
        _remove_dir(prefix / rel, dry_run, steps)
    if _systemd_running(prefix):
        _systemctl(["daemon-reload"], steps, dry_run)
    return steps


# What kmodd and its boot step put in /run/kmodd: the helper snapshot, the marker of who
# published, the kernel.modprobe memo, the sockets (socket units remove theirs on stop),
# and kmod-mask/, the empty file that hides our own enforcement file from decisions.
RUNTIME_FILES = (
    helper.SNAPSHOT_FILE,
    bootpublish.PUBLISHED_FILE,
    PREVIOUS_FILE,
    helper.DECIDE_SOCKET,
    helper.CONTROL_SOCKET,
)


def _ours(name: str, names: Sequence[str]) -> bool:
    """NAME, or a temp file kmodd.atomic / the boot step left of one (`.NAME.PID.*.tmp`)."""
    return name in names or any(
        name.startswith(f".{known}.") and name.endswith(".tmp") for known in names
    )


def _remove_runtime(runtime: Path, dry_run: bool, steps: list[Step]) -> None:
    """Everything of kmodd's in /run/kmodd, then the dir itself when nothing else is left
    (an admin's /run/kmodd/policy.d is not ours: it is kept, and so is the dir)."""
    if not runtime.is_dir() or runtime.is_symlink():
        return
    mask = runtime / MASK_DIR
    if mask.is_dir() and not mask.is_symlink():
        for entry in sorted(mask.iterdir()):
            if _ours(entry.name, (Path(ENFORCEMENT_FILE).name,)):
                _remove(entry, dry_run, steps)
        _remove_dir(mask, dry_run, steps)
    for entry in sorted(runtime.iterdir()):
        if _ours(entry.name, RUNTIME_FILES) and not entry.is_dir():
            _remove(entry, dry_run, steps)
    _remove_dir(runtime, dry_run, steps)


def _unpin_kernel_layer(prefix: Path, dry_run: bool, steps: list[Step]) -> None:
    """Likewise the kernel layer: once unpinned (and the daemon stopped, holding no fds),
    its programs detach."""
    pins = prefix / str(PIN_DIR).lstrip("/")
    if not pins.is_dir():
        return
    for name in (*PROGRAMS.values(), *MAPS):
        if (pins / name).exists():
            _remove(pins / name, dry_run, steps)
    _remove_dir(pins, dry_run, steps)


def _remove_store(prefix: Path, dry_run: bool, steps: list[Step]) -> None:
    """The last-good store: with the boot step gone, nothing would ever publish it."""
    store = prefix / bootpublish.STORE_DIR
    if not store.is_dir() or store.is_symlink():
        return
    for entry in sorted(store.iterdir()):
        if entry.name == bootpublish.MANIFEST or entry.name.startswith(
            ("enforcement.", "snapshot.")
        ):
            _remove(entry, dry_run, steps)
    _remove_dir(store, dry_run, steps)
    _remove_dir(store.parent, dry_run, steps)


def _default_plan() -> list[FileSpec]:
    try:
        return plan(find_shipped(), Path(sys.prefix) / "bin", Path(DEFAULT_PYTHON))
    except (InstallError, OSError):
        return []


def _remove_dir(path: Path, dry_run: bool, steps: list[Step]) -> None:
    if not path.is_dir() or path.is_symlink():
        return
    # What the steps so far removed (a dry run removed nothing yet, but would have).
    gone = {step.path for step in steps if step.action is StepAction.REMOVED}
    left = [p for p in path.iterdir() if str(p) not in gone]
    if left:
        steps.append(Step(StepAction.KEPT, str(path), f"not empty: {len(left)} entries"))
        return
    if not dry_run:
        path.rmdir()
    steps.append(Step(StepAction.REMOVED, str(path)))


# -- kmodctl glue -------------------------------------------------------------------------


def _print(steps: list[Step], args: argparse.Namespace, prefix: Path) -> None:
    if wants_json(args):
        steps_json = [asdict(step) for step in steps]
        print_json({"prefix": str(prefix), "dry_run": args.dry_run, "steps": steps_json})
        return
    if args.dry_run:
        print("dry run: nothing is changed; this is what would be done")
    for step in steps:
        detail = f"  ({step.detail})" if step.detail else ""
        print(f"{step.action:<10} {step.path}{detail}")


def _refuse_packaged(prefix: Path, verb: str) -> None:
    """With the Debian package, dpkg owns the files: a second copy under /usr/local would
    shadow its units and name another helper than the one this kmodd points the kernel at."""
    if PACKAGED and prefix == Path("/"):
        raise InstallError(
            f"kmodd is installed by the Debian package: `kmodctl {verb}` would fight dpkg",
            hint="enable: systemctl enable --now kmodd.service; disable: systemctl disable"
            " --now kmodd.service; remove everything: apt purge kmodd (docs/operations.md)",
        )


def run_install(args: argparse.Namespace) -> int:
    prefix = Path(args.prefix).absolute()
    layout = LAYOUTS[LayoutName(args.layout)]
    if layout is LOCAL:
        _refuse_packaged(prefix, "install")
    bindir = Path(args.bindir or Path(sys.executable).parent).absolute()
    steps = install(
        prefix, bindir=bindir, python=Path(args.python), dry_run=args.dry_run, layout=layout
    )
    _print(steps, args, prefix)
    if not wants_json(args) and not args.dry_run and prefix == Path("/") and layout is LOCAL:
        print("next: systemctl enable --now kmodd.service   (see docs/operations.md)")
    return 0


def run_uninstall(args: argparse.Namespace) -> int:

    prefix = Path(args.prefix).absolute()
    _refuse_packaged(prefix, "uninstall")
    modprobe = None
    if prefix == Path("/"):
        runtime_dir = Path(args.runtime_dir or helper.RUNTIME_DIR)
        mp = ModprobePath(Path("/" + HELPER_DEST), runtime_dir)
        modprobe = mp if mp.available else None
    steps = uninstall(prefix, modprobe=modprobe, dry_run=args.dry_run)
    _print(steps, args, prefix)
    return 0


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prefix",
        metavar="DIR",
        default="/",
        help="install under DIR, like DESTDIR: contents still name the final paths (default: /)",
    )
    parser.add_argument("--dry-run", action="store_true", help="only say what would be done")


def _install_arguments(parser: argparse.ArgumentParser) -> None:
    _common_arguments(parser)
    parser.add_argument(
        "--python",
        metavar="PATH",
        default=DEFAULT_PYTHON,
        help=f"the helper's interpreter, run as `PATH -IS` (default: {DEFAULT_PYTHON})",
    )
    parser.add_argument(
        "--bindir",
        metavar="DIR",
        help="where the units find kmodd and kmodctl (default: this venv's bin dir)",
    )
    parser.add_argument(
        "--layout",
        choices=[name.value for name in LayoutName],
        default=LayoutName.LOCAL.value,
        help="local: /usr/local, for a venv (default); package: the Debian package's /usr"
        " paths, staged under --prefix by debian/rules (no manifest, no sysctl.d drop-in)",
    )


VERBS: tuple[VerbSpec, ...] = (
    VerbSpec(
        Verb.INSTALL,
        "install the helper, systemd units, sysctl/tmpfiles drop-ins and shipped policies",
        "kmodd.cli.install:run_install",
        _install_arguments,
        description="Put kmodd's system files in place (idempotent) and print what was done:"
        f" /{HELPER_DEST} and /{BOOT_PUBLISH_DEST} (0755, root),"
        f" /{UNIT_DIR}/{{{','.join(UNITS)}}},"
        f" /{SYSCTL_DEST}, /{TMPFILES_DEST}, /{POLICY_DEST}/*.yaml, and for early boot"
        f" /{INITRAMFS_TOOLS_HOOK_DEST} (initramfs-tools), /{DRACUT_MODULE_DEST} (dracut)"
        f" and /{INITRAMFS_SCRIPT_DEST}, which put the rendered denies into the next"
        " initramfs.  It does not enable or start anything, nor rebuild the initramfs"
        " (update-initramfs -u, dracut -f).",
        epilog="examples:\n  kmodctl install --dry-run\n  kmodctl install\n"
        "  kmodctl install --prefix /mnt/image --json",
    ),
    VerbSpec(
        Verb.UNINSTALL,
        "stop kmodd, restore kernel.modprobe and remove what install put in place",
        "kmodd.cli.install:run_uninstall",
        _common_arguments,
        description="Disable and stop the units (live system), point kernel.modprobe back at"
        " its previous value, remove every installed file, the rendered"
        f" /{ENFORCEMENT_FILE}, the last-good store /{bootpublish.STORE_DIR} and the"
        " directories install created.",
        epilog="examples:\n  kmodctl uninstall --dry-run\n  kmodctl uninstall",
    ),
)
