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

A second tree comes from Debian 13 "trixie" (`ensure_trixie_tree()`): the kernel image
`linux-image-amd64` depends on there (6.12, `.ko.xz` modules under usr/lib/modules, no
lib/modules), fetched through a private apt configuration (`TrixieApt`: its own
sources.list, lists and caches under `.cache/apt-trixie`, so the host's apt state is never
touched).  The same configuration fetches trixie's kmod 34.2 userland (`ensure_kmod34()`:
kmod and the libraries it links, extracted, run through trixie's own ld.so), so kmod 34's
behaviour is tested on this Debian 12 machine without a chroot.

`python -m tests.kerneltree` builds all three and prints the roots (the Makefile target
`kernel-tree`; CI runs it).
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
    root: Path  # ROOT: (usr/)lib/modules/RELEASE and boot/vmlinuz-RELEASE live under it
    release: str
    vmlinuz: Path

    @property
    def module_dir(self) -> Path:
        return _module_base(self.root) / "lib/modules" / self.release

    @property
    def dirname(self) -> Path:
        """What `modprobe -d` / `depmod -b` take: ROOT, or ROOT/usr for a tree whose
        modules live in usr/lib/modules only (kmod 30 and Debian's kmod 34.2 both look in
        DIRNAME/lib/modules)."""
        return _module_base(self.root)

    def module_file(self, stem: str) -> Path:
        """The real file of module STEM ("net/llc/llc") under kernel/: `.ko` on Debian 12,
        `.ko.xz` on Debian 13 (6.12), whichever this tree ships."""
        return module_file(self.module_dir, stem)


# What kmod accepts as a module file (libkmod: .ko, .ko.gz, .ko.xz, .ko.zst).
MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


def module_file(module_dir: Path, stem: str) -> Path:
    """MODULE_DIR/kernel/STEM plus the one module suffix that exists there."""
    for suffix in MODULE_SUFFIXES:
        path = module_dir / "kernel" / f"{stem}{suffix}"
        if path.is_file():
            return path
    raise KernelTreeError(f"no module file kernel/{stem}.ko* under {module_dir}")


def _module_base(root: Path) -> Path:
    return root if (root / "lib/modules").is_dir() else root / "usr"


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
    base = _module_base(root) / "lib/modules"
    releases = sorted(p.name for p in base.iterdir() if p.is_dir())
    if len(releases) != 1:
        raise KernelTreeError(f"expected one release under {base}, got {releases}")
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


def _download(package: str, version: str, into: Path, apt: TrixieApt | None = None) -> Path:
    spec = f"{package}={version}"
    opts = apt.options() if apt is not None else []
    try:
        _run(["apt-get", *opts, "download", "-qq", spec], cwd=into)
    except KernelTreeError:
        # stale lists point at a version the mirror no longer has
        apt.update() if apt is not None else _apt_update()
        _run(["apt-get", *opts, "download", "-qq", spec], cwd=into)
    debs = sorted(into.glob(f"{package}_*.deb"))
    if not debs:
        raise KernelTreeError(f"apt-get download {spec} produced no .deb in {into}")
    return debs[0]


def _build(package: str, version: str, final: Path, apt: TrixieApt | None = None) -> None:
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=final.parent))
    try:
        # apt's _apt sandbox user must be able to write the download dir.
        work.chmod(0o755)
        deb = _download(package, version, work, apt)
        root = work / "tree" / "root"
        root.mkdir(parents=True)
        _run(["dpkg-deb", "-x", str(deb), str(root)])
        deb.unlink()
        for rel in EMPTY_DIRS:
            (root / rel).mkdir(parents=True, exist_ok=True)
        tree = _tree_from(root)
        _run(["depmod", "-b", str(tree.dirname), tree.release])
        (work / "tree").rename(final)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _existing_tree(directory: Path, pattern: str = "linux-image-*/root") -> Path | None:
    """Newest complete tree in the cache: the offline fallback when apt cannot answer."""
    trees = sorted(directory.glob(pattern), key=lambda p: p.stat().st_mtime)
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


# --- Debian 13 "trixie": a private apt configuration ------------------------------

TRIXIE_MIRROR = "http://deb.debian.org/debian"
TRIXIE_DIR = "trixie"  # under cache_dir(): the apt state, the kernel tree, kmod 34
# trixie's kmod and what its binary links (ldd in a trixie chroot: libcrypto, libz,
# libzstd, libc; liblzma is dlopen'ed for .ko.xz); libc6 brings trixie's own ld.so.
KMOD34_PACKAGES = ("kmod", "libc6", "libssl3t64", "zlib1g", "libzstd1", "liblzma5")
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


@dataclass(frozen=True, slots=True)
class TrixieApt:
    """apt-get/apt-cache options that use only files under BASE (never /etc/apt,
    /var/lib/apt or /var/cache/apt of the host)."""

    base: Path

    def options(self) -> list[str]:
        b = self.base
        return [
            "-o", f"Dir::Etc::sourcelist={b / 'sources.list'}",
            "-o", "Dir::Etc::sourceparts=-",
            "-o", f"Dir::State::Lists={b / 'lists'}",
            "-o", f"Dir::State::status={b / 'status'}",
            "-o", f"Dir::Cache={b / 'cache'}",
            "-o", "APT::Get::List-Cleanup=0",
        ]  # fmt: skip

    def prepare(self) -> None:
        for sub in ("lists/partial", "cache/archives/partial"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        (self.base / "status").touch()
        line = f"deb [signed-by={KEYRING}] {TRIXIE_MIRROR} trixie main\n"
        (self.base / "sources.list").write_text(line)

    def update(self) -> None:
        self.prepare()
        _run(["apt-get", *self.options(), "update", "-qq"])

    def fresh(self) -> bool:
        return any((self.base / "lists").glob("*trixie*Packages*"))

    def candidate(self, package: str) -> str | None:
        out = _run(["apt-cache", *self.options(), "policy", package])
        for line in out.splitlines():
            key, _, value = line.strip().partition(":")
            if key == "Candidate" and value.strip() not in ("", "(none)"):
                return value.strip()
        return None

    def image_package(self) -> tuple[str, str]:
        depends = _run(["apt-cache", *self.options(), "depends", META_PACKAGE])
        for line in depends.splitlines():
            if line.strip().startswith("Depends:") and "linux-image-" in line:
                package = line.split(":", 1)[1].strip()
                version = self.candidate(package)
                if version:
                    return package, version
        raise KernelTreeError(f"trixie: cannot find the image package {META_PACKAGE} depends on")


def selected_tree() -> KernelTree:
    """The tree the suite runs on: Debian 13's with KMODD_TEST_KERNEL=trixie (on this
    Debian 12 machine: the VM tests then boot 6.12 with Debian 12's userspace), else the
    current Debian release's."""
    if os.environ.get("KMODD_TEST_KERNEL") == "trixie":
        return ensure_trixie_tree()
    return ensure_kernel_tree()


def _trixie() -> tuple[Path, TrixieApt]:
    directory = cache_dir() / TRIXIE_DIR
    apt = TrixieApt(directory / "apt")
    if not apt.fresh():
        apt.update()
    return directory, apt


def ensure_trixie_tree() -> KernelTree:
    """Debian 13's current kernel image (6.12), extracted and depmod'ed; built once."""
    directory = cache_dir() / TRIXIE_DIR
    with _locked(directory):
        for stale in directory.glob(".build-*"):
            shutil.rmtree(stale, ignore_errors=True)
        try:
            directory, apt = _trixie()
            package, version = apt.image_package()
        except KernelTreeError:
            fallback = _existing_tree(directory)
            if fallback is None:
                raise
            return _tree_from(fallback)
        final = directory / f"{package}_{version}"
        if not (final / "root").is_dir():
            _build(package, version, final, apt)
        return _tree_from(final / "root")


@dataclass(frozen=True, slots=True)
class Kmod34:
    """trixie's kmod userland, extracted: run its modprobe with `argv()`."""

    root: Path

    def argv(self, tool: str = "modprobe") -> list[str]:
        libs = ":".join(
            str(self.root / d) for d in ("usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu")
        )
        loader = self.root / "usr/lib64/ld-linux-x86-64.so.2"
        kmod = self.root / "usr/bin/kmod"
        return [str(loader), "--library-path", libs, "--argv0", tool, str(kmod)]

    def version(self) -> str:
        return _run([*self.argv(), "--version"]).splitlines()[0]


def ensure_kmod34() -> Kmod34:
    """trixie's kmod 34 and its libraries, extracted under the cache; built once."""
    directory = cache_dir() / TRIXIE_DIR
    with _locked(directory):
        final = directory / "kmod34"
        if (final / "usr/bin/kmod").is_file():
            return Kmod34(final)
        directory, apt = _trixie()
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=directory))
        try:
            work.chmod(0o755)
            root = work / "root"
            root.mkdir()
            for package in KMOD34_PACKAGES:
                version = apt.candidate(package)
                if version is None:
                    raise KernelTreeError(f"trixie: no candidate for {package}")
                deb = _download(package, version, work, apt)
                _run(["dpkg-deb", "-x", str(deb), str(root)])
                deb.unlink()
            root.rename(final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return Kmod34(final)


def main() -> int:
    try:
        tree = ensure_kernel_tree()
        print(tree.root)
        print(ensure_trixie_tree().root)
        print(ensure_kmod34().root)
    except KernelTreeError as err:
        print(f"kerneltree: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
