"""Load: 100,000 decisions from 50 concurrent clients on decide.sock, every answer checked
against the daemon's own Explain; RSS growth under 5 MB and the fd count unchanged."""

from __future__ import annotations

import time

import pytest

from kmodd import wire
from tests.conftest import root_required
from tests.reliability.conftest import Rel, Tally, expectations, fd_count, hammer, rss_kib

pytestmark = [pytest.mark.reliability, root_required, pytest.mark.root]

SOAK = 100_000
CLIENTS = 50
WARMUP = 10_000
RSS_GROWTH_MAX_KIB = 5 * 1024
NAMES = [
    "algif-aead", "algif-hash", "algif-skcipher", "vfat", "fs-vfat", "msdos", "fs-msdos",
    "fs-cramfs", "fs-ext4", "ext4", "net-pf-38", "net-pf-10", "net-pf-2", "net-pf-5",
    "net-pf-16-proto-9", "crypto-aes", "crypto-sha256", "char-major-10-237", "tty-ldisc-2",
    "dummy", "loop", "fat", "af_alg", "sch_netem", "rtnl-link-dummy", "nft-chain-2-nat",
    "kmodd-no-such-module-1", "kmodd-no-such-module-2", "fs-nonexistent", "crypto-nope",
    "pci:v00008086d00001234sv*sd*bc*sc*i*", "usb:v1D6Bp0002d0606dc09dsc00dp03ic09isc00ip00in00",
]  # fmt: skip
INVALID = [b"a/b", b"../../etc/passwd", b"x" * 56, b"\xff\xfe", b"a b"]


def _settled_fds(pid: int, timeout: float = 15.0) -> int:
    """The daemon's fd count once it holds still for 0.5 s: connections the clients just
    closed may still be open on the daemon's side for a moment."""
    deadline = time.monotonic() + timeout
    last, since = fd_count(pid), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < 0.5:
        time.sleep(0.05)
        if (now := fd_count(pid)) != last:
            last, since = now, time.monotonic()
    return last


def _wait_fds(pid: int, most: int, timeout: float = 15.0) -> int:
    """Wait until the daemon holds at most MOST fds (a leak never gets there)."""
    deadline = time.monotonic() + timeout
    while (now := fd_count(pid)) > most and time.monotonic() < deadline:
        time.sleep(0.05)
    return now


def test_soak_100k_decisions_50_clients(rel: Rel, tally: Tally) -> None:
    expected = expectations(rel.daemon, NAMES)
    expected.update(dict.fromkeys(INVALID, b"deny invalid-name"))
    before_status = rel.daemon.status()["decisions"]
    warm = hammer(rel.decide_path, expected, WARMUP, CLIENTS)
    assert warm.wrong == []
    fds = _settled_fds(rel.pid)
    rss = rss_kib(rel.pid)
    soak = hammer(rel.decide_path, expected, SOAK, CLIENTS)
    fds_after = _wait_fds(rel.pid, fds)
    rss_after = rss_kib(rel.pid)
    assert soak.asked == SOAK
    assert soak.wrong == [], f"{len(soak.wrong)} wrong or lost: {soak.wrong[:5]}"
    assert fds_after <= fds, (fds, fds_after)
    assert rss_after - rss < RSS_GROWTH_MAX_KIB, (rss, rss_after)
    # Every decision was counted by the daemon too (none lost between socket and core).
    after_status = rel.daemon.call(wire.Method.STATUS)["decisions"]
    counted = sum(after_status["verdicts"].values()) - sum(before_status["verdicts"].values())
    invalid = after_status["invalid_names"] - before_status["invalid_names"]
    assert counted + invalid == WARMUP + SOAK
    tally.add(
        "load.soak",
        SOAK,
        clients=CLIENTS,
        wrong=len(soak.wrong),
        per_s=round(soak.per_s),
        seconds=round(soak.seconds, 1),
        rss_before_kib=rss,
        rss_after_kib=rss_after,
        fds_before=fds,
        fds_after=fds_after,
    )
