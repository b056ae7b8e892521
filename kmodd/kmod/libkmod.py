"""Thin, typed ctypes binding of libkmod.so.2 (kmod 30 on Debian 12).

Only what kmodd needs, with kmod 30's exact signatures (libkmod/libkmod.h at tag v30).
Every reference this module hands out is released by a context manager or a
try/finally; callers never see a raw `kmod_list`.  Pointers are plain ints (ctypes
`c_void_p`), so nothing here keeps a C object alive by accident.

NOT thread-safe: a libkmod context and every module taken from it must stay on one
thread (libkmod keeps per-context module pools and visited/required flags).
"""

from __future__ import annotations

import ctypes
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from pathlib import Path
from typing import Any

from kmodd.errors import KmoddError

LIBRARY = "libkmod.so.2"


class LibkmodError(KmoddError):
    """libkmod is missing or returned an error."""


class Probe(IntFlag):
    """enum kmod_probe (kmod 30): flags of kmod_module_probe_insert_module."""

    FORCE_VERMAGIC = 0x00001
    FORCE_MODVERSION = 0x00002
    IGNORE_COMMAND = 0x00004
    IGNORE_LOADED = 0x00008
    DRY_RUN = 0x00010
    FAIL_ON_LOADED = 0x00020
    APPLY_BLACKLIST_ALL = 0x10000
    APPLY_BLACKLIST = 0x20000
    APPLY_BLACKLIST_ALIAS_ONLY = 0x40000


# What `modprobe -D` passes (tools/modprobe.c insmod(): show-depends sets dry_run and
# ignore_loaded; the alias-only blacklist is always on).
SHOW_DEPENDS = Probe.DRY_RUN | Probe.IGNORE_LOADED | Probe.APPLY_BLACKLIST_ALIAS_ONLY


class Index(IntEnum):
    """enum kmod_index (kmod 30), for kmod_dump_index."""

    MODULES_DEP = 0
    MODULES_ALIAS = 1
    MODULES_SYMBOL = 2
    MODULES_BUILTIN_ALIAS = 3
    MODULES_BUILTIN = 4


class Resources(IntEnum):
    """enum kmod_resources: kmod_validate_resources' answer."""

    OK = 0
    MUST_RELOAD = 1  # an index .bin changed
    MUST_RECREATE = 2  # a config directory changed


KMOD_MODULE_BUILTIN = 0  # enum kmod_module_initstate

_P = ctypes.c_void_p
_S = ctypes.c_char_p
_I = ctypes.c_int
_PP = ctypes.POINTER(ctypes.c_void_p)
# void (*print_action)(struct kmod_module *m, bool install, const char *options)
PRINT_ACTION = ctypes.CFUNCTYPE(None, _P, ctypes.c_bool, _S)

# name: (restype, argtypes)
_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "kmod_new": (_P, [_S, ctypes.POINTER(_S)]),
    "kmod_unref": (_P, [_P]),
    "kmod_load_resources": (_I, [_P]),
    "kmod_validate_resources": (_I, [_P]),
    "kmod_dump_index": (_I, [_P, ctypes.c_uint, _I]),
    "kmod_get_dirname": (_S, [_P]),
    "kmod_list_next": (_P, [_P, _P]),
    "kmod_module_new_from_lookup": (_I, [_P, _S, _PP]),
    "kmod_module_new_from_name": (_I, [_P, _S, _PP]),
    "kmod_module_new_from_name_lookup": (_I, [_P, _S, _PP]),
    "kmod_module_unref": (_P, [_P]),
    "kmod_module_unref_list": (_I, [_P]),
    "kmod_module_get_module": (_P, [_P]),
    "kmod_module_get_dependencies": (_P, [_P]),
    "kmod_module_get_softdeps": (_I, [_P, _PP, _PP]),
    "kmod_module_get_name": (_S, [_P]),
    "kmod_module_get_path": (_S, [_P]),
    "kmod_module_get_options": (_S, [_P]),
    "kmod_module_get_install_commands": (_S, [_P]),
    "kmod_module_get_remove_commands": (_S, [_P]),
    "kmod_module_get_initstate": (_I, [_P]),
    "kmod_module_get_info": (_I, [_P, _PP]),
    "kmod_module_info_get_key": (_S, [_P]),
    "kmod_module_info_get_value": (_S, [_P]),
    "kmod_module_info_free_list": (None, [_P]),
    "kmod_module_probe_insert_module": (_I, [_P, ctypes.c_uint, _S, _P, _P, PRINT_ACTION]),
    "kmod_config_get_blacklists": (_P, [_P]),
    "kmod_config_get_install_commands": (_P, [_P]),
    "kmod_config_get_remove_commands": (_P, [_P]),
    "kmod_config_get_aliases": (_P, [_P]),
    "kmod_config_get_options": (_P, [_P]),
    "kmod_config_get_softdeps": (_P, [_P]),
    "kmod_config_iter_get_key": (_S, [_P]),
    "kmod_config_iter_get_value": (_S, [_P]),
    "kmod_config_iter_next": (ctypes.c_bool, [_P]),
    "kmod_config_iter_free_iter": (None, [_P]),
}

_LIB: ctypes.CDLL | None = None


def lib() -> ctypes.CDLL:
    """libkmod.so.2 with every function kmodd uses typed (loaded once)."""
    global _LIB  # noqa: PLW0603 - one dlopen per process
    if _LIB is None:
        try:
            handle = ctypes.CDLL(LIBRARY, use_errno=True)
        except OSError as err:
            raise LibkmodError(
                f"cannot load {LIBRARY}: {err}", hint="install the libkmod2 package"
            ) from err
        for name, (restype, argtypes) in _SIGNATURES.items():
            func = getattr(handle, name)
            func.restype = restype
            func.argtypes = argtypes
        _LIB = handle
    return _LIB


# Names and paths are bytes to libkmod; surrogateescape round-trips any byte (as
# os.fsencode does on Linux, without its per-call overhead: this is on the hot path).
def encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def decode(raw: bytes | None) -> str | None:
    return None if raw is None else raw.decode("utf-8", "surrogateescape")


def check(rc: int, what: str) -> int:
    if rc < 0:
        raise LibkmodError(f"{what}: {os.strerror(-rc)}", hint="is the module tree depmod'ed?")
    return rc


# --- context -------------------------------------------------------------------------


def new_context(dirname: str, config_paths: tuple[str, ...] | None) -> int:
    """kmod_new + kmod_load_resources; release with free_context.

    `config_paths=None` means libkmod's built-in list (the host's modprobe.d dirs);
    an empty tuple means no config at all (like `modprobe -C /dev/null`).
    """
    paths = None
    if config_paths is not None:
        paths = (_S * (len(config_paths) + 1))(*(encode(p) for p in config_paths), None)
    ctx = lib().kmod_new(encode(dirname), paths)
    if not ctx:
        raise LibkmodError(f"kmod_new({dirname}) failed", hint="is the directory readable?")
    rc = lib().kmod_load_resources(ctx)
    if rc < 0:
        lib().kmod_unref(ctx)
        raise LibkmodError(
            f"cannot load the module indexes in {dirname}: {os.strerror(-rc)}",
            hint=f"run depmod for this release (modules.dep.bin missing in {dirname}?)",
        )
    return int(ctx)


def free_context(ctx: int) -> bool:
    """Drop our reference; True when the context was freed.  Every kmod_module holds a
    reference on its context, so False here means a module reference leaked."""
    return not lib().kmod_unref(ctx)


_EOF_BYTE: bool | None = None


def stores_eof_after_backslash() -> bool:
    """Whether the loaded libkmod keeps getc()'s EOF as a byte 0xff when a config file ends
    in a backslash (kmod 30, Debian 12: `alias a b\\` at EOF gives the value "b\\xff"; kmod
    34, Debian 13, stops at EOF).  Probed once on a throwaway config (kmod_new parses the
    config; no module index is needed), so explain's file:line reader follows whichever
    libkmod this process runs on."""
    global _EOF_BYTE  # noqa: PLW0603 -- one probe per process, ~1 ms
    if _EOF_BYTE is None:
        with tempfile.TemporaryDirectory(prefix="kmodd-probe-") as scratch:
            conf = Path(scratch) / "probe.conf"
            conf.write_bytes(b"alias kmodd-probe x\\")
            paths = (_S * 2)(encode(str(conf)), None)
            ctx = lib().kmod_new(encode(scratch), paths)
            if not ctx:
                raise LibkmodError("kmod_new failed on a probe config", hint="out of memory?")
            try:
                values = [v for _, v in config_items(int(ctx), "aliases")]
            finally:
                lib().kmod_unref(ctx)
        _EOF_BYTE = values == ["x\udcff"]
    return _EOF_BYTE


_DOT_ALIAS: bool | None = None


def reads_dot_alias_files() -> bool:
    """Whether the loaded libkmod reads `NAME.alias` files of a config dir besides
    `NAME.conf` (kmod 30, Debian 12: yes; kmod 34.2, Debian 13: `.conf` only).  Probed
    once, like stores_eof_after_backslash."""
    global _DOT_ALIAS  # noqa: PLW0603 -- one probe per process, ~1 ms
    if _DOT_ALIAS is None:
        with tempfile.TemporaryDirectory(prefix="kmodd-probe-") as scratch:
            (Path(scratch) / "probe.alias").write_bytes(b"alias kmodd-probe x\n")
            paths = (_S * 2)(encode(scratch), None)
            ctx = lib().kmod_new(encode(scratch), paths)
            if not ctx:
                raise LibkmodError("kmod_new failed on a probe config", hint="out of memory?")
            try:
                _DOT_ALIAS = bool(config_items(int(ctx), "aliases"))
            finally:
                lib().kmod_unref(ctx)
    return _DOT_ALIAS


def validate_resources(ctx: int) -> Resources:
    return Resources(lib().kmod_validate_resources(ctx))


def dump_index(ctx: int, index: Index) -> str:
    """kmod_dump_index into a memfd (a pipe would block on the ~1 MB alias index)."""
    fd = os.memfd_create("kmodd-index", os.MFD_CLOEXEC)
    try:
        check(lib().kmod_dump_index(ctx, int(index), fd), f"kmod_dump_index({index.name})")
        os.lseek(fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return os.fsdecode(b"".join(chunks))
    finally:
        os.close(fd)


# --- lists and modules ---------------------------------------------------------------


def iter_list(head: int | None) -> Iterator[int]:
    """The entries of a kmod_list (not the modules: see modules_of)."""
    entry = head
    while entry:
        yield entry
        entry = lib().kmod_list_next(head, entry)


@contextmanager
def module_list(head: int | None) -> Iterator[list[int]]:
    """Borrow the modules of a kmod_list of modules; every reference is released on exit:
    one per module (kmod_module_get_module takes one), then the list itself."""
    mods: list[int] = []
    try:
        mods.extend(int(lib().kmod_module_get_module(e)) for e in iter_list(head))
        yield mods
    finally:
        for mod in mods:
            lib().kmod_module_unref(mod)
        if head:
            lib().kmod_module_unref_list(head)


@contextmanager
def lookup(ctx: int, name: str) -> Iterator[list[int]]:
    """kmod_module_new_from_lookup: the full resolution chain (`modprobe -R`).

    An unknown name is an empty list; a malformed one (unbalanced brackets) too.
    """
    head = ctypes.c_void_p()
    rc = lib().kmod_module_new_from_lookup(ctx, encode(name), ctypes.byref(head))
    if rc < 0:
        head = ctypes.c_void_p()
    with module_list(head.value) as mods:
        yield mods


@contextmanager
def module_by_name(ctx: int, name: str, *, lookup_builtin: bool = True) -> Iterator[int | None]:
    """kmod_module_new_from_name_lookup (modinfo's lookup: modules.dep, builtins), or a
    bare kmod_module_new_from_name when `lookup_builtin` is false.  None when unknown."""
    mod = ctypes.c_void_p()
    func = (
        lib().kmod_module_new_from_name_lookup
        if lookup_builtin
        else lib().kmod_module_new_from_name
    )
    rc = func(ctx, encode(name), ctypes.byref(mod))
    try:
        yield int(mod.value) if rc >= 0 and mod.value else None
    finally:
        if mod.value:
            lib().kmod_module_unref(mod.value)


def name(mod: int) -> str:
    return decode(lib().kmod_module_get_name(mod)) or ""


def path(mod: int) -> str | None:
    return decode(lib().kmod_module_get_path(mod))


def options(mod: int) -> str:
    return decode(lib().kmod_module_get_options(mod)) or ""


def install_commands(mod: int) -> str | None:
    return decode(lib().kmod_module_get_install_commands(mod))


def remove_commands(mod: int) -> str | None:
    return decode(lib().kmod_module_get_remove_commands(mod))


def is_builtin(mod: int) -> bool:
    """kmod_module_get_initstate answers BUILTIN from the index before it looks at
    /sys/module, so this never depends on the host's loaded modules."""
    return int(lib().kmod_module_get_initstate(mod)) == KMOD_MODULE_BUILTIN


def dependencies(mod: int) -> tuple[str, ...]:
    """Hard dependencies from modules.dep, in modules.dep order (load right to left)."""
    with module_list(lib().kmod_module_get_dependencies(mod)) as mods:
        return tuple(name(m) for m in mods)


def softdeps(mod: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(pre, post) module names of the first matching softdep line, resolved."""
    pre, post = ctypes.c_void_p(), ctypes.c_void_p()
    rc = lib().kmod_module_get_softdeps(mod, ctypes.byref(pre), ctypes.byref(post))
    with module_list(pre.value) as pre_mods, module_list(post.value) as post_mods:
        check(rc, "kmod_module_get_softdeps")
        return tuple(name(m) for m in pre_mods), tuple(name(m) for m in post_mods)


def info(mod: int) -> tuple[tuple[str, str], ...]:
    """modinfo (key, value) pairs, from the .ko or modules.builtin.modinfo."""
    head = ctypes.c_void_p()
    rc = lib().kmod_module_get_info(mod, ctypes.byref(head))
    try:
        check(rc, f"kmod_module_get_info({name(mod)})")
        pairs = []
        for entry in iter_list(head.value):
            key = decode(lib().kmod_module_info_get_key(entry)) or ""
            value = decode(lib().kmod_module_info_get_value(entry)) or ""
            pairs.append((key, value))
        return tuple(pairs)
    finally:
        if head.value:
            lib().kmod_module_info_free_list(head.value)


@dataclass(frozen=True, slots=True)
class PrintAction:
    """One print_action callback: what kmod would do for one module of a probe."""

    module: str
    install: bool
    options: str
    path: str | None
    command: str | None
    builtin: bool


def probe_dry_run(mod: int, flags: Probe = SHOW_DEPENDS) -> tuple[int, tuple[PrintAction, ...]]:
    """kmod_module_probe_insert_module in dry-run: (return code, actions in load order).

    A positive return code is the Probe flag that stopped the probe (e.g. the alias-only
    blacklist); negative is -errno.
    """
    actions: list[PrintAction] = []

    def record(m: int | None, install: bool, opts: bytes | None) -> None:
        if not m:
            return
        mod_path = path(m)
        actions.append(
            PrintAction(
                module=name(m),
                install=bool(install),
                options=decode(opts) or "",
                path=mod_path,
                command=install_commands(m) if install else None,
                builtin=not install and mod_path is None and is_builtin(m),
            )
        )

    callback: Callable[..., None] = PRINT_ACTION(record)
    rc = int(lib().kmod_module_probe_insert_module(mod, int(flags), None, None, None, callback))
    return rc, tuple(actions)


# --- configuration iterators -----------------------------------------------------------

_CONFIG_GETTERS = {
    "aliases": "kmod_config_get_aliases",
    "blacklists": "kmod_config_get_blacklists",
    "install": "kmod_config_get_install_commands",
    "remove": "kmod_config_get_remove_commands",
    "options": "kmod_config_get_options",
    "softdeps": "kmod_config_get_softdeps",
}


def config_items(ctx: int, kind: str) -> tuple[tuple[str, str], ...]:
    """(key, value) pairs of one kmod_config_get_* iterator, in parse order.

    kind: aliases, blacklists, install, remove, options, softdeps.  Blacklists have
    an empty value.
    """
    getter = getattr(lib(), _CONFIG_GETTERS[kind])
    it = getter(ctx)
    if not it:
        return ()
    try:
        items = []
        while lib().kmod_config_iter_next(it):
            key = decode(lib().kmod_config_iter_get_key(it)) or ""
            value = decode(lib().kmod_config_iter_get_value(it)) or ""
            items.append((key, value))
        return tuple(items)
    finally:
        lib().kmod_config_iter_free_iter(it)


# --- libc fnmatch: kmod matches with it, and Python's fnmatch differs ([!x], escapes) --

_LIBC: ctypes.CDLL | None = None


def fnmatch(pattern: str, text: str) -> bool:
    """C fnmatch(pattern, text, 0), exactly as libkmod calls it."""
    global _LIBC  # noqa: PLW0603 - one dlopen per process
    if _LIBC is None:
        libc = ctypes.CDLL("libc.so.6")
        libc.fnmatch.restype = _I
        libc.fnmatch.argtypes = [_S, _S, _I]
        _LIBC = libc
    return int(_LIBC.fnmatch(encode(pattern), encode(text), 0)) == 0
