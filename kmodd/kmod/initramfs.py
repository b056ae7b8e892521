"""Read an initramfs image without unpacking it: which files it holds, and a few of them.

An initramfs is one or more "newc" cpio archives back to back (the kernel's
usr/gen_init_cpio format, magic 070701/070702), each optionally compressed: Debian's
mkinitramfs writes an uncompressed early archive (CPU microcode) and then the main archive
compressed with zstd (Debian 12 and 13 default), gzip, xz, lzma or lz4; dracut the same
layout.  This reader walks the archives as a stream, keeps every path and the contents of
the few paths asked for, and never writes a file: the image is hostile input like any
other (paths are only compared, never opened).

Decompression: gzip, xz and lzma with the stdlib; zstd (no stdlib module before Python
3.14) through the `zstd` program, run without a shell, its stdin the image itself at the
segment's offset, killed at the deadline.  Bounds: 2 GiB of archive data in total, 1 MiB
per kept file, 200,000 entries (a Debian MODULES=most image has ~4,000 entries and
~100 MiB unpacked), TIMEOUT_S for the whole read.
"""

from __future__ import annotations

import lzma
import os
import shutil
import subprocess
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from kmodd.errors import KmoddError

HEADER = 110  # "070701" + 13 fields of 8 hex digits
MAGICS = (b"070701", b"070702")
TRAILER = "TRAILER!!!"
MAX_TOTAL = 2 << 30
MAX_KEPT = 1 << 20
MAX_ENTRIES = 200_000
MAX_NAME = 4096  # PATH_MAX
TIMEOUT_S = 60.0
CHUNK = 1 << 16
# First bytes of a compressed segment (what the kernel's decompressors recognise).
ZSTD = b"\x28\xb5\x2f\xfd"
GZIP = b"\x1f\x8b"
XZ = b"\xfd7zXZ\x00"
LZMA = b"\x5d\x00\x00"
OTHER = {b"BZh": "bzip2", b"\x02\x21\x4c\x18": "lz4", b"\x89LZO": "lzo"}


class InitramfsError(KmoddError):
    """The image cannot be read (missing, unknown compression, corrupt, too big, too slow)."""


class _Stream(Protocol):
    def read(self, size: int, /) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Image:
    path: str
    segments: tuple[str, ...]  # "cpio" or the compression of each archive, in order
    names: frozenset[str]  # every entry's path, without a leading "./" or "/"
    files: dict[str, bytes]  # the kept paths that exist in the image (regular files)
    reader: str  # how it was read, for reports ("kmodd cpio reader; zstd: /usr/bin/zstd")


@dataclass
class _Walk:
    names: set[str]
    keep: frozenset[str]
    keep_dirs: tuple[str, ...]
    files: dict[str, bytes]
    total: int = 0


def read_image(path: Path, keep: Iterable[str] = (), timeout_s: float = TIMEOUT_S) -> Image:
    """Every path in the initramfs at PATH, and the contents of the regular files KEEP
    names (an entry ending in "/" keeps every file below that directory)."""
    keep = tuple(keep)
    wanted = frozenset(p.strip("/") for p in keep if not p.endswith("/"))
    dirs = tuple(p.strip("/") + "/" for p in keep if p.endswith("/"))
    walk = _Walk(set(), wanted, dirs, {})
    segments: list[str] = []
    deadline = time.monotonic() + timeout_s
    tools: list[str] = []
    try:
        with path.open("rb") as image:
            _walk_image(image, walk, segments, tools, deadline)
    except OSError as err:
        raise InitramfsError(f"cannot read initramfs {path}: {err.strerror or err}") from err
    reader = "kmodd cpio reader (stdlib gzip/xz/lzma" + "".join(f"; {t}" for t in tools) + ")"
    return Image(str(path), tuple(segments), frozenset(walk.names), walk.files, reader)


def _walk_image(
    image: BinaryIO, walk: _Walk, segments: list[str], tools: list[str], deadline: float
) -> None:
    while True:
        offset = _skip_zeros(image)
        head = image.read(6)
        if not head:
            return
        image.seek(offset)
        if head in MAGICS:
            segments.append("cpio")
            _archive(image, walk, deadline)  # leaves the file just past the trailer
            continue
        kind = _compression(head)
        segments.append(kind)
        if kind == "zstd":
            tools.append(f"zstd: {_zstd_path(image.name)}")
            _zstd(image, walk, deadline)
        else:
            _archives_in(_Decompressed(image, _decompressor(kind)), walk, deadline)
        return  # a compressed segment runs to the end of the image (as mkinitramfs writes)


def _skip_zeros(image: BinaryIO) -> int:
    """Skip the NUL padding between archives; the offset of the next byte."""
    while True:
        offset = image.tell()
        chunk = image.read(512)
        stripped = chunk.lstrip(b"\0")
        if not chunk or stripped:
            image.seek(offset + len(chunk) - len(stripped))
            return image.tell()


def _compression(head: bytes) -> str:
    if head.startswith(ZSTD):
        return "zstd"
    if head.startswith(GZIP):
        return "gzip"
    if head.startswith(XZ):
        return "xz"
    if head.startswith(LZMA):
        return "lzma"
    for magic, name in OTHER.items():
        if head.startswith(magic):
            raise InitramfsError(f"{name}-compressed initramfs: not supported by this reader")
    raise InitramfsError(f"not an initramfs: unknown data {head.hex()} where an archive starts")


def _decompressor(kind: str) -> Callable[[bytes], bytes]:
    if kind == "gzip":
        return zlib.decompressobj(wbits=31).decompress
    fmt = lzma.FORMAT_XZ if kind == "xz" else lzma.FORMAT_ALONE
    return lzma.LZMADecompressor(format=fmt).decompress


class _Decompressed:
    """A read(n) stream over a compressed segment of IMAGE."""

    def __init__(self, image: BinaryIO, decompress: Callable[[bytes], bytes]) -> None:
        self._image = image
        self._decompress = decompress
        self._buf = bytearray()
        self._eof = False

    def read(self, size: int, /) -> bytes:
        while len(self._buf) < size and not self._eof:
            chunk = self._image.read(CHUNK)
            if not chunk:
                self._eof = True
                break
            try:
                self._buf += self._decompress(chunk)
            except (zlib.error, lzma.LZMAError, EOFError) as err:
                raise InitramfsError(f"corrupt compressed initramfs: {err}") from err
        out = bytes(self._buf[:size])
        del self._buf[:size]
        return out


def _zstd_path(image_name: object) -> str:
    found = shutil.which("zstd")
    if found is None:
        raise InitramfsError(
            f"{image_name} is zstd-compressed and there is no zstd program",
            hint="install zstd (Debian: apt-get install zstd)",
        )
    return found


def _zstd(image: BinaryIO, walk: _Walk, deadline: float) -> None:
    argv = [_zstd_path(image.name), "-dcq"]
    # stdin is the image's own fd at the segment's offset: nothing is copied through us.
    # The buffered reader's seek may stay inside its buffer: set the fd's offset itself.
    os.lseek(image.fileno(), image.tell(), os.SEEK_SET)
    with subprocess.Popen(
        argv, stdin=image, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as proc:
        timer = threading.Timer(max(deadline - time.monotonic(), 0.1), proc.kill)
        timer.start()
        try:
            assert proc.stdout is not None
            _archives_in(proc.stdout, walk, deadline)
            proc.kill()  # done reading: the rest (padding) does not matter
        finally:
            timer.cancel()
    if time.monotonic() > deadline:
        raise InitramfsError(f"reading {image.name} took longer than the deadline")


def _archives_in(stream: _Stream, walk: _Walk, deadline: float) -> None:
    """One or more archives back to back in a decompressed stream."""
    while True:
        head = _skip_zero_stream(stream)
        if not head:
            return
        if head not in MAGICS:
            raise InitramfsError(f"corrupt initramfs: no cpio archive where one starts ({head!r})")
        _entries(stream, walk, deadline, head)


def _skip_zero_stream(stream: _Stream) -> bytes:
    """The next 6 bytes after NUL padding (4-byte units, as archives are aligned)."""
    while True:
        block = stream.read(2)
        if not block:
            return b""
        if block != b"\0\0":
            return block + _exact(stream, 4)


def _archive(image: BinaryIO, walk: _Walk, deadline: float) -> None:
    _entries(image, walk, deadline, _exact(image, 6))


def _entries(stream: _Stream, walk: _Walk, deadline: float, magic: bytes) -> None:
    """Entries of one archive, MAGIC already read, up to and including the trailer."""
    while True:
        if magic not in MAGICS:
            raise InitramfsError(f"corrupt initramfs: bad cpio magic {magic!r}")
        fields = _exact(stream, HEADER - 6)
        try:
            mode, size, namesize = (int(fields[i * 8 : i * 8 + 8], 16) for i in (1, 6, 11))
        except ValueError as err:
            raise InitramfsError("corrupt initramfs: a cpio header is not hex") from err
        if not 0 < namesize <= MAX_NAME:
            raise InitramfsError(f"corrupt initramfs: a name of {namesize} bytes")
        raw = _exact(stream, namesize + _pad(HEADER + namesize))
        name = raw[: namesize - 1].decode("utf-8", "replace").lstrip(".").strip("/")
        if name == TRAILER:
            return
        _count(walk, size, deadline)
        if name:  # the archive's "." entry
            walk.names.add(name)
        kept = name in walk.keep or name.startswith(walk.keep_dirs)
        data = _data(stream, size, keep=kept and mode & 0o170000 == 0o100000)
        if data is not None:
            walk.files[name] = data
        magic = _exact(stream, 6)


def _count(walk: _Walk, size: int, deadline: float) -> None:
    walk.total += size
    if len(walk.names) >= MAX_ENTRIES or walk.total > MAX_TOTAL:
        raise InitramfsError("initramfs too big for this reader (bounded: 2 GiB, 200,000 entries)")
    if time.monotonic() > deadline:
        raise InitramfsError("reading the initramfs took longer than the deadline")


def _data(stream: _Stream, size: int, *, keep: bool) -> bytes | None:
    kept = bytearray()
    left = size + _pad(size)
    while left:
        chunk = stream.read(min(left, CHUNK))
        if not chunk:
            raise InitramfsError("corrupt initramfs: an archive ends inside a file")
        if keep and len(kept) < MAX_KEPT:
            kept += chunk
        left -= len(chunk)
    return bytes(kept[:size]) if keep and size <= MAX_KEPT else None


def _pad(n: int) -> int:
    return (4 - n % 4) % 4


def _exact(stream: _Stream, size: int) -> bytes:
    out = b""
    while len(out) < size:
        chunk = stream.read(size - len(out))
        if not chunk:
            raise InitramfsError("corrupt initramfs: an archive ends inside a header")
        out += chunk
    return out


def image_path(root: Path, release: str) -> Path | None:
    """The initramfs the boot loader loads for RELEASE: Debian's initramfs-tools name, then
    dracut's (Fedora, RHEL, Debian with dracut), then Arch's; None if none exists."""
    for name in (f"initrd.img-{release}", f"initramfs-{release}.img", "initramfs-linux.img"):
        candidate = root / "boot" / name
        if candidate.is_file():
            return candidate
    return None


def module_names(image: Image, release: str) -> frozenset[str]:
    """Modules (normalized: '-' → '_') whose .ko (any compression) the image carries for
    RELEASE, under lib/modules or usr/lib/modules."""
    found = set()
    prefixes = (f"lib/modules/{release}/", f"usr/lib/modules/{release}/")
    for name in image.names:
        if not name.startswith(prefixes):
            continue
        base = name.rsplit("/", 1)[-1]
        stem, dot, _ext = base.partition(".ko")
        if dot and stem:
            found.add(stem.replace("-", "_"))
    return frozenset(found)


POLICY_RECORD = "usr/lib/kmodd/initramfs-policy"  # written by initramfs/kmodd-initramfs


@dataclass(frozen=True, slots=True)
class PolicyRecord:
    """What the current initramfs says about kmodd's policy in it."""

    path: str | None  # the image; None: there is none for the release
    policy_hash: str | None  # None: the image has no kmodd record (built without the hook)
    error: str | None = None  # the image could not be read

    def current(self, policy_hash: str) -> bool:
        return self.error is None and self.policy_hash == policy_hash


# The last image read, by (path, size, mtime_ns): an initramfs changes only when it is
# rebuilt, and reading a Debian MODULES=most image (~30 MB zstd) costs ~0.3 s.
_last: tuple[tuple[str, int, int], PolicyRecord] | None = None


def policy_record(root: Path, release: str) -> PolicyRecord:
    """The policy hash kmodd's hook recorded in ROOT's initramfs for RELEASE."""
    global _last  # noqa: PLW0603 -- one slot per process, see above
    path = image_path(root, release)
    if path is None:
        return PolicyRecord(None, None)
    try:
        st = path.stat()
    except OSError as err:
        return PolicyRecord(str(path), None, err.strerror)
    key = (str(path), st.st_size, st.st_mtime_ns)
    if _last is not None and _last[0] == key:
        return _last[1]
    try:
        image = read_image(path, keep=[POLICY_RECORD])
    except InitramfsError as err:
        return PolicyRecord(str(path), None, err.message)
    lines = image.files.get(POLICY_RECORD, b"").decode(errors="replace").splitlines()
    found = next((ln[5:] for ln in lines if ln.startswith("hash ")), None)
    record = PolicyRecord(str(path), found)
    _last = (key, record)
    return record
