"""Atomic file replacement for the files other programs read while we write them: the one
writer of kmodd (enforcement file, snapshot, kernel.modprobe memo, installed files).

The helper reads the snapshot and modprobe reads the enforcement file at any instant, so
they must only ever see the old or the new content: write a temp file in the same
directory (O_EXCL | O_NOFOLLOW), fsync it, rename it over the target, fsync the directory.
The directory is opened with O_NOFOLLOW and every name is resolved relative to that fd, so
a symlink planted at the directory or the temp name is refused, never followed.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import stat
from pathlib import Path

from kmodd.errors import KmoddError

_counter = itertools.count()
Owner = tuple[int, int]  # uid, gid


class UnsafePathError(KmoddError):
    """A directory we write into is a symlink or not a directory."""


def open_dir(path: Path, *, create: bool = False) -> int:
    if create:
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o755, parents=False)
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as err:
        raise UnsafePathError(
            f"cannot use directory {path}: {err.strerror}", hint="it must be a real directory"
        ) from None


def _same_file(dir_fd: int, name: str, data: bytes, mode: int, owner: Owner | None) -> bool:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or stat.S_IMODE(st.st_mode) != mode:
            return False
        if owner is not None and (st.st_uid, st.st_gid) != owner:
            return False
        return os.read(fd, len(data) + 1) == data
    finally:
        os.close(fd)


def write_atomic(
    path: Path,
    data: bytes,
    *,
    mode: int = 0o644,
    create_dir: bool = False,
    owner: Owner | None = None,
) -> bool:
    """Replace PATH with DATA (MODE, OWNER uid/gid when given) atomically; False (and no
    write) when it already holds exactly that, which keeps a watcher of PATH's directory
    from seeing our own unchanged rewrites."""
    dir_fd = open_dir(path.parent, create=create_dir)
    try:
        if _same_file(dir_fd, path.name, data, mode, owner):
            return False
        tmp = f".{path.name}.{os.getpid()}.{next(_counter)}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, mode, dir_fd=dir_fd)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if owner is not None:
                os.fchown(fd, *owner)
            os.fchmod(fd, mode)  # the umask must not narrow what the helper/modprobe read
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp, dir_fd=dir_fd)
            raise
        os.close(fd)
        os.rename(tmp, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        os.fsync(dir_fd)
        return True
    finally:
        os.close(dir_fd)
