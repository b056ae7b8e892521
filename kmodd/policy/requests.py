"""Request classes: what kind of thing a raw request name asks for.

The kernel's request_module() names follow fixed prefixes (research/kmod.md §4.3);
udev sends device modaliases (`BUS:...`).  The class is derived from the name alone,
after kmod's '-' → '_' normalization, so `net-pf-5` and `net_pf_5` are the same class.
The table is documented in docs/policy.md (tests/policy/test_requests.py keeps both in step).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from kmodd.helper import normalize


class RequestClass(StrEnum):
    NET_PROTOCOL = "net_protocol"
    CRYPTO = "crypto"
    FILESYSTEM = "filesystem"
    CHAR_DEVICE = "char_device"
    BLOCK_DEVICE = "block_device"
    TTY_LDISC = "tty_ldisc"
    BINFMT = "binfmt"
    NETDEV = "netdev"
    NETFILTER = "netfilter"
    MODALIAS = "modalias"
    SYMBOL = "symbol"
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class Prefix:
    """Names starting with `prefix` (normalized) are of class `klass`; `kernel`: the kernel's
    request_module() sends such names (the compiler puts their exact aliases into the
    helper snapshot next to every module name)."""

    prefix: str
    klass: RequestClass
    kernel: bool = True


# The one prefix table (research/kmod.md §4.3; docs/policy.md shows it): first match wins,
# order matters where prefixes nest (rtnl_link_ before rtnl_).
PREFIXES: tuple[Prefix, ...] = (
    Prefix("symbol:", RequestClass.SYMBOL, kernel=False),
    Prefix("devname:", RequestClass.CHAR_DEVICE, kernel=False),
    Prefix("net_pf_", RequestClass.NET_PROTOCOL),
    Prefix("tcp_ulp_", RequestClass.NET_PROTOCOL),
    Prefix("crypto_", RequestClass.CRYPTO),
    Prefix("algif_", RequestClass.CRYPTO),
    Prefix("fs_", RequestClass.FILESYSTEM),
    Prefix("char_major_", RequestClass.CHAR_DEVICE),
    Prefix("sound_slot_", RequestClass.CHAR_DEVICE),
    Prefix("sound_service_", RequestClass.CHAR_DEVICE),
    Prefix("block_major_", RequestClass.BLOCK_DEVICE),
    Prefix("tty_ldisc_", RequestClass.TTY_LDISC),
    Prefix("binfmt_", RequestClass.BINFMT),
    Prefix("netdev_", RequestClass.NETDEV),
    Prefix("rtnl_link_", RequestClass.NETDEV),
    Prefix("nf_", RequestClass.NETFILTER),
    Prefix("nft_", RequestClass.NETFILTER),
    Prefix("nfnetlink_", RequestClass.NETFILTER),
    Prefix("nfct_", RequestClass.NETFILTER),  # conntrack helpers (nfct-helper-*)
    Prefix("ip_set_", RequestClass.NETFILTER),  # ipset types (ip_set_hash:ip)
    Prefix("rtnl_", RequestClass.OTHER),  # rtnl-lwt-*, rtnl-af-*...: no class of their own
    Prefix("xfrm_", RequestClass.OTHER),  # IPsec modes and types: no class of their own
)
EXACT: dict[str, RequestClass] = {"cryptomgr": RequestClass.CRYPTO}
# A device modalias is BUS:... (pci:, usb:, acpi:, of:, platform:, hid:, input:, virtio:…);
# udev hands them over from the uevent MODALIAS property.
_MODALIAS = re.compile(r"^[A-Za-z0-9_]+:")
# What request_module() sends, for the compiler (normalized; `str.startswith` tuple).
KERNEL_REQUEST_PREFIXES = tuple(p.prefix for p in PREFIXES if p.kernel) + tuple(EXACT)
# Every prefix at once: most names a build classifies (the 26,222 alias patterns of the 6.1
# tree: pci:, usb:, acpi*:...) match none, and one str.startswith(tuple) call rules out all
# 22 rows (classify() of those patterns: 38 ms -> 12 ms natively; first build of each tree).
_ANY_PREFIX = tuple(p.prefix for p in PREFIXES)


def classify(name: str) -> RequestClass:
    """The class of raw request NAME (see docs/policy.md for the table)."""
    norm = normalize(name)
    exact = EXACT.get(norm)
    if exact is not None:
        return exact
    if norm.startswith(_ANY_PREFIX):
        for row in PREFIXES:
            if norm.startswith(row.prefix):
                return row.klass
    if _MODALIAS.match(norm):
        return RequestClass.MODALIAS
    return RequestClass.OTHER
