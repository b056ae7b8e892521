"""A bootable Debian image built from Debian's own packages, with kmodd installed the way
README.md's "Install on a machine" tells users (issue 14 item 1).

Two cached layers under /var/cache/kmodd-dev/realboot (outside the checkout: CI's fresh
machine builds them once, a developer's machine keeps them):

- **base-RELEASE-DIGEST/**: `debootstrap --variant=minbase` of RELEASE with the kernel,
  initramfs-tools, systemd, udev, kmod, python3 and the build prerequisites
  docs/operations.md lists for the venv route; pip's wheel cache warmed with kmodd's
  dependencies.  DIGEST covers the release, mirror and package list: ~3-5 min, rebuilt
  only when those change.
- **image-RELEASE-DIGEST/** (the venv route): a copy of the base, then, in a chroot,
  exactly `python3 -m venv /opt/kmodd && /opt/kmodd/bin/pip install /usr/src/kmodd`,
  `/opt/kmodd/bin/kmodctl install`, `systemctl enable kmodd.service`; the check unit of
  this package; then `mkfs.ext4 -d` makes the raw root disk without a loop device.
  DIGEST adds kmodd's shipped files and this package's guest side.
- **image-trixie-deb-DIGEST/** (KMODD_REALBOOT_INSTALL=deb, Debian 13 only): the same,
  but kmodd comes from the `.deb` of `make deb` (`packaging/debian13.sh build`, or
  KMODD_REALBOOT_DEB=FILE), installed as README.md's "Install on a machine" tells a Debian 13 admin:
  `apt-get install ./kmodd_*.deb`, `systemctl enable kmodd.service`.  DIGEST adds the
  package's bytes.

Nothing here runs in the guest; the guest side is tests/realboot/guest/.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The kmodd tree installed in the image: this checkout, or (KMODD_REALBOOT_SRC) another
# tree, e.g. `git archive BRANCH | tar -x -C DIR` of a branch the harness should judge.
SRC = Path(os.environ.get("KMODD_REALBOOT_SRC", str(REPO)))
GUEST = Path(__file__).resolve().parent / "guest"
CACHE = Path(os.environ.get("KMODD_REALBOOT_CACHE", "/var/cache/kmodd-dev/realboot"))
MIRROR = os.environ.get("KMODD_REALBOOT_MIRROR", "http://deb.debian.org/debian")
# Bumped when the build recipe below changes in a way the digests cannot see.
RECIPE = "4"

# What the image needs of Debian: the kernel and its initramfs from the image itself;
# systemd as PID 1 with udev; kmod; python3 and python3-venv for the venv route (no
# compiler: every dependency is a wheel); iproute2 for `ip link add`; procps for sysctl.
PACKAGES = (
    "linux-image-amd64",
    "initramfs-tools",
    "zstd",
    "systemd",
    "systemd-sysv",
    "udev",
    "kmod",
    "libkmod2",
    "python3",
    "python3-venv",
    "iproute2",
    "procps",
    "util-linux",
)
# kmodd's runtime dependencies (pyproject.toml), pre-fetched into pip's cache in the base
# so the image layer installs without a network round trip per build.
PIP_WARM = ("pydantic>=2.7,<3", "PyYAML>=6.0", "pyudev>=0.24", "watchdog>=5.0")
# The checkout parts `pip install /path/to/kmodd` needs: the package and its data-files.
SOURCE_PARTS = ("kmodd", "systemd", "policies", "initramfs", "pyproject.toml", "README.md")
STEP_TIMEOUT_S = 1800  # one debootstrap or pip install; a hang fails the build, never CI
# How kmodd is installed: "venv" (README.md, any release) or "deb" (Debian 13's package).
ROUTES = ("venv", "deb")
ROUTE_FILE = "etc/kmodd-realboot.json"  # tells the guest side which paths the route has


class ImageError(RuntimeError):
    """The image could not be built; the message says which step and why."""


@dataclass(frozen=True)
class Image:
    """A built image: the raw root disk and the kernel and initramfs taken from it."""

    release: str
    route: str  # ROUTES
    digest: str
    disk: Path
    vmlinuz: Path
    initrd: Path
    kernel_release: str
    build_s: float  # 0.0 when it came from the cache


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()[:16]


def _tree_bytes(paths: list[Path]) -> Iterator[bytes]:
    for top in paths:
        files = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
        for f in files:
            if "__pycache__" in f.parts or f.suffix == ".pyc":
                continue
            yield str(f.relative_to(top.parent)).encode()
            yield f.read_bytes()


def base_digest(release: str) -> str:
    return _digest(RECIPE.encode(), release.encode(), MIRROR.encode(), *map(str.encode, PACKAGES))


def image_digest(release: str, route: str = "venv", deb: Path | None = None) -> str:
    parts = [SRC / p for p in SOURCE_PARTS] + [GUEST, Path(__file__)]
    package = [route.encode(), deb.read_bytes()] if deb is not None else []
    return _digest(base_digest(release).encode(), *package, *_tree_bytes(parts))


def _run(argv: list[str], what: str, env: dict[str, str] | None = None) -> None:
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=STEP_TIMEOUT_S, env=env, check=False
    )
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise ImageError(f"{what} failed (exit {proc.returncode}): {tail}")


@contextlib.contextmanager
def _chroot_mounts(root: Path) -> Iterator[None]:
    """/proc, /sys and /dev for pip and systemctl in the chroot; always unmounted."""
    mounted: list[Path] = []
    try:
        for src, fstype in (("proc", "proc"), ("sysfs", "sysfs")):
            target = root / src.replace("sysfs", "sys")
            _run(["mount", "-t", fstype, src, str(target)], f"mount {target}")
            mounted.append(target)
        _run(["mount", "--rbind", "/dev", str(root / "dev")], "mount /dev")
        mounted.append(root / "dev")
        yield
    finally:
        for target in reversed(mounted):
            subprocess.run(["umount", "-R", "-l", str(target)], check=False, timeout=60)


HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
CHROOT_CA = "/tmp/kmodd-host-ca.crt"


def _chroot(root: Path, script: str, what: str) -> None:
    """SCRIPT under /bin/sh -eux in ROOT.  pip there trusts what this machine trusts
    (its CA bundle, which may hold a site's egress proxy CA; copied in, removed after):
    the image's own bundle has only Debian's CAs."""
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "DEBIAN_FRONTEND": "noninteractive",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_DEFAULT_TIMEOUT": "180",
    }
    ca = root / CHROOT_CA.lstrip("/")
    if HOST_CA.is_file():
        shutil.copyfile(HOST_CA, ca)
        env["PIP_CERT"] = CHROOT_CA
    try:
        _run(["chroot", str(root), "/bin/sh", "-euxc", script], what, env=env)
    finally:
        ca.unlink(missing_ok=True)


def build_base(release: str) -> Path:
    """debootstrap RELEASE (cached by base_digest)."""
    final = CACHE / f"base-{release}-{base_digest(release)}"
    if (final / "rootfs" / "usr" / "bin" / "python3").exists():
        return final / "rootfs"
    tmp = final.with_name(final.name + ".tmp")
    rootfs = tmp / "rootfs"
    if not (tmp / "debootstrapped").exists():  # ~3 min: kept when a later step fails
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(PACKAGES)}",
                release,
                str(rootfs),
                MIRROR,
            ],
            f"debootstrap {release}",
        )
        (tmp / "debootstrapped").touch()
    warm = " ".join(f"'{p}'" for p in PIP_WARM)
    with _chroot_mounts(rootfs):
        _chroot(
            rootfs,
            f"python3 -m venv /tmp/warm && /tmp/warm/bin/pip install -q {warm}"
            " && rm -rf /tmp/warm && apt-get clean",
            "warm pip's cache",
        )
    tmp.rename(final)
    return final / "rootfs"


def _copy_source(dest: Path) -> None:
    dest.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for part in SOURCE_PARTS:
        src = SRC / part
        if src.is_dir():
            shutil.copytree(src, dest / part, ignore=ignore)
        else:
            shutil.copy2(src, dest / part)
    bpf_obj = Path("kmodd/bpf/kmodd.bpf.o")  # built by `make bpf`, not in git
    if not (dest / bpf_obj).exists() and (REPO / bpf_obj).exists():
        shutil.copy2(REPO / bpf_obj, dest / bpf_obj)


def _install_guest_side(rootfs: Path) -> None:
    """The check unit, its script, the site policy and the early unit of the broken boot."""
    libdir = rootfs / "usr/local/lib/kmodd-realboot"
    libdir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(GUEST / "check.py", libdir / "check.py")
    units = rootfs / "etc/systemd/system"
    for unit in ("kmodd-realboot-check.service", "kmodd-realboot-broken.service"):
        shutil.copy2(GUEST / unit, units / unit)
    policy = rootfs / "etc/kmodd/policy.d"
    policy.mkdir(parents=True, exist_ok=True)
    shutil.copy2(GUEST / "05-realboot-site.yaml", policy / "05-realboot-site.yaml")
    (rootfs / "etc/fstab").write_text("/dev/vda / ext4 rw,errors=remount-ro 0 1\n")
    (rootfs / "etc/hostname").write_text("kmodd-realboot\n")


# The README's "Install on a machine", in a chroot: `--now` and update-initramfs need the
# running system, so the check unit does those at first boot (tests/realboot/guest).
INSTALL_SCRIPT = """
python3 -m venv /opt/kmodd
/opt/kmodd/bin/pip install -q /usr/src/kmodd
/opt/kmodd/bin/kmodctl install
systemctl enable kmodd.service
systemctl enable kmodd-realboot-check.service kmodd-realboot-broken.service
rm -rf /usr/src/kmodd /root/.cache/pip
systemd-machine-id-setup
"""


# README.md's Debian 13 route, in a chroot (apt resolves Debian's python3-pydantic,
# python3-pyudev, python3-watchdog, python3-yaml, libkmod2, libbpf1 from the mirror).
DEB_INSTALL_SCRIPT = """
apt-get update -q
apt-get install -y -q --no-install-recommends /tmp/kmodd.deb
systemctl enable kmodd.service
systemctl enable kmodd-realboot-check.service kmodd-realboot-broken.service
rm -f /tmp/kmodd.deb
apt-get clean
systemd-machine-id-setup
"""


def built_deb() -> Path:
    """KMODD_REALBOOT_DEB, or the .deb `packaging/debian13.sh build` makes of SRC (cached
    by the source's digest: ~2 min warm)."""
    given = os.environ.get("KMODD_REALBOOT_DEB")
    if given:
        return Path(given)
    sources = [SRC / "debian", SRC / "packaging", *(SRC / p for p in SOURCE_PARTS)]
    out = CACHE / f"deb-{_digest(*_tree_bytes(sources))}"
    found = sorted(out.glob("kmodd_*.deb"))
    if not found:
        shutil.rmtree(out, ignore_errors=True)
        _run([str(SRC / "packaging/debian13.sh"), "build", str(out)], "make deb")
        found = sorted(out.glob("kmodd_*.deb"))
    if not found:
        raise ImageError(f"packaging/debian13.sh build wrote no kmodd_*.deb into {out}")
    return found[-1]


def _install(rootfs: Path, route: str, deb: Path | None) -> None:
    (rootfs / ROUTE_FILE).write_text(json.dumps({"route": route}) + "\n")
    with _chroot_mounts(rootfs):
        if deb is None:
            _copy_source(rootfs / "usr/src/kmodd")
            _chroot(rootfs, INSTALL_SCRIPT, "install kmodd as README.md says")
        else:
            shutil.copyfile(deb, rootfs / "tmp/kmodd.deb")
            _chroot(rootfs, DEB_INSTALL_SCRIPT, "install kmodd's .deb as README.md says")


def _make_disk(rootfs: Path, disk: Path) -> None:
    used = int(
        subprocess.run(
            ["du", "-sxm", str(rootfs)], capture_output=True, text=True, check=True, timeout=300
        ).stdout.split()[0]
    )
    size_mb = used + max(512, used // 3)  # room for update-initramfs and the journal
    _run(
        ["mkfs.ext4", "-q", "-F", "-L", "root", "-d", str(rootfs), str(disk), f"{size_mb}M"],
        "mkfs.ext4 -d",
    )


def build_image(release: str = "bookworm", route: str = "venv") -> Image:
    """The image for RELEASE with kmodd installed by ROUTE, from the cache when its inputs
    are unchanged."""
    if route not in ROUTES:
        raise ImageError(f"unknown install route {route!r}: one of {', '.join(ROUTES)}")
    if route == "deb" and release != "trixie":
        raise ImageError("the .deb route is Debian 13's: set KMODD_REALBOOT_RELEASE=trixie")
    deb = built_deb() if route == "deb" else None
    digest = image_digest(release, route, deb)
    final = CACHE / f"image-{release}-{'deb-' if deb else ''}{digest}"
    meta = final / "image.json"
    start = time.monotonic()
    if not meta.exists():
        base = build_base(release)
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        rootfs = tmp / "rootfs"
        _run(["cp", "-a", "--reflink=auto", str(base), str(rootfs)], "copy the base")
        _install_guest_side(rootfs)
        _install(rootfs, route, deb)
        vmlinuz = sorted((rootfs / "boot").glob("vmlinuz-*"))[-1]
        krel = vmlinuz.name.removeprefix("vmlinuz-")
        shutil.copy2(vmlinuz, tmp / "vmlinuz")
        shutil.copy2(rootfs / "boot" / f"initrd.img-{krel}", tmp / "initrd.img")
        _make_disk(rootfs, tmp / "disk.raw")
        shutil.rmtree(rootfs)
        info = {
            "release": release,
            "route": route,
            "kernel_release": krel,
            "build_s": time.monotonic() - start,
        }
        (tmp / "image.json").write_text(json.dumps(info))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    info = json.loads(meta.read_text())
    built = time.monotonic() - start
    return Image(
        release=release,
        route=route,
        digest=digest,
        disk=final / "disk.raw",
        vmlinuz=final / "vmlinuz",
        initrd=final / "initrd.img",
        kernel_release=str(info["kernel_release"]),
        build_s=built if built > 5 else 0.0,
    )
