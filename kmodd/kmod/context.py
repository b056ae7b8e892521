"""Module knowledge for one root and kernel release, answered by libkmod.

`KmodContext` is what the rest of kmodd asks: what a request name resolves to
(`modprobe -R`), what loading it would do (`modprobe -D`), modinfo, the module and alias
lists and the parsed modprobe.d configuration.  It owns one libkmod context; `close()`
(or `with`) releases it.

NOT thread-safe, by design: libkmod keeps per-context state (module pool, the
visited/required flags of a probe), so one thread (the daemon core) owns a context.
A context is a snapshot: it reads modprobe.d once, at open; open a new one (~1 ms; the
first in a process also dlopens libkmod, ~15-30 ms) when the configuration or the module
tree changes (`validate()` tells).

Speed (kmod 30, Debian's 6.1 tree, this project's 2-vCPU dev VM, where one ctypes call
costs ~2 us): an uncached `resolve()` costs 170 us/call on average over every
kernel-request alias, 250 us over every module name and 520 us over device modaliases.
That is libkmod's own work, the same modprobe does: the dry-run probe alone is ~95 us in
C for net-pf-5 (it stats every dependency and scans the configuration per module) and a
wildcard modalias lookup ~75 us.  So results are cached per name (bounded, FIFO eviction,
4,096 names by default): a hit costs 0.25 us, which is what lets the decision engine
reach >= 10,000 decisions/s including resolution.  The daemon's decision context has
no such cache (its Decider caches decisions); `warm()` pre-resolves a known set (all 1,164
request aliases of the Debian tree: ~0.2 s) for benchmarks and tests.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType

from kmodd.errors import KmoddError
from kmodd.kmod import libkmod
from kmodd.kmod.model import LoadStep, ModuleInfo, Resolution, StepKind
from kmodd.paths import MODPROBE_D_DIRS, Paths

# Request names the kernel sends are <= 55 bytes and uevent MODALIAS values < 2 KiB
# (the uevent buffer); anything longer is hostile and resolves to nothing.
MAX_NAME_BYTES = 4096
DEFAULT_CACHE_SIZE = 4096
_INFO_FIELDS = ("description", "license", "signer", "alias", "depends", "softdep")


class ModuleTreeError(libkmod.LibkmodError):
    """ROOT/lib/modules/RELEASE is missing or not indexed."""


class UnknownModuleError(KmoddError):
    """No module (file or builtin) of that name in the tree."""


class ClosedContextError(KmoddError):
    """The context was used after close()."""


def config_dirs(root: str | Path) -> tuple[str, ...]:
    """The five modprobe.d dirs under ROOT, in kmod's precedence (first basename wins).

    kmod 30 itself only reads four by default (it lacks usr/lib/modprobe.d, added in
    kmod 32); passing all five keeps kmodd's view of a root the same on every kmod
    version, and on merged-/usr Debian usr/lib and lib are one directory anyway.
    """
    return tuple(str(Path(root) / d) for d in MODPROBE_D_DIRS)


class KmodContext:
    """libkmod's answers about ROOT/lib/modules/RELEASE and ROOT's modprobe.d dirs."""

    def __init__(
        self,
        root: str | Path,
        release: str,
        *,
        config_paths: Sequence[str | Path] | None = None,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        self._ctx: int | None = None  # first: __del__ runs even when __init__ raises
        self.root = Path(root)
        self.release = release
        self.module_dir = self.root / "lib/modules" / release
        self.config_paths: tuple[str, ...] = (
            config_dirs(self.root) if config_paths is None else tuple(map(str, config_paths))
        )
        if not (self.module_dir / "modules.dep.bin").is_file():
            raise ModuleTreeError(
                f"no module index in {self.module_dir}",
                hint=f"install the kernel's modules and run depmod -b {self.root} {release}",
            )
        self._ctx = libkmod.new_context(str(self.module_dir), self.config_paths)
        self._cache: dict[str, Resolution] = {}
        self._cache_size = cache_size
        self._blacklist: frozenset[str] | None = None
        self._names: tuple[str, ...] | None = None

    @classmethod
    def from_paths(
        cls, paths: Paths, *, config_paths: Sequence[str | Path] | None = None
    ) -> KmodContext:
        return cls(paths.root, paths.release, config_paths=config_paths)

    # --- lifecycle ---------------------------------------------------------------

    def close(self) -> bool:
        """Release the libkmod context; True when libkmod freed it (no leaked module
        reference kept it alive).  Idempotent."""
        if self._ctx is None:
            return True
        freed = libkmod.free_context(self._ctx)
        self._ctx = None
        self._cache.clear()
        return freed

    def __enter__(self) -> KmodContext:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # A forgotten close(): release anyway, quietly (this may run at interpreter exit).
        with contextlib.suppress(Exception):
            self.close()

    @property
    def ctx(self) -> int:
        if self._ctx is None:
            raise ClosedContextError("kmod context used after close()")
        return self._ctx

    def validate(self) -> libkmod.Resources:
        """MUST_RELOAD when an index changed, MUST_RECREATE when a config dir changed
        (directory mtimes only: in-place edits of a file are not seen)."""
        return libkmod.validate_resources(self.ctx)

    # --- resolution --------------------------------------------------------------

    def resolve(self, name: str) -> Resolution:
        """`modprobe -R NAME` (modules) and `modprobe -D NAME` (steps), from libkmod.

        Steps are exactly modprobe's: one dry-run probe per resolved module, so a
        dependency shared by two resolved modules appears once per module.
        """
        cached = self._cache.get(name)
        if cached is not None:
            return cached
        resolution = self._resolve(name)
        if self._cache_size <= 0:  # caching disabled
            return resolution
        if len(self._cache) >= self._cache_size:
            del self._cache[next(iter(self._cache))]
        self._cache[name] = resolution
        return resolution

    def warm(self, names: Iterable[str]) -> int:
        """Resolve NAMES into the cache ahead of time; returns how many were resolved."""
        count = 0
        for name in names:
            count += self.resolve(name).resolved
        return count

    def _resolve(self, name: str) -> Resolution:
        raw = os.fsencode(name)
        if not raw or b"\0" in raw or len(raw) > MAX_NAME_BYTES:
            return Resolution(request=name, modules=(), steps=())
        modules: list[str] = []
        steps: list[LoadStep] = []
        blacklisted: list[str] = []
        with libkmod.lookup(self.ctx, name) as mods:
            for mod in mods:
                modname = libkmod.name(mod)
                modules.append(modname)
                rc, actions = libkmod.probe_dry_run(mod)
                steps.extend(filter(None, map(_step, actions)))
                if rc == libkmod.Probe.APPLY_BLACKLIST_ALIAS_ONLY:
                    blacklisted.append(modname)
        return Resolution(
            request=name, modules=tuple(modules), steps=tuple(steps), blacklisted=tuple(blacklisted)
        )

    # --- modinfo -----------------------------------------------------------------

    def module_info(self, name: str) -> ModuleInfo:
        """modinfo of a module name (not an alias: resolve() first), with the options,
        install/remove commands and blacklist status the configuration gives it."""
        with libkmod.module_by_name(self.ctx, name) as mod:
            if mod is None:
                raise UnknownModuleError(
                    f"no module named {name!r} in {self.module_dir}",
                    hint="request names and aliases resolve with `kmodctl explain NAME`",
                )
            modname = libkmod.name(mod)
            builtin = libkmod.is_builtin(mod)
            pairs = libkmod.info(mod)
            return ModuleInfo(
                name=modname,
                builtin=builtin,
                path=libkmod.path(mod),
                description=_first(pairs, "description"),
                license=_first(pairs, "license"),
                signer=_first(pairs, "signer"),
                aliases=tuple(v for k, v in pairs if k == "alias"),
                depends=tuple(d for d in (_first(pairs, "depends") or "").split(",") if d),
                softdeps=self._softdep_line(modname),
                install_commands=libkmod.install_commands(mod),
                remove_commands=libkmod.remove_commands(mod),
                options=libkmod.options(mod),
                blacklisted=modname in self.blacklist(),
                extra=tuple((k, v) for k, v in pairs if k not in _INFO_FIELDS),
            )

    def _softdep_line(self, modname: str) -> str | None:
        """The first softdep line whose pattern matches (kmod uses only that one)."""
        for pattern, value in self.config_softdeps():
            if fnmatch(pattern, modname):
                return value
        return None

    # --- lists -------------------------------------------------------------------

    def module_names(self) -> tuple[str, ...]:
        """Every module of modules.dep plus every builtin, sorted."""
        if self._names is None:
            dep = libkmod.dump_index(self.ctx, libkmod.Index.MODULES_DEP)
            builtin = libkmod.dump_index(self.ctx, libkmod.Index.MODULES_BUILTIN)
            names = {line.split(" ", 1)[0] for line in (dep + builtin).splitlines() if line}
            self._names = tuple(sorted(names))
        return self._names

    def builtin_names(self) -> tuple[str, ...]:
        dump = libkmod.dump_index(self.ctx, libkmod.Index.MODULES_BUILTIN)
        return tuple(sorted({line.split(" ", 1)[0] for line in dump.splitlines() if line}))

    def alias_patterns(self) -> tuple[tuple[str, str], ...]:
        """(pattern, module) of modules.alias.bin (normalized keys, index order).

        Dumping and splitting the index (~30,000 lines) costs ~0.1-0.3 s: the daemon keeps
        what it needs of it from one build to the next (kmodd.daemon.treeindex)."""
        dump = libkmod.dump_index(self.ctx, libkmod.Index.MODULES_ALIAS)
        return tuple(_pairs(dump, prefix="alias "))

    def index_key(self, *names: str) -> tuple[object, ...] | None:
        return index_key(self.module_dir, *names)

    def builtin_alias_patterns(self) -> tuple[tuple[str, str], ...]:
        """(alias, module) of modules.builtin.alias.bin (aliases of built-in code)."""
        try:
            dump = libkmod.dump_index(self.ctx, libkmod.Index.MODULES_BUILTIN_ALIAS)
        except libkmod.LibkmodError:
            return ()  # optional index: older trees lack it
        return tuple(_pairs(dump, prefix=""))

    # --- configuration (kmod_config_get_*, parse order, normalized) ------------------

    def config_aliases(self) -> tuple[tuple[str, str], ...]:
        return libkmod.config_items(self.ctx, "aliases")

    def config_blacklists(self) -> tuple[str, ...]:
        return tuple(k for k, _ in libkmod.config_items(self.ctx, "blacklists"))

    def config_installs(self) -> tuple[tuple[str, str], ...]:
        return libkmod.config_items(self.ctx, "install")

    def config_removes(self) -> tuple[tuple[str, str], ...]:
        return libkmod.config_items(self.ctx, "remove")

    def config_options(self) -> tuple[tuple[str, str], ...]:
        return libkmod.config_items(self.ctx, "options")

    def config_softdeps(self) -> tuple[tuple[str, str], ...]:
        return libkmod.config_items(self.ctx, "softdeps")

    def blacklist(self) -> frozenset[str]:
        if self._blacklist is None:
            self._blacklist = frozenset(self.config_blacklists())
        return self._blacklist


def index_key(module_dir: Path, *names: str) -> tuple[object, ...] | None:
    """What identifies the content of the index files NAMES of MODULE_DIR (default: every
    modules.* file) without reading them: path, device, inode, size and mtime of each.
    depmod writes each index to a temp file and renames it in, so a new index always has
    a new inode.  None when one cannot be stat'ed."""
    if not names:
        try:
            found = (p.name for p in module_dir.iterdir())
            names = tuple(sorted(n for n in found if n.startswith("modules.")))
        except OSError:
            return None
    key: list[object] = [str(module_dir)]
    for name in names:
        try:
            st = (module_dir / name).stat()
        except OSError:
            return None
        key.append((name, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(key)


def config_key(config_paths: Sequence[str | Path]) -> str | None:
    """A digest of the modprobe.d files CONFIG_PATHS give kmod (first basename wins, as
    kmod reads them; every name counts, not only *.conf): libkmod's validate only
    notices a changed directory mtime, not a file edited in place.  Reading the ~20
    small files costs well under a millisecond.  None when one cannot be read."""
    digest = hashlib.sha256()
    seen: set[str] = set()
    for config in map(Path, config_paths):
        try:
            files = sorted(config.iterdir()) if config.is_dir() else [config]
        except OSError:
            return None
        for file in files:
            if file.name in seen or not file.exists():  # a missing path gives kmod nothing
                continue
            seen.add(file.name)
            try:
                data = file.read_bytes()
            except OSError:
                return None
            digest.update(f"{file}\0{len(data)}\0".encode(errors="surrogateescape") + data)
    return digest.hexdigest()


def _step(action: libkmod.PrintAction) -> LoadStep | None:
    """modprobe's print_action: install, insmod, builtin, or nothing (an alias-only
    object with neither a file nor an install command that kmod would use)."""
    if action.install:
        return LoadStep(
            module=action.module,
            kind=StepKind.INSTALL,
            command=action.command,
            options=action.options,
        )
    if action.path is not None:
        return LoadStep(
            module=action.module, kind=StepKind.INSMOD, path=action.path, options=action.options
        )
    if action.builtin:
        return LoadStep(module=action.module, kind=StepKind.BUILTIN, options=action.options)
    return None


def _first(pairs: tuple[tuple[str, str], ...], key: str) -> str | None:
    return next((v for k, v in pairs if k == key), None)


def _pairs(dump: str, *, prefix: str) -> list[tuple[str, str]]:
    out = []
    for line in dump.splitlines():
        if line.startswith(prefix):
            key, _, value = line[len(prefix) :].partition(" ")
            out.append((key, value))
    return out


def fnmatch(pattern: str, name: str) -> bool:
    """C fnmatch(pattern, name, 0), as kmod matches aliases, installs and softdeps."""
    return libkmod.fnmatch(pattern, name)
