"""Request classes: what kind of thing a raw request name asks for.

The kernel's request_module() names follow fixed prefixes (research/kmod.md §4.3);
udev sends device modaliases (`BUS:...`).  The class is derived from the name alone,
after kmod's '-' → '_' normalization, so `net-pf-5` and `net_pf_5` are the same class.
The table is documented in docs/policy.md; keep both in step.
"""

from __future__ import annotations

import re
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


# (normalized prefix, class), first match wins; order matters where prefixes nest.
PREFIXES: tuple[tuple[str, RequestClass], ...] = (
    ("symbol:", RequestClass.SYMBOL),
    ("devname:", RequestClass.CHAR_DEVICE),
    ("net_pf_", RequestClass.NET_PROTOCOL),
    ("tcp_ulp_", RequestClass.NET_PROTOCOL),
    ("crypto_", RequestClass.CRYPTO),
    ("algif_", RequestClass.CRYPTO),
    ("fs_", RequestClass.FILESYSTEM),
    ("char_major_", RequestClass.CHAR_DEVICE),
    ("sound_slot_", RequestClass.CHAR_DEVICE),
    ("sound_service_", RequestClass.CHAR_DEVICE),
    ("block_major_", RequestClass.BLOCK_DEVICE),
    ("tty_ldisc_", RequestClass.TTY_LDISC),
    ("binfmt_", RequestClass.BINFMT),
    ("netdev_", RequestClass.NETDEV),
    ("rtnl_link_", RequestClass.NETDEV),
    ("nf_", RequestClass.NETFILTER),
    ("nft_", RequestClass.NETFILTER),
    ("nfnetlink_", RequestClass.NETFILTER),
)
EXACT: dict[str, RequestClass] = {"cryptomgr": RequestClass.CRYPTO}
# A device modalias is BUS:... (pci:, usb:, acpi:, of:, platform:, hid:, input:, virtio:…);
# udev hands them over from the uevent MODALIAS property.
_MODALIAS = re.compile(r"^[A-Za-z0-9_]+:")


def classify(name: str) -> RequestClass:
    """The class of raw request NAME (see docs/policy.md for the table)."""
    norm = normalize(name)
    exact = EXACT.get(norm)
    if exact is not None:
        return exact
    for prefix, klass in PREFIXES:
        if norm.startswith(prefix):
            return klass
    if _MODALIAS.match(norm):
        return RequestClass.MODALIAS
    return RequestClass.OTHER
