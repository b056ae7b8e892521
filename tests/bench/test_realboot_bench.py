"""bench.realboot_bench turns two real boots' `boot` steps into the critical-chain figures
(no VM here: the boots are tests/realboot's; the facts below are systemd 252's layout)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.realboot_bench import GOAL_SHARE, figures, saved_results
from tests.realboot.test_analyze import CHAIN, TIME

# The fast path: only the boot step on the chain, 0.9 s of 30 s.
FAST_CHAIN = """\
multi-user.target @30.000s
└─kmodd-realboot-check.service @29.990s
  └─basic.target @29.900s
    └─sysinit.target @20.000s
      └─systemd-udev-trigger.service @15.000s +4.9s
        └─systemd-udevd.service @13.000s +1.9s
          └─kmodd-boot-publish.service @12.100s +900ms
            └─systemd-journald.socket @1.000s
"""


def _kept(tmp_path: Path, plan: str, chain: str) -> None:
    boot = {"critical_chain": chain, "analyze_time": TIME, "published": "boot-publish ..."}
    doc = {"plan": plan, "steps": {"boot": {"facts": boot, "seconds": 1.0}}, "done": True}
    (tmp_path / f"{plan}.results.json").write_text(json.dumps(doc))


def test_figures_from_a_real_boot_runs_kept_results(tmp_path: Path) -> None:
    _kept(tmp_path, "first", CHAIN)
    _kept(tmp_path, "second", FAST_CHAIN)
    figs = {f.name: f for f in figures(saved_results(tmp_path))}
    fast = figs["boot_chain_share"]
    assert fast.value == pytest.approx(0.9 / 30.0, abs=1e-4)
    assert fast.met is True and fast.goal is not None and fast.goal.limit == GOAL_SHARE
    assert "kmodd-boot-publish.service" in fast.note
    slow = figs["boot_chain_share_slow_path"]
    assert slow.value == pytest.approx((28.549 + 0.29) / 41.204, abs=1e-4)  # as_dict rounds
    assert slow.goal is None  # the slow path has no goal: the daemon builds first


def test_a_share_over_the_goal_is_missed(tmp_path: Path) -> None:
    _kept(tmp_path, "first", CHAIN)
    _kept(tmp_path, "second", CHAIN)
    assert figures(saved_results(tmp_path))[0].met is False


def test_missing_results_say_which_file(tmp_path: Path) -> None:
    _kept(tmp_path, "first", CHAIN)
    with pytest.raises(FileNotFoundError, match=r"second\.results\.json"):
        saved_results(tmp_path)
