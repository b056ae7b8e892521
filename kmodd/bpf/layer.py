"""The kernel layer's lifetime: load and pin (or adopt what is pinned), fill the tables
per generation, read the ring buffer, uninstall.

Everything lives under PIN_DIR in bpffs, so enforcement outlives the process that loaded
it (a daemon killed with SIGKILL, stopped or restarted): the three links keep the
programs attached, the maps keep the last generation's tables.  A new process adopts the
pins (fds from bpf_obj_get); only `uninstall` (unpinning) ends enforcement.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from kmodd.bpf import layout, libbpf
from kmodd.bpf.layout import FileIdentity, KernelEvent, Mode, NameRules, Stat, Verdict
from kmodd.bpf.libbpf import BpfError, MapType

PIN_DIR = Path("/sys/fs/bpf/kmodd")
OBJECT = Path(__file__).with_name("kmodd.bpf.o")
BPF_FS_MAGIC = 0xCAFE4A11
# program name -> link pin name
PROGRAMS = {
    "kmodd_request": "link_request",
    "kmodd_read_file": "link_read_file",
    "kmodd_load_data": "link_load_data",
}
MAPS = ("kmodd_config", "kmodd_names", "kmodd_files", "kmodd_events", "kmodd_stats")
_ZERO = bytes(4)


def object_path() -> Path:
    if not OBJECT.exists():
        raise BpfError(
            f"{OBJECT} is missing",
            hint="a checkout builds it with `make bpf` (clang, libbpf-dev); packages ship it",
        )
    return OBJECT


def _require_bpffs(pin_dir: Path) -> None:
    """pin_dir's parent must be a bpffs (systemd mounts one at /sys/fs/bpf)."""
    parent = pin_dir.parent
    try:
        # os.statvfs has no f_type; read /proc/self/mounts instead.
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError as err:
        raise BpfError(f"cannot read /proc/self/mounts: {err}") from err
    if not any(
        len(f) > 2 and f[1] == str(parent) and f[2] == "bpf" for f in (m.split() for m in mounts)
    ):
        raise BpfError(
            f"{parent} is not a bpf filesystem",
            hint=f"mount -t bpf bpf {parent} (systemd does this at boot)",
        )


@dataclass(frozen=True, slots=True)
class Tables:
    """One generation of the kernel layer's input."""

    names: dict[str, NameRules]
    files: tuple[tuple[FileIdentity, int], ...]  # denied module files and their rule
    mode: Mode
    load_data: Verdict  # init_module from memory (no file identity: all or nothing)
    generation: int


class KernelLayer:
    """Open fds on the pinned maps.  close() releases them (enforcement stays)."""

    def __init__(self, pin_dir: Path, fds: dict[str, int], *, adopted: bool) -> None:
        self.pin_dir = pin_dir
        self._fds = fds
        self.adopted = adopted  # True: the pins were there already

    # --- getting one -------------------------------------------------------------------

    @classmethod
    def pinned(cls, pin_dir: Path = PIN_DIR) -> bool:
        return all((pin_dir / name).exists() for name in (*MAPS, *PROGRAMS.values()))

    @classmethod
    def adopt(cls, pin_dir: Path = PIN_DIR) -> KernelLayer:
        """The layer some earlier process pinned (BpfError if it is not all there)."""
        fds: dict[str, int] = {}
        try:
            for name in PROGRAMS.values():  # each link must still be there
                os.close(libbpf.obj_get(str(pin_dir / name)))
            for name in MAPS:
                fds[name] = libbpf.obj_get(str(pin_dir / name))
        except BpfError:
            for fd in fds.values():
                os.close(fd)
            raise
        return cls(pin_dir, fds, adopted=True)

    @classmethod
    def load_or_adopt(cls, pin_dir: Path = PIN_DIR, obj: Path | None = None) -> KernelLayer:
        """Adopt the pinned layer, or load the object, attach and pin it."""
        if cls.pinned(pin_dir):
            return cls.adopt(pin_dir)
        return cls.install(pin_dir, obj)

    @classmethod
    def install(cls, pin_dir: Path = PIN_DIR, obj: Path | None = None) -> KernelLayer:
        """Load OBJ, pin its maps (reusing compatible pinned ones), attach its programs
        and pin the links, replacing earlier link pins."""
        _require_bpffs(pin_dir)
        pin_dir.mkdir(mode=0o700, exist_ok=True)
        with libbpf.BpfObject(str(obj or object_path())) as bpf:
            for name in MAPS:
                bpf.set_pin_path(name, str(pin_dir / name))
            bpf.load()
            for program, pin in PROGRAMS.items():
                # The new link is attached (our handle holds it) before the old pin goes,
                # so there is no moment without a program; bpffs has no rename.
                with bpf.attach_lsm(program) as link:
                    with contextlib.suppress(FileNotFoundError):
                        (pin_dir / pin).unlink()
                    link.pin(str(pin_dir / pin))
        layer = cls.adopt(pin_dir)
        layer.adopted = False
        return layer

    @staticmethod
    def uninstall(pin_dir: Path = PIN_DIR) -> list[str]:
        """Unpin everything: the programs detach once no process holds their links.
        Returns what was removed."""
        removed = []
        for name in (*PROGRAMS.values(), *MAPS):
            with contextlib.suppress(FileNotFoundError):
                (pin_dir / name).unlink()
                removed.append(name)
        with contextlib.suppress(FileNotFoundError, OSError):
            pin_dir.rmdir()
        return removed

    # --- using it ----------------------------------------------------------------------

    def fd(self, name: str) -> int:
        if name not in self._fds:
            raise BpfError(f"kernel layer {self.pin_dir}: closed or no map {name}")
        return self._fds[name]

    def apply(self, tables: Tables) -> None:
        """Swap in one generation: new inner tables, each switched in with one pointer
        store, then the mode and generation number."""
        self._swap("kmodd_names", layout.names_table(tables.names), layout.NameKeyC)
        self._swap("kmodd_files", layout.files_table(tables.files), layout.FileKeyC)
        self.set_config(tables.mode, tables.load_data, tables.generation)

    def set_config(self, mode: Mode, load_data: Verdict, generation: int) -> None:
        value = layout.encode_config(mode, load_data, generation)
        libbpf.map_update(self.fd("kmodd_config"), _ZERO, value)

    def config(self) -> layout.ConfigC:
        raw = libbpf.map_lookup(self.fd("kmodd_config"), _ZERO, ctypes.sizeof(layout.ConfigC))
        return layout.ConfigC.from_buffer_copy(raw or bytes(ctypes.sizeof(layout.ConfigC)))

    def _swap(
        self, outer: str, rows: list[tuple[bytes, bytes]], key_type: type[ctypes.Structure]
    ) -> None:
        value_type = layout.NameEntryC if key_type is layout.NameKeyC else layout.FileEntryC
        inner = libbpf.map_create(
            MapType.HASH,
            outer[:15],  # BPF_OBJ_NAME_LEN 16
            ctypes.sizeof(key_type),
            ctypes.sizeof(value_type),
            max(1, len(rows)),
        )
        try:
            for key, value in rows:
                libbpf.map_update(inner, key, value)
            libbpf.map_update(self.fd(outer), _ZERO, inner.to_bytes(4, "little"))
        finally:
            os.close(inner)  # the outer map holds the new table; the old one is freed

    def stats(self) -> dict[Stat, int]:
        """Counters summed over CPUs."""
        ncpu = _possible_cpus()
        out = {}
        for stat in Stat:
            raw = libbpf.map_lookup(self.fd("kmodd_stats"), stat.to_bytes(4, "little"), 8 * ncpu)
            values = raw or bytes(8 * ncpu)
            out[stat] = sum(
                int.from_bytes(values[i : i + 8], "little") for i in range(0, len(values), 8)
            )
        return out

    def events(self) -> EventReader:
        return EventReader(self.fd("kmodd_events"))

    def close(self) -> None:
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventReader:
    """The ring buffer as KernelEvent values (one thread; close() when done)."""

    def __init__(self, map_fd: int) -> None:
        self._ring = libbpf.RingBuffer(map_fd)

    def read(self, timeout_ms: int) -> list[KernelEvent]:
        return [KernelEvent.decode(raw) for raw in self._ring.poll(timeout_ms)]

    def fileno(self) -> int:
        return self._ring.fileno()

    def close(self) -> None:
        self._ring.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _possible_cpus() -> int:
    """Per-CPU map values have one slot per possible CPU (/sys/devices/system/cpu/possible)."""
    try:
        text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    except OSError as err:
        raise BpfError(
            f"cannot read the possible CPUs: {err}", errno=err.errno or errno.EIO
        ) from err
    return parse_cpu_list(text)


def parse_cpu_list(text: str) -> int:
    """'0-3,6' -> 5: the kernel copies one value per possible CPU (bpf_percpu_*_copy)."""
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count


def denied_files(paths: Iterable[tuple[str, int]]) -> tuple[tuple[FileIdentity, int], ...]:
    """File identities of denied module files; files that vanished are skipped."""
    out = []
    for path, rule in paths:
        with contextlib.suppress(FileNotFoundError):
            out.append((FileIdentity.of(path), rule))
    return tuple(out)
