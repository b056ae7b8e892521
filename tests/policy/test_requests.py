"""Request classes from raw names (docs/policy.md has the same table)."""

from __future__ import annotations

import pytest

from kmodd.policy.requests import RequestClass, classify

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
