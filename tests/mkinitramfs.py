"""Build a real initramfs with Debian's mkinitramfs for the cached kernel tree.

mkinitramfs reads the modules of RELEASE from /lib/modules/RELEASE and the kernel config
from /boot/config-RELEASE, fixed paths; this machine has neither (its kernel has no module
support).  So the build runs in a private mount namespace (`unshare --mount`): an overlay
over /usr (/lib is a symlink to usr/lib) gets an empty lib/modules/RELEASE that the tree's
modules are bind-mounted onto (and, if asked, the files of `kmodctl install --prefix`),
and the tree's boot/ is bind-mounted over /boot.  Nothing outside the namespace changes.
MODULES=list with no list keeps the image small (~6 MB, ~400 entries, ~2.5 s): what the
hooks under test add is all that matters.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

from tests.kerneltree import KernelTree

MKINITRAMFS = "/usr/sbin/mkinitramfs"
LSINITRAMFS = "/usr/bin/lsinitramfs"
TIMEOUT_S = 300


def available() -> bool:
    return Path(MKINITRAMFS).exists() and shutil.which("unshare") is not None


def config_dir(base: Path) -> Path:
    """An initramfs-tools conf dir (mkinitramfs -d): MODULES=list with an empty list."""
    conf = base / "conf"
    for sub in ("hooks", "scripts", "conf.d"):
        (conf / sub).mkdir(parents=True, exist_ok=True)
    text = Path("/etc/initramfs-tools/initramfs.conf").read_text()
    lines = ["MODULES=list" if ln.startswith("MODULES=") else ln for ln in text.splitlines()]
    (conf / "initramfs.conf").write_text("\n".join(lines) + "\n")
    (conf / "modules").write_text("")
    return conf


def namespace_script(base: Path, tree: KernelTree, prefix: Path | None, command: str) -> str:
    """Shell that sets up the private mounts, then runs COMMAND: an overlay over /usr
    (its upper dir under BASE) holding the tree's modules at /usr/lib/modules/RELEASE and,
    when PREFIX is given, the files `kmodctl install --prefix PREFIX` wrote (so the
    hooks run from where a real install puts them); the tree's boot/ over /boot."""
    upper, work = base / "overlay-upper", base / "overlay-work"
    upper.mkdir(exist_ok=True)
    work.mkdir(exist_ok=True)
    modules = f"/usr/lib/modules/{tree.release}"
    q = shlex.quote
    steps = [
        f"mount -t overlay overlay -o lowerdir=/usr,upperdir={q(str(upper))},"
        f"workdir={q(str(work))} /usr",
        f"mkdir -p {modules}",
        f"mount --bind {q(str(tree.module_dir))} {modules}",
        f"mount --bind {q(str(tree.root / 'boot'))} /boot",
    ]
    if prefix is not None:
        steps.append(f"cp -a {q(str(prefix / 'usr'))}/. /usr/")
    return " && ".join([*steps, command])


def in_namespace(
    script: str, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=TIMEOUT_S, check=False, env=full_env
    )


def build(
    tree: KernelTree,
    base: Path,
    *,
    compress: str = "zstd",
    prefix: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """mkinitramfs for TREE's release into BASE/initrd.img-RELEASE; (image, the run)."""
    conf = config_dir(base)
    image = base / f"initrd.img-{tree.release}"
    q = shlex.quote
    command = f"{MKINITRAMFS} -d {q(str(conf))} -c {q(compress)} -o {q(str(image))} {tree.release}"
    return image, in_namespace(namespace_script(base, tree, prefix, command), env)


def lsinitramfs(image: Path) -> set[str]:
    """initramfs-tools' own listing, the oracle for kmodd's reader ('.' left out)."""
    out = subprocess.run(
        [LSINITRAMFS, str(image)], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    return {line.strip() for line in out.splitlines()} - {".", ""}
