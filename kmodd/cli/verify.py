"""`kmodctl verify`: is every module the policy denies really kept out, by every path?

It asks the enforcers, not kmodd's model (docs/cli.md "verify"):
- kernel requests: is kernel.modprobe the kmodd helper, and does the helper's snapshot
  deny the module (with the helper elsewhere, the kernel's modprobe reads modprobe.d);
- udev, systemd-modules-load, an admin: kmod's own `modprobe -n -v` dry run against the
  live modprobe.d dirs (argv, no shell, DRYRUN_TIMEOUT_S each): refused when it inserts
  no .ko of the module (an `install` line ran instead);
- now: is it in /proc/modules; can it be denied at all: is it built in (modules.builtin);
- early boot: the current initramfs for the release, read with kmodd's cpio reader; a
  module the image carries must be refused by the image's own modprobe.d (the same dry
  run with the image's config), and the image's policy hash is compared with the policy's;
- the usual CIS check: `modprobe -n -v NAME` shows `install /…`, `modprobe --showconfig`
  shows `blacklist NAME`.
Exit 1 if any denied module is not enforced (or nothing is enforced: permissive, learn).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kmodd import helper
from kmodd.cli.enforcement import NOT_ASKED, KernelState, kernel_state
from kmodd.errors import KmoddError
from kmodd.kmod.context import KmodContext
from kmodd.kmod.initramfs import (
    POLICY_RECORD,
    InitramfsError,
    image_path,
    module_names,
    read_image,
)
from kmodd.paths import HELPER_PATH, MODPROBE_D_DIRS, Paths
from kmodd.policy.engine import CompiledPolicy, Decision, Request, decide
from kmodd.policy.kernelcov import blocking_rule, table_names
from kmodd.policy.types import Mode, Source, Verdict

DRYRUN_TIMEOUT_S = 10.0  # one `modprobe -n -v` is ~3 ms natively, ~0.3 s under TCG
IMAGE_CONF_DIRS = ("etc/modprobe.d/", "lib/modprobe.d/", "usr/lib/modprobe.d/")
# Install commands that refuse: kmodd's stub (in the image: the shell stub at the same
# path), and the CIS forms.  Followed by a space or the end of the command.
DENY_COMMANDS = (
    f"{HELPER_PATH} --deny ",
    "/bin/false",
    "/bin/true",
    "/usr/bin/false",
    "/usr/bin/true",
)


class VerifyError(KmoddError):
    """verify cannot run (no modprobe, no module tree)."""


@dataclass(frozen=True, slots=True)
class DryRun:
    """One `modprobe -n -v NAME`: what kmod would do."""

    argv: tuple[str, ...]
    rc: int | None  # None: timed out
    lines: tuple[str, ...]
    error: str

    def insmods(self, module: str) -> tuple[str, ...]:
        """The paths of MODULE's own .ko (any compression, '-' = '_') kmod would insert."""
        out = []
        for line in self.lines:
            if line.startswith("insmod ") and len(line.split()) > 1:
                path = line.split()[1]
                base = path.rsplit("/", 1)[-1].partition(".ko")[0]
                if base.replace("-", "_") == module:
                    out.append(path)
        return tuple(out)

    def inserts(self, module: str) -> bool:
        return bool(self.insmods(module))

    def refuses(self, module: str) -> bool:
        """kmod would run only deny commands for MODULE and insert none of its .ko.

        An install line that is not a known deny command (another package's install, an
        `--ignore-install` chain) may well load the module: not counted as refused."""
        return self.rc == 0 and not self.inserts(module) and not self.foreign_installs()

    def foreign_installs(self) -> tuple[str, ...]:
        commands = (line[len("install ") :] for line in self.lines if line.startswith("install "))
        return tuple(c for c in commands if not c.startswith(DENY_COMMANDS))

    def shows_install(self) -> bool:
        return any(line.startswith("install /") for line in self.lines)


@dataclass(frozen=True, slots=True)
class Kernel:
    """What the kernel runs for request_module(), and the helper's snapshot."""

    modprobe_path: str | None  # None: not a live system under --root
    is_helper: bool
    snapshot: bytes | None
    snapshot_mode: str | None
    snapshot_generation: str | None

    def refuses(self, module: str) -> bool | None:
        """Helper: the snapshot denies MODULE; None when the helper is not in the path."""
        if not self.is_helper:
            return None
        if self.snapshot is None or self.snapshot_mode != str(Mode.ENFORCE):
            return False
        found = helper.snapshot_lookup(self.snapshot, helper.normalize(module).encode())
        return found is not None and found[0] == b"d"


@dataclass(frozen=True, slots=True)
class Initramfs:
    path: str | None
    error: str | None = None
    reader: str = ""
    segments: tuple[str, ...] = ()
    modules: frozenset[str] = frozenset()
    policy_hash: str | None = None  # recorded by kmodd-initramfs; None: no record
    confs: dict[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Row:
    """One denied module, every path checked."""

    module: str
    rule: str
    expect_kernel: bool  # the policy denies it for kernel requests
    expect_modprobe: bool  # ... for udev (what modprobe.d carries)
    kernel: bool | None  # refused by the helper; None: the helper is not kernel.modprobe
    dry: DryRun
    blacklisted: bool
    loaded: bool | None
    builtin: bool
    in_image: bool | None  # None: no readable image
    image_dry: DryRun | None
    problems: tuple[str, ...]
    in_kernel: tuple[str, ...] = ()  # what the kernel layer refuses: "request", "file"

    @property
    def enforced(self) -> bool:
        return not self.problems

    @property
    def cis(self) -> bool:
        return self.dry.shows_install() and self.blacklisted


@dataclass(frozen=True, slots=True)
class Report:
    root: str
    release: str
    policy: CompiledPolicy
    modprobe: str
    config_dirs: tuple[str, ...]
    kernel: Kernel
    rendered_hash: str | None  # the live rendered file's policy hash
    initramfs: Initramfs
    rows: tuple[Row, ...]
    notes: tuple[str, ...]
    kernel_layer: KernelState = NOT_ASKED

    @property
    def failed(self) -> bool:
        return any(not r.enforced for r in self.rows)


def find_modprobe() -> str:
    for candidate in ("/usr/sbin/modprobe", "/sbin/modprobe"):
        if Path(candidate).is_file():
            return candidate
    found = shutil.which("modprobe")
    if found is None:
        raise VerifyError("kmod's modprobe is not installed", hint="apt-get install kmod")
    return found


def dry_run(modprobe: str, paths: Paths, conf_dirs: Sequence[str], name: str) -> DryRun:
    argv = [modprobe, "-n", "-v", "-d", str(paths.root), "-S", paths.release]
    for directory in conf_dirs:
        argv += ["-C", directory]
    argv += ["--", name]
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=DRYRUN_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        return DryRun(tuple(argv), None, (), f"timed out after {DRYRUN_TIMEOUT_S:.0f} s")
    lines = tuple(line.strip() for line in proc.stdout.splitlines() if line.strip())
    return DryRun(tuple(argv), proc.returncode, lines, proc.stderr.strip()[:500])


def showconfig_blacklist(modprobe: str, conf_dirs: Sequence[str]) -> frozenset[str]:
    argv = [modprobe, "--showconfig"]
    for directory in conf_dirs:
        argv += ["-C", directory]
    try:
        out = subprocess.run(
            argv, capture_output=True, text=True, timeout=DRYRUN_TIMEOUT_S, check=False
        ).stdout
    except subprocess.TimeoutExpired as err:
        raise VerifyError(f"{' '.join(argv)} timed out") from err
    return frozenset(
        ln.split()[1].replace("-", "_") for ln in out.splitlines() if ln.startswith("blacklist ")
    )


def live_conf_dirs(paths: Paths) -> tuple[str, ...]:
    """The modprobe.d dirs kmod reads, in its precedence order, that exist."""
    return tuple(str(paths.root / d) for d in MODPROBE_D_DIRS if (paths.root / d).is_dir())


def read_kernel(paths: Paths, helper_path: str) -> Kernel:
    proc = paths.root / "proc/sys/kernel/modprobe"
    try:
        current: str | None = proc.read_text().strip()
    except OSError:
        current = None
    data = helper.read_snapshot(str(paths.snapshot))
    header = helper.snapshot_header(data) if data is not None else {}
    mode = header.get(b"mode")
    generation = header.get(b"generation")
    return Kernel(
        modprobe_path=current,
        is_helper=current == helper_path,
        snapshot=data,
        snapshot_mode=mode.decode() if mode else None,
        snapshot_generation=generation.decode() if generation else None,
    )


def rendered_hash(text: str) -> str | None:
    for line in text.splitlines()[:20]:
        if line.startswith("# policy generation hash: "):
            return line.split(": ", 1)[1].strip()
    return None


def read_loaded(root: Path) -> frozenset[str] | None:
    try:
        lines = (root / "proc/modules").read_text().splitlines()
    except OSError:
        return None
    return frozenset(line.split(" ", 1)[0] for line in lines if line)


def read_initramfs(paths: Paths) -> Initramfs:
    path = image_path(paths.root, paths.release)
    if path is None:
        return Initramfs(None, f"no initramfs for {paths.release} under {paths.root / 'boot'}")
    try:
        image = read_image(path, keep=[POLICY_RECORD, *IMAGE_CONF_DIRS])
    except InitramfsError as err:
        return Initramfs(str(path), err.message)
    record = image.files.get(POLICY_RECORD, b"").decode(errors="replace").splitlines()
    policy_hash = next((ln[5:] for ln in record if ln.startswith("hash ")), None)
    confs = {n: d for n, d in image.files.items() if n.endswith(".conf")}
    return Initramfs(
        path=str(path),
        reader=image.reader,
        segments=image.segments,
        modules=module_names(image, paths.release),
        policy_hash=policy_hash,
        confs=confs,
    )


@dataclass(frozen=True, slots=True)
class _Denied:
    module: str
    rule: str
    kernel: bool
    udev: bool


def denied_modules(
    policy: CompiledPolicy, ctx: KmodContext, only: Sequence[str] = ()
) -> list[_Denied]:
    """Modules (and built-ins) a rule denies as themselves, for some source."""
    names = sorted(set(ctx.module_names()) | set(ctx.builtin_names()))
    if only:
        wanted = {helper.normalize(n) for n in only}
        names = [n for n in names if helper.normalize(n) in wanted]
    deny_rules = {i for i, r in enumerate(policy.rules) if r.info.verdict is Verdict.DENY}
    out = []
    for module in names:
        if policy.default is not Verdict.DENY and not policy.module_hits(module) & deny_rules:
            continue
        res = ctx.resolve(module)
        verdicts = {
            s: _denies_itself(decide(Request(module, s), res, policy), module) for s in Source
        }
        hit = next((rule for rule in verdicts.values() if rule), None)
        if hit is not None:
            out.append(
                _Denied(module, hit, bool(verdicts[Source.KERNEL]), bool(verdicts[Source.UDEV]))
            )
    return out


def _denies_itself(decision: Decision, module: str) -> str | None:
    for step in decision.trace:
        if step.module == module and step.verdict is Verdict.DENY:
            return str(step.rule)
    return None


def _problems(row: Row, image: Initramfs) -> tuple[str, ...]:
    out = []
    if row.builtin:
        out.append(
            "built into the kernel: neither modprobe.d nor the helper can deny it"
            f" (remedy: initcall_blacklist=<its init function>, see kmodctl explain {row.module})"
        )
        return tuple(out)
    if row.loaded:
        out.append("loaded now (/proc/modules): unload it (modprobe -r) or reboot")
    if row.expect_kernel and row.kernel is False:
        out.append("the helper's snapshot does not deny it: a kernel request would load it")
    if row.expect_kernel and row.kernel is None and not row.dry.refuses(row.module):
        out.append("kernel.modprobe is not the kmodd helper and modprobe.d does not refuse it")
    if row.expect_modprobe and not row.dry.refuses(row.module):
        out.append(f"modprobe would load it: {_dry_summary(row.dry, row.module)}")
    if row.in_image and row.image_dry is not None and not row.image_dry.refuses(row.module):
        out.append(f"in the initramfs {image.path} and its modprobe.d does not refuse it")
    return tuple(out)


def _dry_summary(dry: DryRun, module: str) -> str:
    shown = f"modprobe -n -v {module}"
    if dry.rc is None or dry.rc != 0:
        return f"`{shown}` exit {dry.rc}: {dry.error or '(no message)'}"
    foreign = dry.foreign_installs()
    if foreign:
        return f"`{shown}` runs `install {foreign[0]}`, not a deny command"
    own = dry.insmods(module)
    return f"`{shown}` inserts {own[-1] if own else '(nothing?)'}"


def _image_dry_runs(
    modprobe: str, paths: Paths, image: Initramfs, modules: Iterable[str]
) -> dict[str, DryRun]:
    """The dry run with the image's own modprobe.d, for the denied modules it carries."""
    present = [m for m in modules if m in image.modules]
    if not present:
        return {}
    with tempfile.TemporaryDirectory(prefix="kmodd-verify-") as tmp:
        dirs = []
        for prefix in IMAGE_CONF_DIRS:  # the image's precedence: etc, lib, usr/lib
            target = Path(tmp) / prefix
            target.mkdir(parents=True)
            dirs.append(str(target))
        for name, data in image.confs.items():
            base = name.rsplit("/", 1)[-1]
            if base.startswith(".") or "/" not in name:
                continue
            parent = name.rsplit("/", 1)[0] + "/"
            if parent in IMAGE_CONF_DIRS:
                (Path(tmp) / parent / base).write_bytes(data)
        return {m: dry_run(modprobe, paths, dirs, m) for m in present}


def build_report(
    paths: Paths, policy: CompiledPolicy, only: Sequence[str] = (), helper_path: str = ""
) -> Report:
    modprobe = find_modprobe()
    dirs = live_conf_dirs(paths)
    kernel = read_kernel(paths, helper_path or HELPER_PATH)
    loaded = read_loaded(paths.root)
    image = read_initramfs(paths)
    try:
        rendered = rendered_hash(paths.enforcement_file.read_text(errors="replace"))
    except OSError:
        rendered = None
    blacklisted = showconfig_blacklist(modprobe, dirs)
    with KmodContext.from_paths(paths) as ctx:
        denied = denied_modules(policy, ctx, only)
        builtins = {helper.normalize(b) for b in ctx.builtin_names()}
        names, in_table = table_names(ctx), blocking_rule(policy) is None
    image_dry = _image_dry_runs(modprobe, paths, image, [d.module for d in denied])
    rows = []
    for d in denied:
        row = Row(
            module=d.module,
            rule=d.rule,
            expect_kernel=d.kernel,
            expect_modprobe=d.udev,
            kernel=kernel.refuses(d.module),
            dry=dry_run(modprobe, paths, dirs, d.module),
            blacklisted=helper.normalize(d.module) in blacklisted,
            loaded=None if loaded is None else d.module in loaded,
            builtin=helper.normalize(d.module) in builtins,
            in_image=None if image.error else d.module in image.modules,
            image_dry=image_dry.get(d.module),
            problems=(),
            in_kernel=_in_kernel(d, names, in_table, builtins, policy),
        )
        rows.append(_with_problems(row, image))
    notes = _notes(policy, kernel, rendered, image, loaded)
    return Report(
        str(paths.root),
        paths.release,
        policy,
        modprobe,
        dirs,
        kernel,
        rendered,
        image,
        tuple(rows),
        notes,
        kernel_state(paths),
    )


def _in_kernel(
    d: _Denied, names: frozenset[str], in_table: bool, builtins: set[str], policy: CompiledPolicy
) -> tuple[str, ...]:
    """What the kernel layer's tables hold of D (kmodd.policy.kernelcov's reading): its
    kernel request by name, its file by identity (denied from every source)."""
    module = helper.normalize(d.module)
    if module in builtins or policy.mode is not Mode.ENFORCE:
        return ()
    held = ("request",) if d.kernel and in_table and module in names else ()
    return held + (("file",) if d.udev else ())


def _with_problems(row: Row, image: Initramfs) -> Row:
    from dataclasses import replace  # noqa: PLC0415 -- one use

    return replace(row, problems=_problems(row, image))


def _notes(
    policy: CompiledPolicy,
    kernel: Kernel,
    rendered: str | None,
    image: Initramfs,
    loaded: frozenset[str] | None,
) -> tuple[str, ...]:
    """Warnings that are about the machine, not one module."""
    out = []
    if policy.mode is not Mode.ENFORCE:
        out.append(f"mode {policy.mode}: nothing is enforced, every deny is only logged")
    if kernel.modprobe_path is None:
        out.append("no /proc/sys/kernel/modprobe under the root: kernel requests not checked")
    elif not kernel.is_helper:
        out.append(
            f"kernel.modprobe is {kernel.modprobe_path}, not the kmodd helper: kernel requests"
            " are refused only where modprobe.d refuses them"
        )
    elif kernel.snapshot is None:
        out.append("the helper has no valid snapshot: with the daemon down it runs modprobe")
    if rendered is None:
        out.append("no rendered modprobe.d file (is kmodd running?)")
    elif rendered != policy.hash:
        out.append(
            f"the rendered modprobe.d file is of policy {rendered[:12]}, the policy files are"
            f" {policy.hash[:12]}: run kmodctl reload"
        )
    out.extend(_image_notes(policy, image))
    if loaded is None:
        out.append("no /proc/modules under the root: 'loaded' not checked")
    return tuple(out)


def _image_notes(policy: CompiledPolicy, image: Initramfs) -> list[str]:
    if image.error:
        return [f"initramfs not checked: {image.error}"]
    if image.policy_hash is None:
        return [
            f"the initramfs {image.path} has no kmodd policy (built before kmodd's hook was"
            " installed?): rebuild it (update-initramfs -u, or dracut -f)"
        ]
    if image.policy_hash != policy.hash:
        recorded = image.policy_hash[:12] if image.policy_hash != "none" else "none"
        return [
            f"the initramfs {image.path} predates the policy (its policy {recorded}, now"
            f" {policy.hash[:12]}): rebuild it (update-initramfs -u, or dracut -f)"
        ]
    return []
