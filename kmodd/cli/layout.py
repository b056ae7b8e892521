"""Where `kmodctl install` puts each file: the local layout (a venv's `kmodctl install`,
under /usr/local) or the package layout (the Debian package's debian/rules, under /usr).

The helper's path in them matches kmodd.paths.HELPER_PATH of the kmodd that runs there:
the Debian package's kmodd lives in /usr/lib/python3/dist-packages and so names
/usr/libexec/kmodd, a venv's names /usr/local/libexec/kmodd.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from kmodd.paths import HELPER_NAME, LOCAL_LIBEXEC, PACKAGE_LIBEXEC

POLICY_DEST = "usr/lib/kmodd/policy.d"
INITRAMFS_TOOLS_HOOK_DEST = "usr/share/initramfs-tools/hooks/kmodd"
DRACUT_MODULE_DEST = "usr/lib/dracut/modules.d/90kmodd/module-setup.sh"
MANIFEST = "usr/local/lib/kmodd/install-manifest.json"
SYSCTL_DEST = "usr/local/lib/sysctl.d/50-kmodd.conf"


class LayoutName(StrEnum):
    LOCAL = "local"  # `kmodctl install` from a venv: /usr/local
    PACKAGE = "package"  # the Debian package (debian/rules): /usr, no sysctl.d drop-in


@dataclass(frozen=True, slots=True)
class Layout:
    """Where each installed file goes, relative to the prefix."""

    name: LayoutName
    libexec: str  # the helper, the boot step and kmodd-initramfs
    units: str
    # None: not shipped.  The package points kernel.modprobe only once the admin enabled
    # kmodd.service (the daemon, and at boot kmodd-boot-publish.service, which runs before
    # systemd-modules-load and so before systemd-sysctl): a sysctl.d file would point it at
    # every boot, enabled or not.
    sysctl: str | None
    tmpfiles: str
    catalog: str
    manifest: str | None  # what uninstall removes; dpkg keeps its own list

    @property
    def helper(self) -> str:
        return f"{self.libexec}/{HELPER_NAME}"

    @property
    def boot_publish(self) -> str:
        return f"{self.libexec}/kmodd-boot-publish"  # kmodd/bootpublish.py

    @property
    def initramfs_files(self) -> tuple[tuple[str, str], ...]:
        """Early boot (initramfs/): the shared script, and the two generators' entry points."""
        return (
            ("kmodd-initramfs", f"{self.libexec}/kmodd-initramfs"),
            ("initramfs-tools-hook", INITRAMFS_TOOLS_HOOK_DEST),
            ("dracut-module-setup.sh", DRACUT_MODULE_DEST),
        )


LOCAL = Layout(
    LayoutName.LOCAL,
    LOCAL_LIBEXEC.lstrip("/"),
    "usr/local/lib/systemd/system",
    SYSCTL_DEST,
    "usr/local/lib/tmpfiles.d/kmodd.conf",
    "usr/local/lib/systemd/catalog/kmodd.catalog",
    MANIFEST,
)
PACKAGE = Layout(
    LayoutName.PACKAGE,
    PACKAGE_LIBEXEC.lstrip("/"),
    "usr/lib/systemd/system",
    None,
    "usr/lib/tmpfiles.d/kmodd.conf",
    "usr/lib/systemd/catalog/kmodd.catalog",
    None,
)
LAYOUTS = {layout.name: layout for layout in (LOCAL, PACKAGE)}
# The local layout's paths, by their old names (tests, docs).
HELPER_DEST = LOCAL.helper
BOOT_PUBLISH_DEST = LOCAL.boot_publish
UNIT_DIR = LOCAL.units
TMPFILES_DEST = LOCAL.tmpfiles
CATALOG_DEST = LOCAL.catalog
INITRAMFS_SCRIPT_DEST = f"{LOCAL.libexec}/kmodd-initramfs"
INITRAMFS_FILES = LOCAL.initramfs_files
