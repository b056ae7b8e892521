"""A real Debian kernel tree to test against, built once per machine.

`ensure_kernel_tree()` finds the `linux-image-6.1.0-NN-amd64` package that Debian's
`linux-image-amd64` currently depends on, downloads it with `apt-get download`,
extracts it with `dpkg-deb -x` and indexes it with `depmod -b`, into the git-ignored
`.cache/kernel/<package>_<version>/root` under the repository root.  About 70 MB
download, ~4,000 modules, ~26,000 aliases; a build takes ~30-60 s, a cached hit ~0.1 s
(one `apt-cache` call to learn the current version).

Concurrency: an flock on `.cache/kernel/.lock` serializes builders (parallel pytest
sessions, `make kernel-tree`); a tree is built in a temporary directory and renamed
into place, so a half-built tree is never visible.

`python -m tests.kerneltree` prints the root (the Makefile target `kernel-tree`).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE_ENV = "KMODD_KERNEL_CACHE"
META_PACKAGE = "linux-image-amd64"
APT_LISTS = "/var/lib/apt/lists"
MEMO = "current"
# The modprobe.d dirs kmod reads (kmodd.paths.MODPROBE_D_DIRS), created empty in the tree
# so `--root TREE` behaves like a clean system.
EMPTY_DIRS = (
    "etc/modprobe.d",
    "run/modprobe.d",
    "usr/local/lib/modprobe.d",
    "usr/lib/modprobe.d",
    "lib/modprobe.d",
)


class KernelTreeError(RuntimeError):
    """The tree cannot be built (no apt lists, no network to the Debian mirror, ...)."""


@dataclass(frozen=True, slots=True)
class KernelTree:
    root: Path  # ROOT: lib/modules/RELEASE and boot/vmlinuz-RELEASE live under it
    release: str
    vmlinuz: Path

    @property
    def module_dir(self) -> Path:
        return self.root / "lib/modules" / self.release


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or REPO_ROOT / ".cache/kernel")


def _run(argv: list[str], *, cwd: Path | None = None) -> str:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise KernelTreeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def _apt_update() -> None:
    _run(["apt-get", "update", "-qq"])


def _image_package() -> tuple[str, str]:
    """(package, candidate version) of the kernel image linux-image-amd64 depends on."""
    for attempt in range(2):
        try:
            depends = _run(["apt-cache", "depends", META_PACKAGE])
            images = [
                line.split(":", 1)[1].strip()
                for line in depends.splitlines()
                if line.strip().startswith("Depends:") and "linux-image-" in line
            ]
            if images:
                package = images[0]
                version = _candidate_version(package)
                if version:
                    return package, version
        except KernelTreeError:
            if attempt:
                raise
        if attempt == 0:
            _apt_update()
    raise KernelTreeError(f"cannot find the kernel image package {META_PACKAGE} depends on")


def _candidate_version(package: str) -> str | None:
    for line in _run(["apt-cache", "policy", package]).splitlines():
        key, _, value = line.strip().partition(":")
        if key == "Candidate" and value.strip() not in ("", "(none)"):
            return value.strip()
    return None


def _tree_from(root: Path) -> KernelTree:
    releases = sorted(p.name for p in (root / "lib/modules").iterdir() if p.is_dir())
    if len(releases) != 1:
        raise KernelTreeError(f"expected one release under {root}/lib/modules, got {releases}")
    release = releases[0]
    return KernelTree(root=root, release=release, vmlinuz=root / "boot" / f"vmlinuz-{release}")


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _download(package: str, version: str, into: Path) -> Path:
    spec = f"{package}={version}"
    try:
        _run(["apt-get", "download", "-qq", spec], cwd=into)
    except KernelTreeError:
        _apt_update()  # stale lists point at a version the mirror no longer has
        _run(["apt-get", "download", "-qq", spec], cwd=into)
    debs = sorted(into.glob(f"{package}_*.deb"))
    if not debs:
        raise KernelTreeError(f"apt-get download {spec} produced no .deb in {into}")
    return debs[0]


def _build(package: str, version: str, final: Path) -> None:
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=final.parent))
    try:
        # apt's _apt sandbox user must be able to write the download dir.
        work.chmod(0o755)
        deb = _download(package, version, work)
        root = work / "tree" / "root"
        root.mkdir(parents=True)
        _run(["dpkg-deb", "-x", str(deb), str(root)])
        deb.unlink()
        for rel in EMPTY_DIRS:
            (root / rel).mkdir(parents=True, exist_ok=True)
        tree = _tree_from(root)
        _run(["depmod", "-b", str(root), tree.release])
        (work / "tree").rename(final)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _existing_tree(directory: Path) -> Path | None:
    """Newest complete tree in the cache: the offline fallback when apt cannot answer."""
    trees = sorted(directory.glob("linux-image-*/root"), key=lambda p: p.stat().st_mtime)
    return trees[-1] if trees else None


def _lists_stamp() -> str:
    """Changes whenever `apt-get update` rewrites the package lists."""
    try:
        return str(Path(APT_LISTS).stat().st_mtime_ns)
    except OSError:
        return "none"


def _memo_lookup(directory: Path) -> tuple[str, str] | None:
    """The last apt answer, if the apt lists have not changed since (apt-cache costs ~3 s)."""
    try:
        package, version, stamp = (directory / MEMO).read_text().split()
    except (OSError, ValueError):
        return None
    return (package, version) if stamp == _lists_stamp() else None


def _current_package(directory: Path) -> tuple[str, str]:
    memo = _memo_lookup(directory)
    if memo is not None:
        return memo
    package, version = _image_package()
    (directory / MEMO).write_text(f"{package} {version} {_lists_stamp()}\n")
    return package, version


def ensure_kernel_tree() -> KernelTree:
    """The cached tree of Debian's current kernel image; built on first use."""
    directory = cache_dir()
    with _locked(directory):
        # Holding the lock, no build is running: a .build-* left here was killed midway.
        for stale in directory.glob(".build-*"):
            shutil.rmtree(stale, ignore_errors=True)
        try:
            package, version = _current_package(directory)
        except KernelTreeError:
            fallback = _existing_tree(directory)
            if fallback is None:
                raise
            return _tree_from(fallback)
        final = directory / f"{package}_{version}"
        if not (final / "root").is_dir():
            _build(package, version, final)
        return _tree_from(final / "root")


def main() -> int:
    try:
        tree = ensure_kernel_tree()
    except KernelTreeError as err:
        print(f"kerneltree: {err}", file=sys.stderr)
        return 1
    print(tree.root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
