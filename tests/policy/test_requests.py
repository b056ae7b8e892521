"""Request classes from raw names, and the one prefix table against docs/policy.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kmodd.policy.requests import KERNEL_REQUEST_PREFIXES, PREFIXES, RequestClass, classify

C = RequestClass


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("net-pf-5", C.NET_PROTOCOL),
        ("net_pf_5", C.NET_PROTOCOL),
        ("net-pf-2-proto-132", C.NET_PROTOCOL),
        ("net-pf-16-proto-16-family-nl80211", C.NET_PROTOCOL),
        ("tcp-ulp-tls", C.NET_PROTOCOL),
        ("crypto-gcm(aes)", C.CRYPTO),
        ("crypto-sha256-all", C.CRYPTO),
        ("algif-aead", C.CRYPTO),
        ("cryptomgr", C.CRYPTO),
        ("fs-cramfs", C.FILESYSTEM),
        ("char-major-10-200", C.CHAR_DEVICE),
        ("char-major-4", C.CHAR_DEVICE),
        ("sound-slot-0", C.CHAR_DEVICE),
        ("devname:fuse", C.CHAR_DEVICE),
        ("block-major-7-0", C.BLOCK_DEVICE),
        ("tty-ldisc-13", C.TTY_LDISC),
        ("binfmt-0000", C.BINFMT),
        ("netdev-eth0", C.NETDEV),
        ("rtnl-link-vxlan", C.NETDEV),
        ("nf-logger-2-0", C.NETFILTER),
        ("nft-expr-counter", C.NETFILTER),
        ("nfnetlink-subsys-12", C.NETFILTER),
        ("nfct-helper-ftp", C.NETFILTER),
        ("ip_set_hash:ip", C.NETFILTER),
        ("rtnl-lwt-MPLS", C.OTHER),
        ("xfrm-type-2-50", C.OTHER),
        ("pci:v00008086d00001572sv00008086sd00000001bc02sc00i00", C.MODALIAS),
        ("usb:v1D6Bp0002d0601dc09dsc00dp01ic09isc00ip00in00", C.MODALIAS),
        ("acpi:PNP0A08:", C.MODALIAS),
        ("of:NgpioT(null)Cgpio-leds", C.MODALIAS),
        ("symbol:nf_nat_ftp_hook", C.SYMBOL),
        ("ext4", C.OTHER),
        ("", C.OTHER),
        ("fs", C.OTHER),
        (":", C.OTHER),
    ],
)
def test_classify(name: str, expected: RequestClass) -> None:
    assert classify(name) is expected


def test_every_kernel_request_prefix_has_the_class_of_its_row() -> None:
    """The compiler's snapshot prefixes and the classifier are one table: a name the
    kernel sends with a known prefix gets that row's class (ip_set_/nfct_ did not)."""
    for row in PREFIXES:
        assert classify(row.prefix + "x") is row.klass, row
        assert (row.prefix in KERNEL_REQUEST_PREFIXES) is row.kernel, row


def test_docs_table_lists_every_classed_prefix() -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs/policy.md").read_text()
    rows = {m[1]: m[2] for m in re.finditer(r"^\| `([a-z_]+)` \| ([^|]+) \|", docs, re.M)}
    for row in PREFIXES:
        if row.klass is not C.OTHER:
            assert f"`{row.prefix}`" in rows[row.klass.value], row
