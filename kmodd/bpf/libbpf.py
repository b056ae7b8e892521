"""Thin, typed ctypes binding of libbpf.so.1 (Debian 12: 1.1.2, Debian 13: 1.5).

Only libbpf 1.1 API (libbpf.h / bpf.h at v1.1.0), in libbpf 1.x's error convention:
functions returning a pointer return NULL and set errno, the others return -errno.
Every handle here is owned by one Python object and released by close() (or its context
manager): BpfObject (bpf_object__close), Link (bpf_link__destroy: detaches unless
pinned), RingBuffer (ring_buffer__free), and map fds (os.close).  Pointers are plain ints.

libbpf's own messages (the verifier log among them) are captured, not printed: the last
ones go into the hint of the error that follows them.
"""

from __future__ import annotations

import collections
import ctypes
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Self

from kmodd.errors import KmoddError

LIBRARY = "libbpf.so.1"
LOG_LINES = 40  # verifier logs run to hundreds of lines; the tail names the failing insn


class BpfError(KmoddError):
    """libbpf is missing, or a bpf() operation failed (errno kept)."""

    def __init__(self, message: str, *, errno: int = 0, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.errno = errno


class MapType(IntEnum):
    """enum bpf_map_type (include/uapi/linux/bpf.h), the ones kmodd creates."""

    HASH = 1
    ARRAY = 2
    PERCPU_ARRAY = 6
    ARRAY_OF_MAPS = 12
    RINGBUF = 27


BPF_ANY = 0  # bpf_map_update_elem flags
_P = ctypes.c_void_p
_S = ctypes.c_char_p
_I = ctypes.c_int
_U32 = ctypes.c_uint32
# int (*libbpf_print_fn_t)(enum libbpf_print_level, const char *, va_list): on x86_64
# (and aarch64) a va_list argument travels as a pointer, which vsnprintf takes back.
PRINT_FN = ctypes.CFUNCTYPE(_I, _I, _S, _P)
# int (*ring_buffer_sample_fn)(void *ctx, void *data, size_t size)
SAMPLE_FN = ctypes.CFUNCTYPE(_I, _P, _P, ctypes.c_size_t)

_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "libbpf_set_print": (_P, [PRINT_FN]),
    "bpf_object__open_file": (_P, [_S, _P]),
    "bpf_object__load": (_I, [_P]),
    "bpf_object__close": (None, [_P]),
    "bpf_object__find_program_by_name": (_P, [_P, _S]),
    "bpf_object__find_map_by_name": (_P, [_P, _S]),
    "bpf_object__next_map": (_P, [_P, _P]),
    "bpf_program__attach_lsm": (_P, [_P]),
    "bpf_link__pin": (_I, [_P, _S]),
    "bpf_link__open": (_P, [_S]),
    "bpf_link__destroy": (_I, [_P]),
    "bpf_map__fd": (_I, [_P]),
    "bpf_map__name": (_S, [_P]),
    "bpf_map__type": (_I, [_P]),
    "bpf_map__key_size": (_U32, [_P]),
    "bpf_map__value_size": (_U32, [_P]),
    "bpf_map__max_entries": (_U32, [_P]),
    "bpf_map__set_pin_path": (_I, [_P, _S]),
    "bpf_map_create": (_I, [_I, _S, _U32, _U32, _U32, _P]),
    "bpf_map_update_elem": (_I, [_I, _P, _P, ctypes.c_uint64]),
    "bpf_map_lookup_elem": (_I, [_I, _P, _P]),
    "bpf_map_delete_elem": (_I, [_I, _P]),
    "bpf_map_get_next_key": (_I, [_I, _P, _P]),
    "bpf_obj_get": (_I, [_S]),
    "bpf_obj_pin": (_I, [_I, _S]),
    "ring_buffer__new": (_P, [_I, SAMPLE_FN, _P, _P]),
    "ring_buffer__poll": (_I, [_P, _I]),
    "ring_buffer__consume": (_I, [_P]),
    "ring_buffer__epoll_fd": (_I, [_P]),
    "ring_buffer__free": (None, [_P]),
}

_LIB: ctypes.CDLL | None = None
_LOCK = threading.Lock()
_LOG: collections.deque[str] = collections.deque(maxlen=LOG_LINES)
_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.vsnprintf.restype = _I
_LIBC.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, _S, _P]


LIBBPF_DEBUG = 2  # enum libbpf_print_level: WARN 0, INFO 1, DEBUG 2 (relocation chatter)


def _print_message(level: int, fmt: bytes | None, args: int | None) -> int:
    if level >= LIBBPF_DEBUG:
        return 0
    buf = ctypes.create_string_buffer(1024)
    _LIBC.vsnprintf(buf, len(buf), fmt, args)
    _LOG.append(buf.value.decode(errors="replace").rstrip("\n"))
    return 0


_PRINT = PRINT_FN(_print_message)  # kept alive for the process: libbpf holds the pointer


def lib() -> ctypes.CDLL:
    """libbpf.so.1 with every function kmodd uses typed (loaded once per process)."""
    global _LIB  # noqa: PLW0603 - one dlopen per process
    with _LOCK:
        if _LIB is None:
            try:
                handle = ctypes.CDLL(LIBRARY, use_errno=True)
            except OSError as err:
                raise BpfError(f"cannot load {LIBRARY}: {err}", hint="install libbpf1") from err
            for name, (restype, argtypes) in _SIGNATURES.items():
                func = getattr(handle, name)
                func.restype = restype
                func.argtypes = argtypes
            handle.libbpf_set_print(_PRINT)
            _LIB = handle
    return _LIB


def log_tail(lines: int = 12) -> str:
    """The last messages libbpf printed (verifier log, relocation failures)."""
    return "\n".join(list(_LOG)[-lines:])


def _fail(what: str, err: int, hint: str | None = None) -> BpfError:
    text = f"{what}: {os.strerror(err)}"
    tail = log_tail()
    if hint is None and err == 1:  # EPERM
        hint = "needs root (CAP_BPF + CAP_SYS_ADMIN); lockdown=confidentiality forbids it"
    if tail:
        hint = f"{hint + chr(10) if hint else ''}libbpf said:\n{tail}"
    return BpfError(text, errno=err, hint=hint)


def _check(rc: int, what: str, hint: str | None = None) -> int:
    if rc < 0:
        raise _fail(what, -rc, hint)
    return rc


def _pointer(ptr: int | None, what: str, hint: str | None = None) -> int:
    if not ptr:
        raise _fail(what, ctypes.get_errno() or 22, hint)
    return int(ptr)


def _path(path: str) -> bytes:
    return os.fsencode(path)


# --- maps by fd (pinned or created) --------------------------------------------------


def obj_get(path: str) -> int:
    """An fd for a pinned map, program or link (close it with os.close)."""
    return _check(lib().bpf_obj_get(_path(path)), f"bpf_obj_get({path})")


def obj_pin(fd: int, path: str) -> None:
    _check(lib().bpf_obj_pin(fd, _path(path)), f"bpf_obj_pin({path})")


def map_create(kind: MapType, name: str, key_size: int, value_size: int, entries: int) -> int:
    """A new map's fd (close it with os.close; a map lives while an fd or pin holds it)."""
    rc = lib().bpf_map_create(int(kind), name.encode(), key_size, value_size, entries, None)
    return _check(rc, f"bpf_map_create({name}, {entries} entries)")


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    _check(lib().bpf_map_update_elem(fd, key, value, flags), "bpf_map_update_elem")


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    """The value under KEY, or None when there is none."""
    out = ctypes.create_string_buffer(value_size)
    rc = lib().bpf_map_lookup_elem(fd, key, out)
    if rc == -2:  # ENOENT
        return None
    _check(rc, "bpf_map_lookup_elem")
    return out.raw


def map_keys(fd: int, key_size: int) -> Iterator[bytes]:
    """Every key of a hash map (bpf_map_get_next_key from NULL)."""
    current: bytes | None = None
    nxt = ctypes.create_string_buffer(key_size)
    while True:
        rc = lib().bpf_map_get_next_key(fd, current, nxt)
        if rc == -2:
            return
        _check(rc, "bpf_map_get_next_key")
        current = nxt.raw
        yield current


# --- objects, programs, links --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MapInfo:
    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int


class Link:
    """An attached program (bpf_link).  close() destroys our handle: the attachment
    ends with it unless the link was pinned first."""

    def __init__(self, ptr: int, what: str) -> None:
        self._ptr: int | None = ptr
        self.what = what

    def pin(self, path: str) -> None:
        _check(lib().bpf_link__pin(self._require(), _path(path)), f"pin {self.what} at {path}")

    def _require(self) -> int:
        if self._ptr is None:
            raise BpfError(f"{self.what}: link already closed")
        return self._ptr

    def close(self) -> None:
        if self._ptr is not None:
            lib().bpf_link__destroy(self._ptr)
            self._ptr = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    def open_pinned(cls, path: str) -> Link:
        return cls(_pointer(lib().bpf_link__open(_path(path)), f"bpf_link__open({path})"), path)


class BpfObject:
    """An opened (then loaded) BPF ELF object; close() frees the object, its program fds
    and its map fds (pinned maps and links live on in bpffs)."""

    def __init__(self, path: str) -> None:
        lib()
        _LOG.clear()
        ptr = lib().bpf_object__open_file(_path(path), None)
        self._ptr: int | None = _pointer(
            ptr, f"bpf_object__open_file({path})", hint="is the kmodd package complete?"
        )
        self.path = path

    def _require(self) -> int:
        if self._ptr is None:
            raise BpfError(f"{self.path}: object already closed")
        return self._ptr

    def _map(self, name: str) -> int:
        ptr = lib().bpf_object__find_map_by_name(self._require(), name.encode())
        return _pointer(ptr, f"{self.path}: no map {name}")

    def maps(self) -> tuple[MapInfo, ...]:
        """Every map of the object (before or after load)."""
        out, ptr = [], lib().bpf_object__next_map(self._require(), None)
        while ptr:
            out.append(
                MapInfo(
                    name=(lib().bpf_map__name(ptr) or b"").decode(),
                    type=lib().bpf_map__type(ptr),
                    key_size=lib().bpf_map__key_size(ptr),
                    value_size=lib().bpf_map__value_size(ptr),
                    max_entries=lib().bpf_map__max_entries(ptr),
                )
            )
            ptr = lib().bpf_object__next_map(self._require(), ptr)
        return tuple(out)

    def set_pin_path(self, name: str, path: str) -> None:
        """Pin map NAME at PATH at load, or reuse the map already pinned there (libbpf
        checks it is compatible: type, key/value size, entries, flags)."""
        _check(lib().bpf_map__set_pin_path(self._map(name), _path(path)), f"pin path of {name}")

    def load(self) -> None:
        _LOG.clear()
        _check(
            lib().bpf_object__load(self._require()),
            f"loading {self.path} into the kernel",
            hint="the kernel needs CONFIG_BPF_LSM and BTF (/sys/kernel/btf/vmlinux)",
        )

    def map_fd(self, name: str) -> int:
        """The loaded map's fd (owned by the object: do not close it)."""
        return _check(lib().bpf_map__fd(self._map(name)), f"fd of map {name}")

    def attach_lsm(self, program: str) -> Link:
        prog = _pointer(
            lib().bpf_object__find_program_by_name(self._require(), program.encode()),
            f"{self.path}: no program {program}",
        )
        ptr = lib().bpf_program__attach_lsm(prog)
        return Link(_pointer(ptr, f"attaching {program}"), program)

    def close(self) -> None:
        if self._ptr is not None:
            lib().bpf_object__close(self._ptr)
            self._ptr = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- ring buffer ---------------------------------------------------------------------


class RingBuffer:
    """A consumer of a BPF_MAP_TYPE_RINGBUF map: poll() returns the records that arrived.

    One thread only (libbpf's ring_buffer is not thread-safe).  Records are copied out
    inside libbpf's callback, so nothing refers to the mmap'ed ring afterwards.
    """

    def __init__(self, map_fd: int, *, limit: int = 4096) -> None:
        self._records: list[bytes] = []
        self._limit = limit
        self.dropped = 0  # records beyond `limit` in one poll (counted, never kept)
        self._callback = SAMPLE_FN(self._sample)  # kept alive as long as the ring
        ptr = lib().ring_buffer__new(map_fd, self._callback, None, None)
        self._ptr: int | None = _pointer(ptr, "ring_buffer__new")

    def _sample(self, ctx: int | None, data: int | None, size: int) -> int:
        if len(self._records) >= self._limit:
            self.dropped += 1
        elif data:
            self._records.append(ctypes.string_at(data, size))
        return 0

    def _require(self) -> int:
        if self._ptr is None:
            raise BpfError("ring buffer already closed")
        return self._ptr

    def poll(self, timeout_ms: int) -> list[bytes]:
        """Wait up to TIMEOUT_MS (0: do not wait, -1: forever) for records."""
        rc = lib().ring_buffer__poll(self._require(), timeout_ms)
        if rc == -4:  # EINTR: a signal; what was consumed is returned
            rc = 0
        _check(rc, "ring_buffer__poll")
        out, self._records = self._records, []
        return out

    def fileno(self) -> int:
        """An epoll fd that is readable when records wait (for selectors)."""
        return _check(lib().ring_buffer__epoll_fd(self._require()), "ring_buffer__epoll_fd")

    def close(self) -> None:
        if self._ptr is not None:
            lib().ring_buffer__free(self._ptr)
            self._ptr = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def with_fd(path: str, action: Callable[[int], Any]) -> Any:
    """Run ACTION on an fd of the pinned object at PATH, then close the fd."""
    fd = obj_get(path)
    try:
        return action(fd)
    finally:
        os.close(fd)
