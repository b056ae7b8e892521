"""systemd-analyze output as the real-boot suite and `make bench` read it (no VM)."""

from __future__ import annotations

import pytest

from tests.realboot.analyze import AnalyzeError, chain_share, timespan_s, userspace_s

# systemd 252's layout (Debian 12), units as a slow-path boot orders them.
CHAIN = """\
The time when unit became active or started is printed after the "@" character.
The time the unit took to start is printed after the "+" character.

multi-user.target @41.204s
└─kmodd-realboot-check.service @41.203s
  └─basic.target @40.980s
    └─sockets.target @40.979s
      └─dbus.socket @40.978s
        └─sysinit.target @40.950s
          └─kmodd-boot-wait.service @12.400s +28.549s
            └─kmodd-boot-publish.service @12.100s +290ms
              └─local-fs.target @12.050s
                └─systemd-remount-fs.service @1min 1.5s +1.2s
"""
TIME = (
    "Startup finished in 3.101s (kernel) + 9.020s (initrd) + 41.300s (userspace) = 53.421s \n"
    "multi-user.target reached after 41.204s in userspace.\n"
)


def test_timespans() -> None:
    assert timespan_s("1min 2.5s") == 62.5
    assert timespan_s("290ms") == pytest.approx(0.29)
    assert timespan_s("12us") == pytest.approx(12e-6)
    with pytest.raises(AnalyzeError):
        timespan_s("soon")


def test_userspace_time() -> None:
    assert userspace_s(TIME) == pytest.approx(41.3)
    with pytest.raises(AnalyzeError, match="no userspace"):
        userspace_s("Bootup is not yet finished")


def test_kmodd_share_counts_only_kmodd_units_on_the_chain() -> None:
    share = chain_share(CHAIN, TIME)
    assert share.kmodd_s == pytest.approx(28.549 + 0.29)
    assert share.target_s == pytest.approx(41.204)  # multi-user.target, the chain's head
    assert share.share == pytest.approx((28.549 + 0.29) / 41.204)
    assert share.as_dict()["kmodd_units_on_chain"] == [
        "kmodd-boot-wait.service",
        "kmodd-boot-publish.service",
    ]
    assert share.chain[-1].at_s == pytest.approx(61.5)


def test_empty_chain_is_an_error() -> None:
    with pytest.raises(AnalyzeError, match="no units"):
        chain_share("Bootup is not yet finished.", TIME)
