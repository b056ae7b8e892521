"""Built-in modules and the kernel command-line arguments that deny modules.

modprobe.d and the helper stop *loading*; code built into the kernel image is never
loaded, so neither can stop it (Fedora and RHEL 10 build algif_aead in).  The kernel's
own switches are the remedy (kernel/module/main.c, init/main.c):

- `module_blacklist=a,b`: load_module() refuses these names with -EPERM, on every path
  (initramfs, udev, insmod, an `install` bypass); exact names, '_' form.  Loadable
  modules only: a built-in is never loaded.
- `initcall_blacklist=fn,...`: do_one_initcall() skips the initcalls whose function
  name (the symbol of the function pointer) is listed: the only way to keep built-in
  code from initialising.

The initcall name is not in modules.builtin.modinfo (it records license, file, alias,
parm...).  kmodd finds it, in order:
1. `exact`: in a symbol table of this kernel (ROOT/boot/System.map-RELEASE when it is a
   real one, or /proc/kallsyms of the running kernel when RELEASE is it).  Since 5.13
   every initcall has a unique symbol `__initcall__kmod_<module>__<id>_<line>_<fn><level>`
   (include/linux/init.h, `__initcall_id`), in the table with CONFIG_KALLSYMS_ALL=y
   (Debian: y).
2. `convention`: `<module>_init`, what module_init() is called in most modules
   (algif_aead_init, the field fix for Copy Fail on RHEL 10), unverified: Debian ships a
   one-line stub System.map ("The real System.map is in the linux-image-<version>-dbg
   package").  `kmodctl cmdline` says which it is, per module.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

# __initcall__kmod_<mod>__<counter>_<line>_<fn><level>; level 0-7 with an optional s
# (sync), or early/rootfs/console/security.
_INITCALL = re.compile(
    r"__initcall__kmod_(?P<mod>\w+?)__\d+_\d+_(?P<fn>\w+?)(?:early|rootfs|con|security|[0-7]s?)$"
)
SYMBOLS_MAX = 256 << 20  # a real System.map is ~5-10 MB; /proc/kallsyms ~15 MB


class Confidence(StrEnum):
    EXACT = "exact"  # found in this kernel's symbol table
    CONVENTION = "convention"  # <module>_init, not verified for this kernel


@dataclass(frozen=True, slots=True)
class Initcall:
    module: str
    function: str
    confidence: Confidence
    source: str  # the symbol file, or why there is none


def symbol_file(root: Path, release: str) -> tuple[Path | None, str]:
    """(file, why): a symbol table for RELEASE under ROOT, or None and why not."""
    system_map = root / "boot" / f"System.map-{release}"
    try:
        with system_map.open("rb") as handle:
            head = handle.read(4096)
        if head.count(b"\n") > 1:
            return system_map, str(system_map)
        why = f"{system_map} is a stub"
    except OSError:
        why = f"no {system_map}"
    if root == Path("/") and os.uname().release == release:
        return Path("/proc/kallsyms"), "/proc/kallsyms"
    return None, why


def initcalls_from(lines: Iterable[str]) -> dict[str, str]:
    """module → initcall function, from `ADDR TYPE NAME [MOD]` lines."""
    found: dict[str, str] = {}
    for line in lines:
        parts = line.split()
        if len(parts) >= 3 and parts[2].startswith("__initcall__kmod_"):
            m = _INITCALL.match(parts[2])
            if m is not None:
                found.setdefault(m.group("mod"), m.group("fn"))
    return found


def initcalls(root: Path, release: str, modules: Iterable[str]) -> tuple[Initcall, ...]:
    """The initcall to blacklist for each built-in module of MODULES."""
    path, why = symbol_file(root, release)
    table: dict[str, str] = {}
    if path is not None:
        try:
            if path.stat().st_size <= SYMBOLS_MAX or path.name == "kallsyms":
                with path.open(errors="replace") as handle:
                    table = initcalls_from(handle)
        except OSError as err:
            why = f"cannot read {path}: {err.strerror}"
            path = None
    out = []
    for module in sorted(set(modules)):
        fn = table.get(module)
        if fn is not None:
            out.append(Initcall(module, fn, Confidence.EXACT, str(path)))
        else:
            note = why if path is None else f"{module} has no initcall symbol in {path}"
            out.append(Initcall(module, f"{module}_init", Confidence.CONVENTION, note))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class CmdlineArgs:
    """Kernel command-line arguments a policy implies for one tree."""

    module_blacklist: tuple[str, ...]  # loadable denied modules
    initcalls: tuple[Initcall, ...]  # built-in denied modules

    def arguments(self) -> tuple[str, ...]:
        args = []
        if self.module_blacklist:
            args.append("module_blacklist=" + ",".join(self.module_blacklist))
        if self.initcalls:
            args.append("initcall_blacklist=" + ",".join(i.function for i in self.initcalls))
        return tuple(args)


def cmdline_args(
    root: Path, release: str, denied: Iterable[str], builtins: Iterable[str]
) -> CmdlineArgs:
    """Split DENIED (module names) into module_blacklist= and initcall_blacklist=."""
    built = frozenset(builtins)
    names = sorted({m.replace("-", "_") for m in denied})
    loadable = tuple(m for m in names if m not in built)
    return CmdlineArgs(loadable, initcalls(root, release, (m for m in names if m in built)))
