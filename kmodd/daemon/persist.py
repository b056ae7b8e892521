"""The last-good store: the newest published generation, kept outside /run.

ROOT/var/lib/kmodd/last-good/ holds the rendered modprobe.d file and the helper snapshot
under content-addressed names, and a sealed manifest naming them (format, digest and
verification: kmodd/bootpublish.py, shared with the boot step).  Written only after a
generation was built and published; payloads first, the manifest last (one rename), stale
payloads pruned after: a crash at any point leaves the old manifest with its old files.
The manifest's seal and per-file sha256 catch a torn or edited store; they are no defence
against root, who may write the store (docs/operations.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

from kmodd import __version__, bootpublish
from kmodd.atomic import write_atomic
from kmodd.errors import KmoddError
from kmodd.paths import Paths

STORE_MODE = 0o700  # the snapshot says what the policy denies: root only, like /run/kmodd


class StoreError(KmoddError):
    """The last-good store is torn, tampered with or unsafe."""


@dataclass(frozen=True, slots=True)
class Inputs:
    """What a generation is built from (bootpublish.INPUTS), digested before the build."""

    parts: dict[str, str]
    module_dir: str  # relative to the root

    @property
    def digest(self) -> str:
        return bootpublish.combined(self.parts)


@dataclass(frozen=True, slots=True)
class Stored:
    number: int
    hash: str
    policy_hash: str
    release: str
    created: float
    inputs: Inputs
    policy_dirs: tuple[str, ...]  # dirs that held policy files (relative to the root)
    files: dict[str, tuple[str, str, int]]


def inputs(paths: Paths, cmdline: Path) -> Inputs:
    module_dir = os.path.relpath(paths.module_dir, paths.root)
    parts = bootpublish.input_digests(str(paths.root), paths.release, module_dir, str(cmdline))
    return Inputs(parts, module_dir)


def load(paths: Paths) -> Stored | None:
    """The verified manifest (payloads are checked by payloads()); None: no store yet."""
    try:
        found = bootpublish.read_manifest(str(paths.store_dir))
    except (bootpublish.StoreError, OSError) as err:
        raise StoreError(
            f"refused the last-good store {paths.store_dir}: {err}",
            hint=f"the next good generation rewrites it; or remove {paths.store_dir}",
        ) from None
    if found is None:
        return None
    fields, files = found
    parts = {k: fields.get(f"input {k}", "") for k in bootpublish.INPUTS}
    try:
        created = float(fields.get("created", "0"))
    except ValueError:
        created = 0.0
    return Stored(
        number=int(fields["generation"]),
        hash=fields["hash"],
        policy_hash=fields.get("policy_hash", ""),
        release=fields["release"],
        created=created,
        inputs=Inputs(parts, fields["module_dir"]),
        policy_dirs=tuple(fields.get("policy_dirs", "").split()),
        files=files,
    )


def payloads(paths: Paths, stored: Stored) -> dict[str, bytes]:
    """{"enforcement": ..., "snapshot": ...}, each checked against the manifest."""
    try:
        return bootpublish.read_payloads(str(paths.store_dir), stored.files)
    except (bootpublish.StoreError, OSError) as err:
        raise StoreError(f"refused the last-good store {paths.store_dir}: {err}") from None


@dataclass(frozen=True, slots=True)
class Record:
    """One generation to persist (what Generation holds, plus how it was built)."""

    number: int
    hash: str
    policy_hash: str
    mode: str
    enforcement: bytes
    snapshot: bytes
    policy_dirs: tuple[str, ...]
    kernel_modprobe: str | None  # the helper, when the daemon points kernel.modprobe at it


def _store_dir(paths: Paths) -> Path:
    store = paths.store_dir
    for parent in reversed(store.parents):
        if parent.is_relative_to(paths.root) and not parent.exists():
            parent.mkdir(mode=0o755)
    with contextlib.suppress(FileExistsError):
        store.mkdir(mode=STORE_MODE)
    why = bootpublish.unsafe_path(str(store))
    if why is not None:
        raise StoreError(f"not persisting to {store}: {why}", hint="chown root, chmod go-w")
    return store


def save(paths: Paths, record: Record, built_from: Inputs) -> Path:
    """Write the store for RECORD (built from BUILT_FROM); returns the manifest path."""
    store = _store_dir(paths)
    files = {}
    for kind, data, name in (
        ("enforcement", record.enforcement, "enforcement.{}.conf"),
        ("snapshot", record.snapshot, "snapshot.{}"),
    ):
        sha = hashlib.sha256(data).hexdigest()
        files[kind] = (name.format(sha[:16]), sha, len(data))
        write_atomic(store / files[kind][0], data, mode=0o600)
    fields = {
        "generation": str(record.number),
        "hash": record.hash,
        "policy_hash": record.policy_hash,
        "mode": record.mode,
        "release": paths.release,
        "module_dir": built_from.module_dir,
        "created": f"{time.time():.3f}",
        "kmodd_version": __version__,
        "kernel_modprobe": record.kernel_modprobe or "-",
        "policy_dirs": " ".join(record.policy_dirs),
        **{f"input {k}": built_from.parts[k] for k in bootpublish.INPUTS},
        "inputs": built_from.digest,
    }
    manifest = store / bootpublish.MANIFEST
    write_atomic(manifest, bootpublish.format_manifest(fields, files), mode=0o600)
    keep = {name for name, _, _ in files.values()} | {bootpublish.MANIFEST}
    for entry in store.iterdir():
        if entry.name not in keep and entry.name.startswith(("enforcement.", "snapshot.")):
            entry.unlink(missing_ok=True)
    return manifest
